"""How the command line prints: the trial tables, the next-step hints, and the tool's errors turned into exit codes.

Nothing heavy is imported at module level: ``--help``, ``--version`` and a config error must answer in well under
a second, so MLflow, Optuna and the backends are loaded only by the commands that use them.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hailo_sweep.errors import ClusterUnreachable, RunFailed, UserInputError

#: the width of output that goes to a file or a pipe (a log, ``make demo | tee``), where Rich would assume 80 columns
#: and fold the trials table's cells; a terminal (or ``COLUMNS``) keeps its own width
PIPE_WIDTH = 120


def _width(stream: Any) -> int | None:
    tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()
    return None if os.environ.get("COLUMNS") or tty else PIPE_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: UserInputError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code=2)


def quiet() -> None:
    """Telemetry off, no URL printing; library warnings that only repeat what our own lines say are silenced."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level from this when imported
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by our own progress lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def handles_errors(fn: F) -> F:
    """Turn the tool's own errors into a clear message and an exit code (1: a run-time failure, 2: bad input, 3: a store
    is down or the Dask scheduler unreachable).

    The store errors are matched by the modules that define them, and only when those modules have been loaded:
    an error raised before MLflow was imported cannot be an MLflow error, and importing it here would cost a second.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            raise fail(exc) from None
        except RunFailed as exc:  # a run-time failure (a stage failed), not the user's input: exit 1
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except ClusterUnreachable as exc:  # the Dask scheduler is down or out of reach, like a store: exit 3
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=3) from None
        except KeyboardInterrupt as exc:  # the interrupted trial is on record (faults.py); 128 + the signal, as a shell reports it
            raise typer.Exit(code=143 if getattr(exc, "signame", "SIGINT") == "SIGTERM" else 130) from None
        except Exception as exc:
            faults = sys.modules.get("hailo_sweep.sweep.faults")
            if faults is not None and isinstance(exc, faults.StoresFull):  # the trial is on record as failed: one line
                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=1) from None
            store_errors = tuple(
                getattr(sys.modules[mod], name) for mod, name in (("hailo_sweep.sweep.storage", "StoreUnavailable"), ("hailo_sweep.tracking", "TrackingUnavailable"))
                if mod in sys.modules
            )
            if store_errors and isinstance(exc, store_errors):
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
                raise typer.Exit(code=3) from None
            mlflow_exc = sys.modules.get("mlflow.exceptions")
            if mlflow_exc is not None and isinstance(exc, mlflow_exc.MlflowException):
                from hailo_sweep.stores import redact_url  # a server's 401/404 text may repeat a URL with a password

                err_console.print(f"[bold red]MLflow error:[/] {redact_url(str(exc))[:2000]}", highlight=False, soft_wrap=True)
                raise typer.Exit(code=3) from None
            raise

    return wrapper  # type: ignore[return-value]


def self_command() -> str:
    """How to run this tool again, exactly as this process was started: ``hailo-sweep`` when that is on PATH,
    else the path of the script (``.venv/bin/hailo-sweep`` after ``make demo``) or ``python -m hailo_sweep.cli``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "hailo-sweep":
        found = shutil.which("hailo-sweep")
        if found and os.path.abspath(found) == os.path.abspath(argv0):
            return "hailo-sweep"
        return shlex.quote(_relative(argv0))
    return f"{shlex.quote(_relative(Path(sys.executable)))} -m hailo_sweep.cli"


def _relative(path: Path) -> str:
    absolute = os.path.abspath(path)
    rel = os.path.relpath(absolute)
    return rel if not rel.startswith("..") else absolute


def hint(*commands: tuple[str, str]) -> None:
    """Next steps, each a command that works as printed (copy and paste)."""
    me = self_command()
    for what, args in commands:
        console.print(f"{what}: [bold]{me} {args}[/]", highlight=False, soft_wrap=True)


def short_constraint(name: str) -> str:
    """A constraint in a word: ``device.logits.accuracy_drop.max`` -> ``accuracy_drop``."""
    parts = name.split(".")
    if parts[-1] in ("max", "min", "budget") and len(parts) >= 2:
        parts = parts[:-1]
    return parts[-1]


def why_infeasible(constraints: dict[str, float]) -> str:
    """The violated constraints in a few words, e.g. ``no: accuracy_drop``."""
    names = [short_constraint(name) for name, value in sorted(constraints.items()) if value > 0]
    return "no: " + ", ".join(dict.fromkeys(names)) if names else "no"


def print_trials(rows: Sequence[Any], objective_key: str, title: str | None = None) -> None:
    """The listed trials: number, value, feasibility (or why not), every knob whose value differs between them, fps.

    The knobs that are the same in every listed trial are said once under the table, with the config key of each
    abbreviated column header; nothing is cut (a column too wide for the terminal folds).
    """
    from hailo_sweep.knob_table import HEADERS, NO_EFFECT, NUMERIC_KNOBS, knob_columns

    columns = knob_columns([r.params for r in rows])
    table = Table(title=title or f"top trials by {objective_key}", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), title_justify="left")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("feasible", overflow="fold")
    for knob in columns.varying:
        table.add_column(HEADERS.get(knob, knob), justify="right" if knob in NUMERIC_KNOBS else "left", overflow="fold")
    table.add_column("fps", justify="right", no_wrap=True)
    inert = False
    for r in rows:
        fps = r.metrics.get("device.throughput_fps")
        cells = [columns.cell(knob, r.params) for knob in columns.varying]
        inert = inert or NO_EFFECT in cells
        table.add_row(
            str(r.number),
            f"{r.value:.6g}",
            "[green]yes[/]" if r.feasible else f"[red]{why_infeasible(getattr(r, 'constraints', {}) or {})}[/]",
            *cells,
            "-" if fps is None else f"{fps:.0f}",
        )
    console.print(table)
    if columns.legend():
        console.print(f"columns: {columns.legend()}" + ("; - = no effect under that calibration_method" if inert else ""), highlight=False)
    if columns.constant:
        console.print(f"same in every trial above: {columns.constants_line()}", highlight=False)
