"""What one trial produced: stage times, metrics, facts, findings and the compiled model; plain data.

Light on purpose (NumPy and the project's own data classes only): a trial's result crosses machines in the cluster,
and a device host must be able to read it without the compiler, the trackers or ONNX Runtime.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hailo_sweep.backends.base import CompiledModel, LayerNoise
from hailo_sweep.diagnose.findings import Finding
from hailo_sweep.settings import Settings


class StageTimeout(Exception):
    """A stage ran past its configured time limit."""


def _stage_timeout(exc: BaseException) -> StageTimeout | None:
    """The ``StageTimeout`` behind ``exc``, also when a backend wrapped it in its own error (e.g. a DFC call failed)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, StageTimeout):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@dataclass
class StageTiming:
    name: str
    seconds: float
    ok: bool


@dataclass
class TrialResult:
    settings: Settings
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str | int | float] = field(default_factory=dict)  # facts the backend reported
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    script: str = ""
    script_name: str = "recipe.txt"
    compiled: CompiledModel | None = None
    failed_stage: str | None = None
    error: str | None = None
    traceback: str | None = None
    lsb_histograms: dict[str, dict[int, int]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    layer_noise: list[LayerNoise] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)  # the toolchain's own logs (``*.log`` in the trial's work dir)

    @property
    def ok(self) -> bool:
        return self.failed_stage is None

    def stage_seconds(self) -> float:
        return sum(t.seconds for t in self.timings)

    def fail(self, stage: str, exc: BaseException) -> None:
        """This trial failed in ``stage`` with ``exc``: the reason (a time limit named as such) and the traceback."""
        self.failed_stage = stage
        timeout = _stage_timeout(exc)
        self.error = f"StageTimeout: {timeout}" if timeout is not None else f"{type(exc).__name__}: {exc}"
        self.traceback = "".join(traceback.format_exception(exc))
