"""When a sweep is done: evaluations that count against the budget, and the budget itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from hailo_sweep.sweep.faults import INTERRUPTED_ATTR
from hailo_sweep.sweep.sampling import point_key

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
class BudgetSpent(Exception):
    """Raised when a worker asks for a new trial after the sweep's budget is spent: the worker stops cleanly."""


def baseline_pending_or_done(t: optuna.trial.FrozenTrial) -> bool:
    """A baseline trial that is enqueued, running or evaluated (an interrupted one is not: it is enqueued again)."""
    return bool(t.user_attrs.get("baseline")) and not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR))


def waiting(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def budget_used(study: optuna.Study, *, count_running: bool) -> int:
    """Evaluations that count against the budget: finished trials (a failed trial that was retried counts once,
    through its retry; a reused duplicate is free) and, with ``count_running``, the ones in progress on any worker."""
    return used(study.get_trials(deepcopy=False), count_running=count_running)


def evaluated(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [
        t for t in trials
        if t.state in FINISHED_STATES and "duplicate_of" not in t.user_attrs and not (t.state == TrialState.FAIL and t.number in superseded)
    ]


def used(trials: Sequence[optuna.trial.FrozenTrial], *, count_running: bool) -> int:
    used = len(evaluated(trials))
    if count_running:
        used += sum(1 for t in trials if t.state == TrialState.RUNNING)
    return used


@dataclass(frozen=True)
class Budget:
    """When a sweep is done: ``total`` evaluations (the user's budget: a reused duplicate costs nothing), or every one
    of the search space's ``points`` evaluated, or ``slack`` x ``total`` trials in all (a sampler that keeps proposing
    finished points must still end)."""

    total: int
    points: int
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # equivalent params -> one point
    slack: int = 4

    def spent(self, trials: Sequence[optuna.trial.FrozenTrial], *, count_running: bool) -> bool:
        if used(trials, count_running=count_running) >= self.total:
            return True
        canonical = self.canonical or dict
        if len({point_key(canonical(dict(t.params))) for t in evaluated(trials) if t.params}) >= self.points:
            return True
        return sum(1 for t in trials if t.state != TrialState.WAITING) >= self.slack * self.total

