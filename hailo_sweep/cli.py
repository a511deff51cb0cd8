"""The command line: ``hailo-sweep run | best | ui``. Typer for arguments, Rich for tables and progress."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from hailo_sweep.errors import UserInputError
from hailo_sweep.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Sweep Hailo quantization settings; track every trial in MLflow.")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="sweep config (YAML)", show_default=False)]


def _fail(exc: UserInputError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by our own progress lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class RichObserver:
    """Progress of the sweep (trials) and of the current trial (its stage)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.sweep_task = progress.add_task("sweep", total=None)
        self.stage_task = progress.add_task("", total=None)

    def sweep_started(self, total: int, remaining: int) -> None:
        self.progress.update(self.sweep_task, total=total, completed=total - remaining, description="trials")

    def message(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}[/]")

    def trial_started(self, number: int, settings: Settings) -> None:
        p = settings.as_params()
        self.progress.update(self.stage_task, description=f"trial {number}: " + " ".join(f"{k}={v}" for k, v in p.items()))

    def stage_started(self, name: str) -> None:
        desc = self.progress.tasks[self.stage_task].description.split(" | ")[0]
        self.progress.update(self.stage_task, description=f"{desc} | {name}")

    def trial_finished(self, number: int, state: str, value: float | None, feasible: bool | None) -> None:
        self.progress.advance(self.sweep_task)
        shown = "-" if value is None else f"{value:.6g}"
        mark = {True: "[green]feasible[/]", False: "[red]infeasible[/]", None: ""}[feasible]
        self.progress.console.print(f"trial {number:>3}  {state:<18} value={shown}  {mark}")


@app.command()
def run(
    config: ConfigArg,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", min=1, help="total trials for the sweep (default: the config's)")] = None,
) -> None:
    """Run (or resume) the sweep described by CONFIG."""
    from hailo_sweep.config import load_config
    from hailo_sweep.selection import top_trials
    from hailo_sweep.sweep import Sweep

    _quiet()
    try:
        cfg = load_config(config)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            sweep = Sweep(cfg, RichObserver(progress))
            summary = sweep.run(trials)
    except UserInputError as exc:
        raise _fail(exc) from None
    from hailo_sweep.selection import load_study

    study, _ = load_study(cfg)
    _print_table(top_trials(study, 5), study.user_attrs.get("objective", {}).get("key", "value"))
    if summary.best_number is not None:
        console.print(f"best trial: [bold]{summary.best_number}[/] (value {summary.best_value:.6g})")
    else:
        console.print("[yellow]no feasible completed trial yet[/]")
    console.print(f"browse the runs: [bold]hailo-sweep ui {config}[/]   export the best: [bold]hailo-sweep best {config} --export out/[/]")


def _print_table(rows: list, objective_key: str) -> None:
    table = Table(title=f"top trials by {objective_key}")
    for col in ("trial", "value", "feasible", "opt", "comp", "calib", "norm", "16-bit", "device fps"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.number) + (f" (=#{r.duplicate_of})" if r.duplicate_of is not None else ""),
            f"{r.value:.6g}",
            "yes" if r.feasible else "no",
            str(r.params.get("optimization_level")),
            str(r.params.get("compression_level")),
            str(r.params.get("calibset_size")),
            str(r.params.get("normalization_placement")),
            str(r.params.get("output_16bit")),
            f"{r.metrics.get('device.throughput_fps', float('nan')):.0f}",
        )
    console.print(table)


@app.command()
def best(
    config: ConfigArg,
    export: Annotated[Optional[Path], typer.Option("--export", help="write the best compiled model, its script and a manifest here")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="rows in the table")] = 10,
) -> None:
    """Show the top trials; with --export, register the best model (alias 'best') and export it."""
    from hailo_sweep.config import load_config
    from hailo_sweep.selection import export_best, load_study, top_trials

    _quiet()
    try:
        cfg = load_config(config)
        study, _ = load_study(cfg)
        _print_table(top_trials(study, top), study.user_attrs.get("objective", {}).get("key", "value"))
        if export is not None:
            manifest = export_best(cfg, export)
            console.print(
                f"exported trial {manifest['trial']} to [bold]{export}[/]: {', '.join(f['name'] for f in manifest['files'].values())}, manifest.json "
                f"(registered model '{manifest['mlflow']['registered_model']}' version {manifest['mlflow']['version']}, alias best)"
            )
    except UserInputError as exc:
        raise _fail(exc) from None


@app.command()
def ui(
    config: Annotated[Optional[Path], typer.Argument(help="sweep config; its experiment is opened (default: the latest)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless you mean to share it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0, or a port that is taken: a free one is picked)")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep's tracking store and print the runs page URL."""
    from hailo_sweep import ui as ui_mod
    from hailo_sweep.config import load_config
    from hailo_sweep.sweep import resolve_stores
    from hailo_sweep.tracking import Tracker, redact_url

    _quiet()
    try:
        if config is not None:
            cfg = load_config(config)
            stores = resolve_stores(cfg)
            tracking_uri, experiment = stores.mlflow_uri, cfg.name
        else:
            tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
            experiment = None
    except UserInputError as exc:
        raise _fail(exc) from None
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise _fail(UserInputError(f"no tracking store at {tracking_uri}", fix="run a sweep first: hailo-sweep run CONFIG"))
    if port == 0 or ui_mod.port_in_use(host, port):
        port = ui_mod.free_port(host)
    artifact_root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" if tracking_uri.startswith("sqlite:///") else None
    server = ui_mod.start(tracking_uri, artifact_root, host=host, port=port)

    def _stop(*_: object) -> None:
        server.stop()
        raise typer.Exit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        seconds = ui_mod.wait_until_healthy(server)
        tracker = Tracker(tracking_uri, experiment or _latest_experiment(tracking_uri))
        url = tracker.runs_url(server.base_url)
        console.print(f"MLflow UI ready in {seconds:.1f} s on {redact_url(tracking_uri)}")
        console.print(f"runs page: {url}", soft_wrap=True)
        console.print(f"trial runs only: {url}&searchFilter=tags.hailo_sweep.role%20%3D%20%27trial%27", soft_wrap=True)
        console.print("press Ctrl-C to stop")
        server.process.wait()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        server.stop()
        raise typer.Exit(1) from None
    finally:
        server.stop()


def _latest_experiment(tracking_uri: str) -> str:
    from mlflow.tracking import MlflowClient

    exps = MlflowClient(tracking_uri).search_experiments(order_by=["last_update_time DESC"], max_results=5)
    named = [e for e in exps if e.name != "Default"]
    return (named or exps)[0].name


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
