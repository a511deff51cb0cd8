"""What a sweep tells whoever watches it (the console, a test), and what it returns when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hailo_sweep.settings import Settings

if TYPE_CHECKING:
    import optuna

    from hailo_sweep.backends.base import Backend
    from hailo_sweep.sweep.budget import Budget
    from hailo_sweep.sweep.runner import TrialRunner

# -- progress ------------------------------------------------------------------------------------------------
class SweepObserver(Protocol):
    def sweep_started(self, total: int, remaining: int) -> None: ...
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int, settings: Settings) -> None: ...
    def stage_started(self, name: str) -> None: ...
    def trial_finished(
        self, number: int, state: str, value: float | None, feasible: bool | None, *,
        failed_stage: str | None = None, error: str | None = None, duplicate_of: int | None = None, violated: tuple[str, ...] = (),
    ) -> None: ...


class NullObserver:
    def sweep_started(self, total: int, remaining: int) -> None: ...
    def message(self, text: str) -> None: ...
    def trial_started(self, number: int, settings: Settings) -> None: ...
    def stage_started(self, name: str) -> None: ...
    def trial_finished(self, number: int, state: str, value: float | None, feasible: bool | None, **details: Any) -> None: ...


@dataclass
class TrialTiming:
    number: int
    wall_s: float
    stages_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.stages_s


@dataclass
class SweepSummary:
    study_name: str
    experiment_id: str
    parent_run_id: str
    trials_run: int
    prepare_seconds: float
    prepare_runs: int
    timings: list[TrialTiming] = field(default_factory=list)
    best_number: int | None = None
    best_value: float | None = None


# -- the sweep -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepIds:
    study_name: str
    experiment_id: str
    parent_run_id: str


class TrialLoop(Protocol):
    """Where a sweep's trials run when not in this process (``hailo_sweep.cluster.driver.ClusterLoop``)."""

    #: True when the stages use this process's backend (then it is entered and prepared here)
    stages_here: bool

    def check_devices(self, backend: Backend) -> list[str]:
        """The device check before the first trial, where the devices are; raises ``UserInputError`` to refuse."""
        ...

    def run(self, study: optuna.Study, runner: TrialRunner, budget: Budget) -> None:
        """Run trials (``runner.begin`` / ``runner.finish``) until the budget is spent."""
        ...

    def summary(self) -> dict[str, float]:
        """Metrics for the parent run (e.g. the bytes the loop sent)."""
        ...

