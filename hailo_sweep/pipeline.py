"""The stage ladder of one sweep and one trial, with no knowledge of Optuna or MLflow.

``prepare_sweep`` runs once per sweep (step 0 of the design's ladder): it checks the model and data, computes the float
reference outputs (cached by content hash) and lets the backend translate or pre-process the model (cached too).
``run_trial`` runs steps 3-6 for one ``Settings``: optimize, emulate, compile, device; every stage timed; a stage that
raises fails only this trial, with the stage and reason in the result. Metrics are computed here from the outputs,
never inside a backend.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hailo_sweep import metrics as m
from hailo_sweep.backends.base import (
    Backend,
    BackendContext,
    CompiledModel,
    DeviceOutputs,
    EmulationContext,
    LayerNoise,
    ModelIO,
    Normalization,
    OptimizedModel,
)
from hailo_sweep.config import DiagnosticsConfig, SweepConfig
from hailo_sweep.diagnose.findings import FINDING_CODES, Evidence, Finding, check_agreement, check_calibration_coverage, run_all
from hailo_sweep.diagnose.ladder import ladder_steps
from hailo_sweep.data import Dataset, check_label_range, feed, load_dataset
from hailo_sweep.device_stage import CONTEXT_NAMES, DEVICE_PREFIX, compare_with_emulation, run_device
from hailo_sweep.errors import UserInputError
from hailo_sweep.model_io import batch_axes, class_counts, file_sha256, output_specs, probe_model, read_model_io, softmax_outputs, with_data_size
from hailo_sweep.reference import reference_outputs
from hailo_sweep.settings import Settings
from hailo_sweep.task_metrics import TaskMetric, find, load_task_metrics, stage_task_metrics

#: metric-key prefix of each emulation context and of the device stage
STAGE_PREFIX = {
    EmulationContext.FP_OPTIMIZED: "fp_optimized",
    EmulationContext.QUANTIZED: "emulated",
    EmulationContext.BIT_EXACT: "bit_exact",
}


@dataclass
class Prepared:
    """Everything a sweep computes once and every trial reads."""

    config: SweepConfig
    model_io: ModelIO
    outputs: tuple[m.OutputSpec, ...]
    dataset: Dataset
    normalization: Normalization | None
    reference: dict[str, np.ndarray]
    model_sha256: str
    work_dir: Path
    prepare_seconds: float
    facts: dict[str, str | float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)  # sweep-wide findings (e.g. calibration coverage)
    task_metrics: tuple[TaskMetric, ...] = ()

    def backend_context(self) -> BackendContext:
        return backend_context(self.config, self.model_io, self.normalization, self.work_dir)

    def stage_metrics(self, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Built-in and task metrics of one stage's outputs against the float reference (keys without the stage)."""
        values = m.stage_metrics(self.reference, outputs, self.outputs, self.dataset.labels)
        values.update(stage_task_metrics(self.task_metrics, self.reference, outputs, self.dataset.task_labels))
        return values

    def per_sample(self, metric: str, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-sample values of ``metric`` (a config metric name such as ``total.nmae`` or ``task.seq_match``)."""
        task = find(self.task_metrics, metric)
        if task is not None:
            return task.per_sample(self.reference, outputs, self.dataset.task_labels)
        return m.per_sample_metric(metric, self.reference, dict(outputs), self.outputs)


def backend_context(config: SweepConfig, model_io: ModelIO, normalization: Normalization | None, work_dir: Path) -> BackendContext:
    """What a backend is built with: the model, the target, its options from the config, and a cache under ``work_dir``."""
    return BackendContext(
        model_path=config.model,
        target=config.target,
        work_dir=work_dir / "backend",
        model_io=model_io,
        normalization=normalization,
        domain=config.data.domain,
        # the device stage's time limit bounds how long a worker waits for a busy device
        options={**config.hailo.model_dump(), "device_stage_timeout_s": config.timeouts.device},
        output_batch_axes=batch_axes(output_specs(config, model_io)),
    )


def load_inputs(config: SweepConfig) -> tuple[ModelIO, tuple[m.OutputSpec, ...], Dataset, Normalization | None]:
    """Check model, outputs, data and normalization; raise ``UserInputError`` before anything is written."""
    model_io = read_model_io(config.model, config_file=config.source)
    outputs = output_specs(config, model_io)
    dataset = load_dataset(config, model_io)
    model_io = with_data_size(model_io, dataset.calibration.shape[1:])
    if dataset.evaluation.shape[2:] != dataset.calibration.shape[2:]:
        raise UserInputError(
            f"the model's input size is dynamic and the data sets disagree: calibration samples are "
            f"{list(dataset.calibration.shape[2:])} (H, W), evaluation samples {list(dataset.evaluation.shape[2:])}",
            file=config.source,
            key="data.evaluation",
            fix="resize both data sets to the one input size the model should be compiled for",
        )
    load_task_metrics(config)  # a missing file or function is refused here, before any store is written
    normalization = None
    if config.normalization is not None:
        channels = int(model_io.input_shape[1])
        mean, std = config.normalization.mean, config.normalization.std
        if len(mean) not in (1, channels):
            raise UserInputError(
                f"normalization has {len(mean)} values but the model input has {channels} channels",
                file=config.source,
                key="normalization",
                fix=f"give 1 or {channels} values for mean and std",
            )
        normalization = Normalization(mean=tuple(mean) * (channels // len(mean)), std=tuple(std) * (channels // len(std)))
    probe = feed(dataset.evaluation[:3], "host", normalization, config.data.domain)
    probe_model(config.model, model_io, outputs, probe, config_file=config.source)
    if dataset.labels is not None:
        _check_labels(config, model_io, outputs, dataset, normalization)
    return model_io, outputs, dataset, normalization


def _check_labels(config: SweepConfig, model_io: ModelIO, outputs: tuple[m.OutputSpec, ...], dataset: Dataset, normalization: Normalization | None) -> None:
    """Class-id labels feed the accuracy metrics of logits and probabilities outputs: refuse class indices outside every such output's classes
    (before any store is written), from the graph's class axis, or from one sample run when that axis is not fixed."""
    logits = [o.name for o in outputs if o.kind in m.CLASS_KINDS]
    if not logits:
        return
    classes = class_counts(config.model, logits)
    unknown = [n for n, c in classes.items() if c is None]
    if unknown:
        from hailo_sweep import onnx_runner

        sess = onnx_runner.session(config.model, onnx_runner.ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sample = feed(dataset.evaluation[:1], "host", normalization, config.data.domain).astype(np.float32)
        probe = onnx_runner.run_chunked(sess, sample, tuple(unknown), batch_axes(outputs))
        classes.update({n: int(probe[n].shape[-1]) for n in unknown})
    check_label_range(dataset.labels, {n: c for n, c in classes.items() if c}, source=config.data.evaluation, config_file=config.source, key="data.labels_key")


def prepare_sweep(config: SweepConfig, work_dir: Path, backend: Backend | None = None) -> Prepared:
    """Step 0: inputs checked, float reference computed (cached), backend prepared (cached)."""
    start = time.perf_counter()
    model_io, outputs, dataset, normalization = load_inputs(config)
    reference_in = feed(dataset.evaluation, "host", normalization, config.data.domain)
    reference, hit = reference_outputs(
        config.model, reference_in, model_io.output_names, work_dir / "reference", batch_axes(outputs)
    )
    prepared = Prepared(
        config=config,
        model_io=model_io,
        outputs=outputs,
        dataset=dataset,
        normalization=normalization,
        reference=reference,
        model_sha256=file_sha256(config.model),
        work_dir=work_dir,
        prepare_seconds=0.0,
        facts={"reference_cache_hit": "true" if hit else "false"},
        task_metrics=load_task_metrics(config),
    )
    prepared.findings.extend(softmax_findings(config.model, outputs))
    coverage = check_calibration_coverage(dataset.calibration, dataset.evaluation)
    if coverage is not None:
        prepared.findings.append(coverage)
    if backend is not None:
        prepared.facts.update({f"backend.{k}": v for k, v in backend.prepare().items()})
    prepared.prepare_seconds = time.perf_counter() - start
    return prepared


# ------------------------------------------------------------------------------------------------------------
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


class StopTrial(Exception):
    """Raised by a checkpoint callback to end a trial early on purpose (e.g. pruning); not a failure.

    ``run_trial`` attaches what the trial measured so far as ``result`` before re-raising.
    """

    result: TrialResult | None = None


StageHook = Callable[[str], None]
Checkpoint = Callable[[str, TrialResult, dict[str, np.ndarray]], None]


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


@contextmanager
def time_limit(stage: str, seconds: float | None) -> Iterator[None]:
    """Raise ``StageTimeout`` in this thread if the block runs longer than ``seconds`` (SIGALRM; main thread only).

    Python code (and native code that returns to the interpreter) is interrupted; a native call that never returns
    is not, which is why device runs also carry their own runtime timeout.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise StageTimeout(f"stage '{stage}' exceeded its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Ladder:
    def __init__(self, result: TrialResult, on_stage: StageHook | None, timeouts: Mapping[str, float | None]):
        self.result = result
        self.on_stage = on_stage
        self.timeouts = timeouts

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage is not None:
            self.on_stage(name)
        start = time.perf_counter()
        ok = False
        try:
            with time_limit(name, self.timeouts.get(name)):
                yield
            ok = True
        finally:
            self.result.timings.append(StageTiming(name, time.perf_counter() - start, ok))


def run_trial(
    prepared: Prepared,
    backend: Backend,
    settings: Settings,
    work_dir: Path,
    *,
    on_stage: StageHook | None = None,
    checkpoint: Checkpoint | None = None,
    timeouts: Mapping[str, float | None] | None = None,
    diagnostics: DiagnosticsConfig | None = None,
) -> TrialResult:
    """Optimize, emulate, compile and run on the device; never raises for a stage failure (see ``TrialResult.error``).

    ``checkpoint(stage, result, outputs)`` is called after the emulation stage with the quantized emulation's outputs;
    it may raise ``StopTrial`` to skip the rest (pruning).
    """
    result = TrialResult(settings=settings)
    ladder = _Ladder(result, on_stage, timeouts or {})
    cfg = prepared.config
    ds = prepared.dataset
    # the whole calibration set: settings.calibset_size says how many entries to calibrate on (Backend.optimize)
    calib = feed(ds.calibration, settings.normalization_placement, prepared.normalization, cfg.data.domain)
    evaluation = feed(ds.evaluation, settings.normalization_placement, prepared.normalization, cfg.data.domain)
    stage = "optimize"
    try:
        backend.validate(settings)
        with ladder.stage("optimize"):
            optimized = backend.optimize(settings, calib, work_dir)
        result.script, result.script_name = optimized.script, optimized.script_name
        result.params.update(optimized.params)
        result.flags.extend(optimized.flags)

        stage = "emulate"
        emulations: dict[EmulationContext, dict[str, np.ndarray]] = {}
        with ladder.stage("emulate"):
            for context in backend.emulation_contexts():
                emulations[context] = backend.emulate(optimized, evaluation, context)
                _measure(result, STAGE_PREFIX[context], prepared, emulations[context])
        emulated = emulations.get(EmulationContext.QUANTIZED)
        if checkpoint is not None and emulated is not None:
            checkpoint("emulate", result, emulated)

        stage = "compile"
        with ladder.stage("compile"):
            compiled = backend.compile(optimized, work_dir)
        result.compiled = compiled
        result.params.update(compiled.params)
        result.metrics["compile.size_bytes"] = float(compiled.size_bytes)

        stage = "device"
        diag = diagnostics or DiagnosticsConfig()
        with ladder.stage("device"):
            dev, repeat = run_device(backend, compiled, evaluation, diag.determinism_samples, result.notes, result.metrics)
        _measure(result, DEVICE_PREFIX, prepared, dev.outputs)
        result.metrics.update({f"{DEVICE_PREFIX}.{k}": float(v) for k, v in dev.metrics.items()})
        result.notes.extend(dev.notes)
        reference = compare_with_emulation(prepared.outputs, emulations, dev, result.metrics, result.params, result.lsb_histograms)
        with ladder.stage("diagnose"):
            try:
                _diagnose(result, prepared, backend, optimized, settings, evaluation, dev, repeat, diag, reference)
            except Exception as exc:  # the trial's measurements stand; only the explanation is missing
                result.notes.append(f"diagnosis incomplete: {type(exc).__name__}: {exc}")
    except StopTrial as stop:
        stop.result = result
        raise
    except Exception as exc:  # a stage failure ends this trial only, with the reason on record
        result.failed_stage = stage
        timeout = _stage_timeout(exc)
        result.error = f"StageTimeout: {timeout}" if timeout is not None else f"{type(exc).__name__}: {exc}"
        result.traceback = traceback.format_exc()
    finally:  # also for a stopped (pruned) trial: the stages it ran are on record
        for timing in result.timings:
            result.metrics[f"time.{timing.name}_s"] = timing.seconds
        result.logs = sorted(Path(work_dir).glob("*.log")) if Path(work_dir).is_dir() else []
    return result


def softmax_findings(model: Path, outputs: tuple[m.OutputSpec, ...]) -> list[Finding]:
    """A ``kind: logits`` output that the model already computes with a Softmax gets a second softmax: say so."""
    return [
        Finding(
            code="softmax_as_logits",
            title=f"Output '{name}' is declared logits but is already a softmax",
            message=(
                f"the model computes {name!r} with a Softmax, but the config declares it kind: logits, so the class "
                "metrics apply a second softmax (softmax_mae then understates the probability error)"
            ),
            fix=f"declare outputs: {{{name!r}: {{kind: probabilities}}}} (top-1 agreement and prob_mae, no second softmax)",
            severity="warning",
            output=name,
        )
        for name in softmax_outputs(model, outputs)
    ]


def _measure(result: TrialResult, prefix: str, prepared: Prepared, outputs: dict[str, np.ndarray]) -> None:
    values = prepared.stage_metrics(outputs)
    result.metrics.update({f"{prefix}.{k}": v for k, v in values.items()})


def _diagnose(
    result: TrialResult,
    prepared: Prepared,
    backend: Backend,
    optimized: OptimizedModel,
    settings: Settings,
    evaluation: np.ndarray,
    dev: DeviceOutputs,
    repeat: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    diag: DiagnosticsConfig,
    reference: EmulationContext | None = None,
) -> None:
    """Where the error comes from: ladder steps, per-layer noise, and the findings of every check with evidence."""
    names = [o.name for o in prepared.outputs]
    result.metrics.update(ladder_steps(result.metrics, names))
    if diag.layer_noise == "per_trial":
        try:
            result.layer_noise = backend.layer_noise(optimized, evaluation[: diag.layer_noise_samples])
        except NotImplementedError as exc:
            result.notes.append(str(exc))
        except Exception as exc:  # the analysis is an explanation, not a measurement: the findings still run
            result.notes.append(f"per-layer noise analysis failed: {type(exc).__name__}: {str(exc)[:500]}")
        for rank, layer in enumerate(result.layer_noise[:3]):
            result.metrics[f"layer_noise.worst{rank + 1}_snr_db"] = layer.snr_db
    cfg = prepared.config
    evidence = Evidence(
        fed=evaluation,
        placement=settings.normalization_placement,
        normalization=prepared.normalization,
        domain=cfg.data.domain,
        candidate=dev.outputs,
        reference=prepared.reference,
        raw={k: v for k, v in dev.raw.items()},
        quant=dev.quant,
        requested_optimization_level=settings.optimization_level,
        params=result.params,
        flags=result.flags,
        repeat=repeat,
    )
    found = run_all(evidence)
    for spec in prepared.outputs:  # tolerances are in 8-bit LSB; a 16-bit output's step is 256x finer
        quant = dev.quant.get(spec.name)
        wide = quant is not None and quant.bits > 8
        tolerance = diag.lsb_tolerance * (256 if wide else 1)
        found.extend(
            check_agreement(
                result.metrics, [spec.name], tolerance, 0.0 if wide else diag.identical_min,
                reference=CONTEXT_NAMES[reference] if reference is not None else "emulation",
            )
        )
    found.extend(prepared.findings)
    result.findings = found
    result.metrics["findings.count"] = float(len(found))
    for code in FINDING_CODES:  # each finding can be a constraint of the sweep, e.g. findings.device_disagrees max 0
        result.metrics[f"findings.{code}"] = float(sum(f.code == code for f in found))
