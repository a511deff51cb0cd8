"""The sampler setup of a sweep: which Optuna sampler, how long its random start-up phase is, and what happens when it
proposes a point that was already evaluated.

Measured on the digits example (``benchmarks/bench_search.py``, ``benchmarks/bench_peers.py``): Optuna's TPE with its
defaults spends its first 10 trials on random points (a third of a 30-trial budget, identical to the random sampler's for
the same seed) and afterwards re-proposes finished points again and again on a small categorical space. So:

- the start-up phase is sized to the budget and the space (``startup_trials``): a tenth of the budget, at least 3 and
  at most 10 (Optuna's default, reached at 100 trials), never more than half the space's points. Measured per budget
  from 5 to 30 (``benchmarks/bench_budgets.py``: a study's best after n evaluations over 100 seeds, and a study of
  exactly n evaluations over 30): 3 random points (besides the baseline) gave the lowest mean best, averaged over
  the budgets, of the phases tried (3, 4, 5, a fifth or a sixth of the budget), and was behind random search only at
  budget 5 in the first reading (by 0.1%); a fifth of the budget (6 at 30 trials) fell behind at 6-7, and 5 points
  at 5-6. On 5 seeds the ranking flips from one seed set to the next: the differences between set-ups at a single
  budget are within the noise of a 5-seed mean;
- TPE models the knobs jointly (``multivariate=True``) and, since a knob may exist only under another knob's value
  (e.g. a clipping percentile under percentile calibration), by groups of knobs that occur together (``group=True``),
  as Optuna documents for conditional spaces;
- a re-proposal of an evaluated point is answered from the earlier result for free (it does not count against the
  budget, see ``hailo_sweep.sweep.Budget``), and one not yet evaluated point is enqueued in its place, so the sweep
  always makes progress while unevaluated points remain (``next_unevaluated``).
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hailo_sweep.config import SamplerConfig

MIN_STARTUP = 3
MAX_STARTUP = 10  # Optuna's own default
STARTUP_SHARE = 0.1


def startup_trials(budget: int, points: int | None) -> int:
    """Random trials before TPE's model takes over: a share of the budget, bounded, and at most half the space."""
    n = max(MIN_STARTUP, min(MAX_STARTUP, round(STARTUP_SHARE * budget)))
    if points is not None:
        n = min(n, max(1, points // 2))
    return n


def make_sampler(config: SamplerConfig, *, budget: int, points: int | None, choices: dict[str, list[Any]], seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for ``config`` (``seed`` already offset per worker by the caller)."""
    if config.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.name == "grid":
        return optuna.samplers.GridSampler(choices, seed=seed)
    n_startup = config.startup_trials if isinstance(config.startup_trials, int) else startup_trials(budget, points)
    with warnings.catch_warnings():  # multivariate and group are experimental options in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=n_startup,
            multivariate=config.multivariate,
            group=config.multivariate,
        )


def point_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def next_unevaluated(
    trials: Sequence[FrozenTrial],
    choices: dict[str, list[Any]],
    rng: random.Random,
    *,
    canonical: Callable[[dict[str, Any]], dict[str, Any]] = dict,
    enumerate_up_to: int = 5000,
) -> dict[str, Any] | None:
    """A point of the space that no trial has evaluated, is evaluating or is waiting to evaluate (None: all taken).

    Drawn at random (seeded by the caller) so that the replacement does not walk the grid in declaration order; a
    small space is enumerated, a large one sampled (a large space has free points almost everywhere).
    """
    knobs = list(choices)

    def whole(params: dict[str, Any]) -> bool:  # a trial stopped while being suggested holds only part of a point
        return all(k in params for k in knobs)

    taken = {point_key(canonical(dict(t.params))) for t in trials if whole(t.params)}
    taken |= {
        point_key(canonical(dict(t.system_attrs["fixed_params"])))
        for t in trials if t.state == TrialState.WAITING and whole(t.system_attrs.get("fixed_params", {}))
    }
    size = 1
    for values in choices.values():
        size *= len(values)
    if size <= enumerate_up_to:
        free: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
        for combo in itertools.product(*(choices[k] for k in knobs)):
            params = dict(zip(knobs, combo))
            key = point_key(canonical(params))
            if key not in taken:
                free.setdefault(key, params)  # one representative per point
        return rng.choice(list(free.values())) if free else None
    for _ in range(1000):
        params = {k: rng.choice(choices[k]) for k in knobs}
        if point_key(canonical(params)) not in taken:
            return params
    return None
