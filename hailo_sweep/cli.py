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

from hailo_sweep.errors import RunFailed, UserInputError
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


def _errors(fn):  # type: ignore[no-untyped-def]
    """Turn the tool's own errors into a clear message and a non-zero exit code (1: a run-time failure, 2: bad input,
    3: a store is down)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        from mlflow.exceptions import MlflowException

        from hailo_sweep.sweep import StoreUnavailable
        from hailo_sweep.tracking import TrackingUnavailable, redact_url

        try:
            return fn(*args, **kwargs)
        except UserInputError as exc:
            raise _fail(exc) from None
        except RunFailed as exc:  # a run-time failure, not the user's input: exit 1
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except (TrackingUnavailable, StoreUnavailable) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=3) from None
        except MlflowException as exc:  # e.g. 401/404 from a tracking server: its text may repeat a URL with a password
            err_console.print(f"[bold red]MLflow error:[/] {redact_url(str(exc))[:2000]}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=3) from None

    return wrapper


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


@app.command()
@_errors
def run(
    config: ConfigArg,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", min=1, help="total trials for the sweep (default: the config's)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="local worker processes")] = 1,
) -> None:
    """Run (or resume) the sweep described by CONFIG."""
    from hailo_sweep.config import load_config
    from hailo_sweep.selection import load_study, top_trials
    from hailo_sweep.sweep import Sweep

    _quiet()
    cfg = load_config(config)
    if jobs == 1:
        with _progress() as progress:
            summary = Sweep(cfg, RichObserver(progress)).run(trials)
        best_number, best_value = summary.best_number, summary.best_value
    else:
        best_number, best_value = _run_jobs(cfg, config, trials or cfg.trials, jobs)
    study, _ = load_study(cfg)
    _print_table(top_trials(study, 5), study.user_attrs.get("objective", {}).get("keys", ["value"])[0])
    if best_number is not None:
        console.print(f"best trial: [bold]{best_number}[/] (value {best_value:.6g})")
    else:
        console.print("[yellow]no feasible completed trial yet[/]")
    console.print(f"browse the runs: [bold]hailo-sweep ui {config}[/]   export the best: [bold]hailo-sweep best {config} --export out/[/]")


def _run_jobs(cfg, config: Path, total: int, jobs: int) -> tuple[int | None, float | None]:  # type: ignore[no-untyped-def]
    """``init`` here, then ``jobs`` worker processes; their output goes to sweeps/<name>/logs/."""
    import subprocess
    import sys
    import time

    from hailo_sweep.selection import load_study
    from hailo_sweep.sweep import NullObserver, Sweep, budget_used

    class Messages(NullObserver):  # the pre-flight's messages (calibration, device), once, before the workers start
        def message(self, text: str) -> None:
            console.print(f"[yellow]{text}[/]")

    sweep = Sweep(cfg, Messages())
    sweep.init()
    log_dir = sweep.stores.work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for index in range(jobs):
        log = (log_dir / f"worker-{index}.log").open("ab")
        cmd = [sys.executable, "-m", "hailo_sweep.cli", "worker", str(config), "--trials", str(total), "--worker-index", str(index)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"}), log))
    study, _ = load_study(cfg)
    with _progress() as progress:
        task = progress.add_task(f"{jobs} workers", total=total)
        while any(p.poll() is None for p, _ in procs):
            progress.update(task, completed=min(budget_used(study, count_running=False), total))
            time.sleep(1.0)
        progress.update(task, completed=min(budget_used(study, count_running=False), total))
    failed = []
    for index, (proc, log) in enumerate(procs):
        log.close()
        if proc.returncode != 0:
            failed.append(index)
    if failed:
        err_console.print(f"[bold red]error:[/] worker(s) {failed} exited with an error; see {log_dir}")
        raise typer.Exit(code=1)
    from hailo_sweep.sweep import chosen_trial

    best = chosen_trial(study)
    return (best.number, best.values[0]) if best is not None else (None, None)


@app.command()
@_errors
def init(config: ConfigArg) -> None:
    """Create the study, the MLflow experiment and the parent run once, and enqueue the baseline (before starting workers)."""
    from hailo_sweep.config import load_config
    from hailo_sweep.sweep import Sweep

    _quiet()
    sweep = Sweep(load_config(config))
    ids = sweep.init()
    console.print(f"sweep [bold]{ids.study_name}[/] ready: experiment {ids.experiment_id}, parent run {ids.parent_run_id}")
    for line in (f"optuna: {sweep.stores.describe()['optuna_storage']}", f"mlflow: {sweep.stores.describe()['mlflow_tracking_uri']}"):
        console.print(f"  {line}", soft_wrap=True)
    console.print(f"start workers with: hailo-sweep worker {config}")


@app.command()
@_errors
def worker(
    config: ConfigArg,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", min=1, help="total trials for the sweep (default: the config's)")] = None,
    worker_index: Annotated[Optional[int], typer.Option("--worker-index", min=0, help="offsets the sampler seed; default: from the process id")] = None,
) -> None:
    """Join an initialized sweep and run trials until its budget is spent."""
    from hailo_sweep.config import load_config
    from hailo_sweep.sweep import Sweep

    _quiet()
    index = worker_index if worker_index is not None else os.getpid() % 100000
    with _progress() as progress:
        summary = Sweep(load_config(config), RichObserver(progress), worker_index=index).work(trials)
    console.print(f"worker done: {summary.trials_run} trials run here")


@app.command()
@_errors
def finalize(config: ConfigArg) -> None:
    """Select the best feasible trial and register its model with the alias 'best'."""
    from hailo_sweep.config import load_config
    from hailo_sweep.selection import finalize as finalize_sweep

    _quiet()
    result = finalize_sweep(load_config(config))
    console.print(
        f"best trial {result['trial']} (value {result['value']:.6g}): registered model '{result['registered_model']}' "
        f"version {result['version']}, alias best; run {result['run_id']}"
    )


@app.command()
@_errors
def diagnose(
    config: ConfigArg,
    trial: Annotated[Optional[int], typer.Option("--trial", "-t", help="trial number to explain")] = None,
    compiled: Annotated[Optional[Path], typer.Option("--compiled", help="a compiled model (HEF or int8 ONNX) to run on the config's data")] = None,
    outputs: Annotated[Optional[Path], typer.Option("--outputs", help=".npz of your own device outputs on the evaluation set, one array per output")] = None,
    inputs: Annotated[Optional[Path], typer.Option("--inputs", help=".npy of what your code fed the model")] = None,
    placement: Annotated[str, typer.Option(help="where normalization runs for --compiled: host or model")] = "model",
    report: Annotated[Optional[Path], typer.Option("--report", help="where to write the HTML report")] = None,
) -> None:
    """Explain where the error comes from: findings with fixes, the error ladder, per-layer noise; writes an HTML report."""
    from hailo_sweep.config import load_config
    from hailo_sweep.diagnose.command import diagnose_files, diagnose_trial

    _quiet()
    cfg = load_config(config)
    if placement not in ("host", "model"):
        raise UserInputError(f"--placement must be host or model, got {placement!r}")
    if trial is not None:
        result = diagnose_trial(cfg, trial, report)
    else:
        result = diagnose_files(cfg, compiled=compiled, outputs_file=outputs, inputs_file=inputs, placement=placement, report=report)
    console.print(f"[bold]{result.title}[/]")
    if result.findings:
        for f in result.findings:
            colour = {"error": "red", "warning": "yellow", "info": "cyan"}[f.severity]
            console.print(f"[{colour}]{f.severity}[/] [bold]{f.code}[/]: {f.title}\n  {f.message}\n  [green]fix:[/] {f.fix}", soft_wrap=True)
    else:
        console.print("[green]no findings[/]: inputs, outputs and device agree with what the model expects")
    for sentence in result.explanation:
        console.print(f"- {sentence}", soft_wrap=True)
    console.print(f"report: {result.report}" + (f" (also logged to run {result.logged_to_run})" if result.logged_to_run else ""), soft_wrap=True)


def _print_table(rows: list, objective_key: str, title: str | None = None) -> None:
    table = Table(title=title or f"top trials by {objective_key}")
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
@_errors
def best(
    config: ConfigArg,
    export: Annotated[Optional[Path], typer.Option("--export", help="write the chosen compiled model, its script and a manifest here")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="rows in the table")] = 10,
    pick: Annotated[Optional[int], typer.Option("--pick", help="export this trial instead (e.g. another point of the Pareto front)")] = None,
) -> None:
    """Show the top trials (and the Pareto front); with --export, register the chosen model (alias 'best') and export it."""
    from hailo_sweep.config import load_config
    from hailo_sweep.selection import export_best, load_study, log_front, pareto_front, top_trials

    _quiet()
    cfg = load_config(config)
    study, stores = load_study(cfg)
    objective_key = study.user_attrs.get("objective", {}).get("keys", ["value"])[0]
    front = pareto_front(study)
    if front:
        _print_table(front, objective_key, title="Pareto front: error vs device throughput")
        plot = log_front(cfg, study, stores, stores.work_dir / "pareto")
        console.print(f"front plot: {plot} (also logged to the sweep's parent run)", soft_wrap=True)
    else:
        _print_table(top_trials(study, top), objective_key)
    if export is not None:
        manifest = export_best(cfg, export, pick)
        console.print(
            f"exported trial {manifest['trial']} to [bold]{export}[/]: {', '.join(f['name'] for f in manifest['files'].values())}, manifest.json "
            f"(registered model '{manifest['mlflow']['registered_model']}' version {manifest['mlflow']['version']}, alias best)"
        )


@app.command()
@_errors
def verify(export_dir: Annotated[Path, typer.Argument(help="a directory written by `best --export`")]) -> None:
    """Rebuild an exported model from its lock file; report whether outputs, metrics and (where deterministic) bytes match."""
    from hailo_sweep.reproduce import verify as verify_export

    _quiet()
    v = verify_export(export_dir)
    for name, diff in v.outputs_max_abs_diff.items():
        console.print(f"output {name}: max |exported - rebuilt| = {diff:.3g}")
    bad = {k: ab for k, ab in v.metric_diffs.items() if abs(ab[0] - ab[1]) > 1e-6 * max(1.0, abs(ab[0]))}
    console.print(f"recorded metrics reproduced: {len(v.metric_diffs) - len(bad)}/{len(v.metric_diffs)}")
    for k, (a, b) in sorted(bad.items())[:10]:
        console.print(f"  {k}: recorded {a:.6g}, rebuilt {b:.6g}")
    console.print(f"compiled bytes identical: {'yes' if v.bytes_identical else 'no'}")
    for k, (old, new) in v.version_changes.items():
        console.print(f"[yellow]version changed[/]: {k} {old} -> {new}")
    if v.ok:
        console.print("[green]verified[/]: the rebuild reproduces the exported model's outputs and metrics")
    else:
        err_console.print("[bold red]not reproduced[/]: see the differences above")
        raise typer.Exit(code=1)


@app.command()
def ui(
    config: Annotated[Optional[Path], typer.Argument(help="sweep config; its experiment is opened (default: the latest)")] = None,
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless you mean to share it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0, or a port that is taken: a free one is picked)")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep's tracking store and print the runs page URL."""
    from hailo_sweep import ui as ui_mod
    from hailo_sweep.config import load_config
    from hailo_sweep.stores import redact_url, resolve_stores

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the server even if started with SIGINT ignored
    try:
        seconds = ui_mod.wait_until_healthy(server)
        url = ui_mod.runs_url(server.base_url, ui_mod.experiment_id(server.base_url, experiment))
        console.print(f"MLflow UI ready in {seconds:.1f} s on {redact_url(tracking_uri)}")
        console.print(f"runs page: {url}", soft_wrap=True)
        console.print(f"trial runs only: {url}&searchFilter=tags.hailo_sweep.role%20%3D%20%27trial%27", soft_wrap=True)
        console.print("press Ctrl-C to stop")
        server.process.wait()
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError, LookupError, OSError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        server.stop()
        raise typer.Exit(1) from None
    finally:
        server.stop()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
