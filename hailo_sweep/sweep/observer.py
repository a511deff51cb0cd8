"""What a sweep tells whoever watches it (the console, a test), and what it returns when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from hailo_sweep.settings import Settings

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


