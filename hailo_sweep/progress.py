"""What the terminal shows while a sweep runs: one live status line and one line per finished trial (Rich).

The live line fits 80 columns and keeps the facts a user waits on: the trial count, the stage and its position in
the ladder, the elapsed time, an ETA from the stage times measured so far, and the best value so far. Each finished
trial prints one line with its state, value and feasibility, and for a failure the stage and the first line of the
reason. This module only renders what the sweep reports through its observer calls; it knows nothing of Optuna.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task
from rich.text import Text

from hailo_sweep.console import short_constraint
from hailo_sweep.settings import Settings

#: the stages of one trial, in order (``prepare`` runs once per sweep, before the first trial)
LADDER = ("optimize", "emulate", "compile", "device", "diagnose", "record")

REUSED_NOTE = (
    "(reused #N): trial N already evaluated these settings; its result is recorded again for this trial, "
    "without recomputing and without spending budget"
)


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def short_value(value: float | None) -> str:
    """Six significant digits, never cut: ``0.000331416``  -> ``0.000331416``, ``1234567.0`` -> ``1.23457e+06``."""
    return "-" if value is None else f"{value:.6g}"


def first_line(text: str | None, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class SweepClock:
    """Stage times measured so far, and the ETA they give for the rest of the sweep."""

    total: int = 0
    done: int = 0  # evaluations that count against the budget (a reused result does not)
    reused: int = 0
    stage_means: dict[str, tuple[float, int]] = field(default_factory=dict)  # stage -> (sum of seconds, count)
    trial_seconds: list[float] = field(default_factory=list)

    def add_stage(self, name: str, seconds: float) -> None:
        total, n = self.stage_means.get(name, (0.0, 0))
        self.stage_means[name] = (total + seconds, n + 1)

    def mean(self, name: str) -> float | None:
        total, n = self.stage_means.get(name, (0.0, 0))
        return total / n if n else None

    def eta(self, stage: str | None, stage_elapsed: float) -> float | None:
        """Seconds left: the rest of the current trial (stage means) plus the remaining trials (mean trial time)."""
        if not self.trial_seconds:
            return None
        per_trial = sum(self.trial_seconds) / len(self.trial_seconds)
        left_in_trial = 0.0
        if stage in LADDER:
            for name in LADDER[LADDER.index(stage):]:
                mean = self.mean(name) or 0.0
                left_in_trial += max(0.0, mean - stage_elapsed) if name == stage else mean
        current = 1 if stage in LADDER else 0
        remaining = max(0, self.total - self.done - current)
        return left_in_trial + remaining * per_trial


class _StatusColumn(ProgressColumn):
    """The whole live line as one column, so that it degrades by words, not by columns, in a narrow terminal."""

    def __init__(self, observer: RichObserver):
        super().__init__()
        self.observer = observer

    def render(self, task: Task) -> Text:
        return self.observer.status_text()


class RichObserver:
    """The sweep's observer (see ``hailo_sweep.sweep.SweepObserver``) rendered with Rich."""

    def __init__(self, console: Console):
        self.console = console
        self.clock = SweepClock()
        self.started = time.monotonic()
        self.trial: int | None = None
        self.stage: str | None = None
        self.stage_started_at = time.monotonic()
        self.trial_started_at = time.monotonic()
        self.best: tuple[int, float] | None = None
        self.direction_sign = 1.0
        self.reused_explained = False
        self.progress = Progress(SpinnerColumn(), _StatusColumn(self), console=console, transient=True, refresh_per_second=4)
        self._task = self.progress.add_task("sweep", total=None)

    # -- context ---------------------------------------------------------------------------------------------
    def __enter__(self) -> RichObserver:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    # -- the live line ---------------------------------------------------------------------------------------
    def status_text(self) -> Text:
        c = self.clock
        now = time.monotonic()
        parts = [(f"trials {c.done}/{c.total}" + (f" +{c.reused} reused" if c.reused else "")) if c.total else "trials"]
        if self.stage is not None:
            where = f"{LADDER.index(self.stage) + 1}/{len(LADDER)}" if self.stage in LADDER else "once"
            parts.append(("" if self.trial is None else f"#{self.trial} ") + f"{self.stage} {where}")
        parts.append(clock(now - self.started))
        eta = c.eta(self.stage, now - self.stage_started_at)
        parts.append("ETA " + ("?" if eta is None else clock(eta)))
        if self.best is not None:
            parts.append(f"best {short_value(self.best[1])} (#{self.best[0]})")
        return Text(" | ".join(parts), overflow="ellipsis", no_wrap=True)

    # -- observer calls --------------------------------------------------------------------------------------
    def sweep_started(self, total: int, remaining: int) -> None:
        self.clock.total = total
        self.clock.done = max(0, total - remaining)
        if total - remaining > 0:
            self.console.print(f"resuming: {total - remaining} of {total} trials already done, {remaining} to run", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]{escape(text)}[/]", soft_wrap=True)

    def trial_started(self, number: int, settings: Settings) -> None:
        self._end_stage()
        self.trial = number
        self.stage = None
        self.trial_started_at = time.monotonic()

    def stage_started(self, name: str) -> None:
        self._end_stage()
        self.stage = name
        self.stage_started_at = time.monotonic()

    def trial_finished(
        self, number: int, state: str, value: float | None, feasible: bool | None, *,
        failed_stage: str | None = None, error: str | None = None, duplicate_of: int | None = None,
        violated: tuple[str, ...] = (),
    ) -> None:
        reused = duplicate_of is not None or "reused" in state
        if not reused:
            self._end_stage()
            self.clock.trial_seconds.append(time.monotonic() - self.trial_started_at)
        self.stage = None
        if reused:
            self.clock.reused += 1
        else:
            self.clock.done += 1
        if value is not None and feasible:
            if self.best is None or self.direction_sign * value < self.direction_sign * self.best[1]:
                self.best = (number if duplicate_of is None else duplicate_of, value)
        self.console.print(self.trial_line(number, state, value, feasible, failed_stage, error, duplicate_of, violated), highlight=False, soft_wrap=True)
        if reused and not self.reused_explained:
            self.reused_explained = True
            self.console.print(f"[dim]{REUSED_NOTE}[/]", highlight=False)

    def set_direction(self, direction: str) -> None:
        self.direction_sign = 1.0 if direction == "minimize" else -1.0

    @staticmethod
    def trial_line(
        number: int, state: str, value: float | None, feasible: bool | None, failed_stage: str | None = None,
        error: str | None = None, duplicate_of: int | None = None, violated: tuple[str, ...] = (),
    ) -> str:
        base = state.split(" ")[0]
        colour = {"COMPLETE": "green", "FAIL": "red", "PRUNED": "yellow"}.get(base, "white")
        line = f"trial {number:>4}  [{colour}]{escape(base):<8}[/]"
        if base == "FAIL":
            reason = first_line(error) or "no reason recorded"
            return line + f" in {escape(failed_stage or '?')}: {escape(reason)}"
        if base == "PRUNED":
            return line + " " + escape(state.removeprefix("PRUNED").strip(" ()") or "stopped early")
        line += f" {short_value(value):>12}"
        if feasible is True:
            line += "  [green]feasible[/]"
        elif feasible is False:
            shown = ", ".join(dict.fromkeys(short_constraint(v) for v in violated))
            line += "  [red]infeasible[/]" + (f" ({escape(shown)})" if shown else "")
        if duplicate_of is not None:
            line += f"  (reused #{duplicate_of})"
        elif "reused" in state:
            line += "  (reused)"
        return line

    def _end_stage(self) -> None:
        if self.stage is not None:
            self.clock.add_stage(self.stage, time.monotonic() - self.stage_started_at)
            self.stage = None
