"""The command line: ``hailo-sweep run | init | worker | finalize | best | diagnose | verify | ui | dashboard``.

Typer for arguments, Rich for output (``hailo_sweep.console``, ``hailo_sweep.progress``). Every heavy import (MLflow,
Optuna, onnxruntime, matplotlib) happens inside the command that needs it, after the config has been read, so that
``--help``, ``--version`` and a config error answer at once.
"""

from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hailo_sweep import __version__
from hailo_sweep.console import console, err_console, fail, handles_errors, hint, print_trials, quiet, self_command
from hailo_sweep.errors import UserInputError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Sweep Hailo quantization settings; track every trial in MLflow.",
)

#: the metavar of a flag (a bool option that takes no value): none. Typer 0.29's Rich help shows ``<bool>`` after a
#: flag, as if it took a value, unless its metavar is given (its plain help and Typer <= 0.28 show nothing)
FLAG = ""

ConfigArg = Annotated[Path, typer.Argument(help="sweep config (YAML)", show_default=False)]


class Placement(str, enum.Enum):
    host = "host"
    model = "model"


def _version(value: bool) -> None:
    if value:
        console.print(f"hailo-sweep {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="print the version and exit", metavar=FLAG)] = False,
) -> None:
    """Sweep Hailo quantization settings; track every trial in MLflow."""


def _direction(cfg: Any) -> str:
    """The direction of the value the sweep reports first (for the best-so-far in the progress line)."""
    from hailo_sweep import metrics as m

    if cfg.objective.mode == "fastest_within":
        return "maximize"
    try:
        return str(cfg.objective.direction or m.direction_of(cfg.objective.metric.rsplit(".", 1)[-1]))
    except KeyError:
        return "maximize" if cfg.objective.metric == "throughput_fps" else "minimize"


@app.command()
@handles_errors
def run(
    config: ConfigArg,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", min=1, help="total trials for the sweep (default: the config's)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="local worker processes")] = 1,
    cluster: Annotated[Optional[str], typer.Option(
        "--cluster", metavar="ADDRESS", help="a Dask scheduler (tcp://HOST:8786): compile and device stages run on its workers",
    )] = None,
) -> None:
    """Run (or resume) the sweep described by CONFIG."""
    from hailo_sweep.config import check_input_files, load_config

    cfg = load_config(config)
    check_input_files(cfg)  # a wrong path is refused before the heavy imports
    client = None
    if cluster or cfg.cluster.address:
        if jobs != 1:
            raise UserInputError("--jobs runs local worker processes; with a cluster the Dask workers run the trials",
                                 file=config, key="--jobs", fix="drop --jobs, or drop --cluster (and cluster.address)")
        from hailo_sweep.cluster.connect import connect

        # before the heavy imports: an unreachable scheduler is reported after the connect timeout, not that plus them
        client = connect(cfg.cluster.resolved(cfg.source), cluster)  # TLS files relative to the config file
    with contextlib.closing(client) if client is not None else contextlib.nullcontext():
        quiet()
        from hailo_sweep.progress import RichObserver
        from hailo_sweep.sweep import Sweep

        if client is not None:
            from hailo_sweep.commands.run import run_on_cluster

            summary = run_on_cluster(cfg, client, trials, _direction(cfg))
            best_number, best_value = summary.best_number, summary.best_value
        elif jobs == 1:
            with RichObserver(console) as observer:
                observer.set_direction(_direction(cfg))
                summary = Sweep(cfg, observer).run(trials)
            best_number, best_value = summary.best_number, summary.best_value
        else:
            from hailo_sweep.commands.run import run_jobs

            best_number, best_value = run_jobs(cfg, config, trials or cfg.trials, jobs)
    from hailo_sweep.selection import load_study, top_trials

    study, _ = load_study(cfg)
    print_trials(top_trials(study, 5), study.user_attrs.get("objective", {}).get("keys", ["value"])[0])
    if best_number is not None:
        console.print(f"best trial: [bold]{best_number}[/] (value {best_value:.6g})")
    else:
        console.print("[yellow]no feasible completed trial yet[/]")
    hint(("browse the runs", f"ui {config}"), ("export the best", f"best {config} --export {export_dir_for(config)}"))


def export_dir_for(config: Path) -> str:
    """Where the hints (and ``make demo``: ``out/$(basename $(notdir $(CONFIG)))``) export a sweep: out/ + the
    config file's stem, e.g. ``out/digits`` for configs/digits.yaml (the stem does not change when the sweep is renamed)."""
    return f"out/{config.stem}"


@app.command()
@handles_errors
def new(
    model: Annotated[Path, typer.Argument(help="the ONNX model to sweep", show_default=False)],
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="calibration data (.npy/.npz)")] = None,
    evaluation: Annotated[Optional[Path], typer.Option("--evaluation", help="evaluation data (.npz with x and optional labels)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="config to write (default: MODEL.yaml here)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing config", metavar=FLAG)] = False,
) -> None:
    """Write a starter config from MODEL's inputs and outputs (and the data, if given), and check that it loads."""
    from hailo_sweep.scaffold import write_starter

    out = output or Path(f"{model.stem}.yaml")
    cfg = write_starter(model, out, calibration, evaluation, force=force)
    console.print(f"wrote [bold]{out}[/] ({len(cfg.outputs)} outputs); review the normalization, then: hailo-sweep run {out}", soft_wrap=True)


@app.command()
@handles_errors
def init(config: ConfigArg) -> None:
    """Create the study, the MLflow experiment and the parent run once, and enqueue the baseline (before starting workers)."""
    from hailo_sweep.config import check_input_files, load_config

    cfg = load_config(config)
    check_input_files(cfg)  # a wrong path is refused before the heavy imports
    quiet()
    from hailo_sweep.sweep import Sweep

    sweep = Sweep(cfg)
    ids = sweep.init()
    console.print(f"sweep [bold]{ids.study_name}[/] ready: experiment {ids.experiment_id}, parent run {ids.parent_run_id}")
    for line in (f"optuna: {sweep.stores.describe()['optuna_storage']}", f"mlflow: {sweep.stores.describe()['mlflow_tracking_uri']}"):
        console.print(f"  {line}", soft_wrap=True)
    hint(("start workers with", f"worker {config}"))


@app.command()
@handles_errors
def worker(
    config: ConfigArg,
    trials: Annotated[Optional[int], typer.Option("--trials", "-n", min=1, help="total trials for the sweep (default: the config's)")] = None,
    worker_index: Annotated[Optional[int], typer.Option("--worker-index", min=0, help="offsets the sampler seed; default: from the process id")] = None,
) -> None:
    """Join an initialized sweep and run trials until its budget is spent."""
    from hailo_sweep.config import check_input_files, load_config

    cfg = load_config(config)
    check_input_files(cfg)  # a wrong path is refused before the heavy imports
    quiet()
    from hailo_sweep.progress import RichObserver
    from hailo_sweep.sweep import Sweep

    index = worker_index if worker_index is not None else os.getpid() % 100000
    with RichObserver(console) as observer:
        observer.set_direction(_direction(cfg))
        summary = Sweep(cfg, observer, worker_index=index).work(trials)
    console.print(f"worker done: {summary.trials_run} trials run here")


@app.command()
@handles_errors
def finalize(config: ConfigArg) -> None:
    """Select the best feasible trial and register its model with the alias 'best'."""
    from hailo_sweep.config import load_config

    cfg = load_config(config)
    quiet()
    from hailo_sweep.selection import finalize as finalize_sweep

    result = finalize_sweep(cfg)
    console.print(
        f"best trial {result['trial']} (value {result['value']:.6g}): registered model '{result['registered_model']}' "
        f"version {result['version']}, alias best; run {result['run_id']}"
    )


@app.command()
@handles_errors
def diagnose(
    config: ConfigArg,
    trial: Annotated[Optional[int], typer.Option("--trial", "-t", min=0, help="trial number to explain (this or --compiled is required)")] = None,
    compiled: Annotated[Optional[Path], typer.Option("--compiled", help="a compiled model (HEF or int8 ONNX) to run on the config's data (this or --trial is required)")] = None,
    outputs: Annotated[Optional[Path], typer.Option("--outputs", help="with --compiled: .npz of your own device outputs on the evaluation set, one array per output")] = None,
    inputs: Annotated[Optional[Path], typer.Option("--inputs", help="with --compiled: .npy of what your code fed the model")] = None,
    placement: Annotated[Placement, typer.Option(help="with --compiled: where normalization runs")] = Placement.model,
    report: Annotated[Optional[Path], typer.Option("--report", help="where to write the HTML report")] = None,
) -> None:
    """Explain where the error comes from: findings with fixes, the error ladder, per-layer noise; writes an HTML report.

    Give either --trial N (a trial of the sweep) or --compiled FILE (a compiled model, optionally with --outputs and --inputs).
    """
    if (trial is None) == (compiled is None):
        raise UserInputError(
            "diagnose needs exactly one of --trial N or --compiled FILE",
            fix=f"e.g. {self_command()} diagnose {config} --trial 3, or {self_command()} diagnose {config} --compiled model.hef --outputs my_outputs.npz",
        )
    from hailo_sweep.config import check_input_files, load_config

    cfg = load_config(config)
    check_input_files(cfg)  # a wrong path is refused before the heavy imports
    quiet()
    from hailo_sweep.commands.diagnose import diagnose_files, diagnose_trial

    if trial is not None:
        result = diagnose_trial(cfg, trial, report)
    else:
        result = diagnose_files(cfg, compiled=compiled, outputs_file=outputs, inputs_file=inputs, placement=placement.value, report=report)
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


@app.command()
@handles_errors
def best(
    config: ConfigArg,
    export: Annotated[Optional[Path], typer.Option("--export", help="write the chosen compiled model, its script and a manifest here")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="rows in the table")] = 10,
    pick: Annotated[Optional[int], typer.Option("--pick", min=0, help="export this trial instead (e.g. another point of the Pareto front)")] = None,
    allow_infeasible: Annotated[bool, typer.Option("--allow-infeasible", help="let --pick export a trial that misses a constraint (the alias 'best' stays where it is)", metavar=FLAG)] = False,
) -> None:
    """Show the top trials (and the Pareto front); with --export, register the chosen model (alias 'best') and export it."""
    from hailo_sweep.config import check_input_files, load_config

    cfg = load_config(config)
    if export is not None:  # the lock file records the model's and the data's digests
        check_input_files(cfg)
    quiet()
    from hailo_sweep.selection import LOCK_FILE, best_trial, export_best, load_study, log_front, pareto_front, top_trials

    study, stores = load_study(cfg)
    objective_key = study.user_attrs.get("objective", {}).get("keys", ["value"])[0]
    front = pareto_front(study)
    if front:
        print_trials(front, objective_key, title="Pareto front: error vs device throughput")
        plot = log_front(cfg, study, stores, stores.work_dir / "pareto")
        console.print(f"front plot: {plot} (also logged to the sweep's parent run)", soft_wrap=True)
    else:
        print_trials(top_trials(study, top), objective_key)
    if export is not None:
        manifest = export_best(cfg, export, pick, allow_infeasible=allow_infeasible)
        reg = manifest["mlflow"]
        alias = "alias best" if reg.get("alias") else "[yellow]not aliased best: it misses a constraint[/]"
        if pick is not None and reg.get("alias") and manifest["trial"] != (chosen := best_trial(study, cfg).number):
            alias = f"[yellow]alias best moved to this picked trial[/] (the best by the objective is trial {chosen})"
        roles = {"compiled": "the compiled model", "script": "its model script"}
        written = [f"{f['name']} ({roles.get(role, role)})" for role, f in manifest["files"].items()]
        written += ["manifest.json (settings, metrics, how to feed the input and read the outputs)", f"{LOCK_FILE} (what `verify` rebuilds from)"]
        console.print(
            f"exported trial {manifest['trial']} to [bold]{export}[/]: {', '.join(written)}; "
            f"registered model '{reg['registered_model']}' version {reg['version']}, {alias}",
            soft_wrap=True, highlight=False,
        )
        hint(("check that it rebuilds", f"verify {export}"))


@app.command()
@handles_errors
def verify(export_dir: Annotated[Path, typer.Argument(help="a directory written by `best --export`")]) -> None:
    """Rebuild an exported model from its lock file; report whether outputs, metrics and (where deterministic) bytes match."""
    quiet()
    from hailo_sweep.commands.reproduce import verify as verify_export

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
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0, or a port that is taken: a free one is picked)")] = 5000,
) -> None:
    """Start the MLflow UI on the sweep's tracking store and print links to the trial runs, sorted by the objective."""
    from hailo_sweep import ui as ui_mod

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        tracking_uri, experiment = _tracking_of(config)
    except UserInputError as exc:
        raise fail(exc) from None
    if port == 0 or ui_mod.port_in_use(host, port):
        port = ui_mod.free_port(host)
    artifact_root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" if tracking_uri.startswith("sqlite:///") else None
    ui_mod.serve(ui_mod.start(tracking_uri, artifact_root, host=host, port=port), tracking_uri, experiment, console, err_console)


def _tracking_of(config: Path | None) -> tuple[str, str | None]:
    from hailo_sweep.config import load_config
    from hailo_sweep.stores import resolve_stores, sqlite_store_missing

    if config is not None:
        cfg = load_config(config)
        tracking_uri, experiment = resolve_stores(cfg).mlflow_uri, cfg.name
    else:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"
        experiment = None
    if sqlite_store_missing(tracking_uri):
        raise UserInputError(f"no tracking store at {tracking_uri}", file=config, fix=f"run the sweep first: hailo-sweep run {config or 'CONFIG'}")
    return tracking_uri, experiment


@app.command()
@handles_errors
def dashboard(
    config: ConfigArg,
    host: Annotated[str, typer.Option(help="address to bind; keep 127.0.0.1 unless you mean to share it")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (0, or a port that is taken: a free one is picked)")] = 8080,
) -> None:
    r"""Start optuna-dashboard on the sweep's study (install it with: pip install 'hailo-sweep\[dashboard]').

    The dashboard does not read Optuna 5's constraints: feasibility is in MLflow (`_feasible`) and in `best`.
    """
    from hailo_sweep import ui as ui_mod
    from hailo_sweep.config import load_config
    from hailo_sweep.stores import redact_url, resolve_stores, sqlite_store_missing

    cfg = load_config(config)
    url = resolve_stores(cfg).optuna_url
    if sqlite_store_missing(url):
        raise UserInputError(f"no study store at {url}", file=config, fix=f"run the sweep first: hailo-sweep run {config}")
    if port == 0 or ui_mod.port_in_use(host, port):
        port = ui_mod.free_port(host)
    server = ui_mod.start_dashboard(url, host=host, port=port)
    console.print(f"optuna-dashboard on {redact_url(url)}, study [bold]{cfg.name}[/]", highlight=False, soft_wrap=True)
    ui_mod.wait_and_stop(server, f"dashboard: {server.base_url}/dashboard", console, err_console, health_path="/api/meta")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
