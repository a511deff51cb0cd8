"""One trial's stage ladder, with no knowledge of Optuna or MLflow.

Three parts, so that they can run on different machines (``hailo_sweep.cluster``) or in one process (``run_trial``):
``build`` runs where the toolchain is (optimize, emulate, compile; per-layer noise when asked per trial), the device
step runs where the device is (``device_stage.run_device``), and ``measure_emulations`` / ``assess`` turn outputs into
metrics and findings against the float reference. Every stage is timed; a stage that raises fails only this trial,
with the stage and reason in the result. Metrics are computed here from the outputs, never inside a backend.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hailo_sweep.backends.base import Backend, DeviceOutputs, EmulationContext, LayerNoise, OptimizedModel
from hailo_sweep.config import DiagnosticsConfig
from hailo_sweep.data import feed
from hailo_sweep.device_stage import CONTEXT_NAMES, DEVICE_PREFIX, Repeat, compare_with_emulation, run_device
from hailo_sweep.diagnose.findings import FINDING_CODES, Evidence, Finding, check_agreement, run_all
from hailo_sweep.diagnose.ladder import ladder_steps
from hailo_sweep.pipeline import Prepared
from hailo_sweep.settings import Settings
from hailo_sweep.trial_result import StageTimeout, StageTiming, TrialResult

#: metric-key prefix of each emulation context and of the device stage
STAGE_PREFIX = {
    EmulationContext.FP_OPTIMIZED: "fp_optimized",
    EmulationContext.QUANTIZED: "emulated",
    EmulationContext.BIT_EXACT: "bit_exact",
}

Emulations = dict[EmulationContext, dict[str, np.ndarray]]


class StopTrial(Exception):
    """Raised by a checkpoint callback to end a trial early on purpose (e.g. pruning); not a failure.

    ``run_trial`` attaches what the trial measured so far as ``result`` before re-raising.
    """

    result: TrialResult | None = None


StageHook = Callable[[str], None]
Checkpoint = Callable[[str, TrialResult, dict[str, np.ndarray]], None]


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


class Ladder:
    """Times each stage of one trial into its result, under the stage's time limit."""

    def __init__(self, result: TrialResult, on_stage: StageHook | None, timeouts: Mapping[str, float | None]):
        self.result = result
        self.on_stage = on_stage
        self.timeouts = timeouts
        self.current = "optimize"  # the stage in progress, or the last one entered

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
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


@dataclass
class Fed:
    """The calibration and evaluation sets as the model of one trial is fed (normalization on host or in the model)."""

    calibration: np.ndarray
    evaluation: np.ndarray
    #: what the checks of the fed data found: the same in every trial of the placement, so checked once (``fed_for``)
    input_findings: list[Finding] = field(default_factory=list)
    input_check_error: str | None = None  # a check that raised: said in every trial's notes, never a failure


def fed_for(prepared: Prepared, placement: str) -> Fed:
    """The data sets as fed for a normalization placement, and what the checks of the fed data found; made once per
    sweep and placement, read-only (every trial of the sweep, and the cluster's scatter, read the same arrays; a
    backend that needs another form copies)."""
    fed = prepared.fed.get(placement)
    if fed is None:
        ds, norm, domain = prepared.dataset, prepared.normalization, prepared.config.data.domain
        # the whole calibration set: settings.calibset_size says how many entries to calibrate on (Backend.optimize)
        evaluation = feed(ds.evaluation, placement, norm, domain)
        fed = Fed(feed(ds.calibration, placement, norm, domain), evaluation)
        try:
            fed.input_findings = run_all(Evidence(fed=evaluation, placement=placement, normalization=norm, domain=domain))  # type: ignore[arg-type]
        except Exception as exc:  # an explanation, not a measurement
            fed.input_check_error = f"checks of the fed data failed: {type(exc).__name__}: {str(exc)[:300]}"
        for array in (fed.calibration, fed.evaluation):
            array.flags.writeable = False
        prepared.fed[placement] = fed
    return fed


def feed_placements(prepared: Prepared, backend: Backend | None, placements: Sequence[str]) -> tuple[float, list[str]]:
    """Before the first trial: the fed data of every placement (``fed_for``), each shown to the backend
    (``Backend.expect_inputs``) when it runs here. Returns the seconds this took, the sweep's preparation, and a note
    for each placement whose look-ahead raised (the trials then compute what they need themselves)."""
    start = time.perf_counter()
    notes: list[str] = []
    for placement in placements:
        fed = fed_for(prepared, placement)
        if backend is None:
            continue
        try:
            backend.expect_inputs(placement, fed.evaluation)
        except Exception as exc:  # an optimization only: the trial does the same work lazily and reports its failure
            notes.append(f"note: preparing the {placement}-normalized inputs ahead of the trials failed "
                         f"({type(exc).__name__}: {str(exc)[:200]}); each trial computes what it needs")
    return time.perf_counter() - start, notes


def build(
    backend: Backend,
    settings: Settings,
    fed: Fed,
    work_dir: Path,
    ladder: Ladder,
    *,
    after_emulate: Callable[[Emulations], None] | None = None,
    layer_noise_samples: int = 0,
) -> tuple[OptimizedModel, Emulations]:
    """The stages that need the toolchain: optimize, emulate (every context the backend has), compile; with
    ``layer_noise_samples``, per-layer noise too. Fills the result's script, params, flags and compiled model; raises
    what a stage raised (``ladder.result.failed_stage`` is not set here: the caller knows the stage from the ladder)."""
    result = ladder.result
    backend.validate(settings)
    with ladder.stage("optimize"):
        optimized = backend.optimize(settings, fed.calibration, work_dir)
    result.script, result.script_name = optimized.script, optimized.script_name
    result.params.update(optimized.params)
    result.flags.extend(optimized.flags)
    emulations: Emulations = {}
    with ladder.stage("emulate"):
        for context in backend.emulation_contexts():
            emulations[context] = backend.emulate(optimized, fed.evaluation, context)
    if after_emulate is not None:
        after_emulate(emulations)
    with ladder.stage("compile"):
        compiled = backend.compile(optimized, work_dir)
    result.compiled = compiled
    result.params.update(compiled.params)
    result.metrics["compile.size_bytes"] = float(compiled.size_bytes)
    if layer_noise_samples:
        with ladder.stage("layer_noise"):
            result.layer_noise = layer_noise(backend, optimized, fed.evaluation[:layer_noise_samples], result.notes)
    return optimized, emulations


def layer_noise(backend: Backend, optimized: OptimizedModel, inputs: np.ndarray, notes: list[str]) -> list[LayerNoise]:
    """Per-layer noise, worst first; a backend without it, or an analysis that fails, leaves a note (an explanation,
    not a measurement: the trial stands)."""
    try:
        return backend.layer_noise(optimized, inputs)
    except NotImplementedError as exc:
        notes.append(str(exc))
    except Exception as exc:
        notes.append(f"per-layer noise analysis failed: {type(exc).__name__}: {str(exc)[:500]}")
    return []


def measure_emulations(result: TrialResult, prepared: Prepared, emulations: Emulations) -> None:
    for context, outputs in emulations.items():
        _measure(result, STAGE_PREFIX[context], prepared, outputs)


def assess(
    result: TrialResult,
    prepared: Prepared,
    settings: Settings,
    fed: Fed,
    emulations: Emulations,
    dev: DeviceOutputs,
    repeat: Repeat | None,
    diag: DiagnosticsConfig,
) -> None:
    """The device's outputs against the float reference and the emulation, then where the error comes from."""
    _measure(result, DEVICE_PREFIX, prepared, dev.outputs)
    result.metrics.update({f"{DEVICE_PREFIX}.{k}": float(v) for k, v in dev.metrics.items()})
    result.notes.extend(dev.notes)
    reference = compare_with_emulation(prepared.outputs, emulations, dev, result.metrics, result.params, result.lsb_histograms)
    try:
        _diagnose(result, prepared, settings, fed, dev, repeat, diag, reference)
    except Exception as exc:  # the trial's measurements stand; only the explanation is missing
        result.notes.append(f"diagnosis incomplete: {type(exc).__name__}: {exc}")


def finalize(result: TrialResult, work_dir: Path) -> None:
    """Stage times as metrics, and the toolchain's logs; also for a stopped (pruned) or failed trial."""
    for timing in result.timings:
        result.metrics[f"time.{timing.name}_s"] = timing.seconds
    result.logs = sorted(Path(work_dir).glob("*.log")) if Path(work_dir).is_dir() else []


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
    """Optimize, emulate, compile and run on the device in this process; never raises for a stage failure (see
    ``TrialResult.error``).

    ``checkpoint(stage, result, outputs)`` is called after the emulation stage with the quantized emulation's outputs;
    it may raise ``StopTrial`` to skip the rest (pruning).
    """
    result = TrialResult(settings=settings)
    ladder = Ladder(result, on_stage, timeouts or {})
    diag = diagnostics or DiagnosticsConfig()
    fed = fed_for(prepared, settings.normalization_placement)

    def after_emulate(emulations: Emulations) -> None:
        measure_emulations(result, prepared, emulations)
        emulated = emulations.get(EmulationContext.QUANTIZED)
        if checkpoint is not None and emulated is not None:
            checkpoint("emulate", result, emulated)

    try:
        _, emulations = build(
            backend, settings, fed, work_dir, ladder, after_emulate=after_emulate,
            layer_noise_samples=diag.layer_noise_samples if diag.layer_noise == "per_trial" else 0,
        )
        assert result.compiled is not None
        with ladder.stage("device"):
            dev, repeat = run_device(backend.device_spec(result.compiled), result.compiled.path, fed.evaluation,
                                     diag.determinism_samples, result.notes, result.metrics)
        with ladder.stage("diagnose"):
            assess(result, prepared, settings, fed, emulations, dev, repeat, diag)
    except StopTrial as stop:
        stop.result = result
        raise
    except Exception as exc:  # a stage failure ends this trial only, with the reason on record
        result.fail(ladder.current, exc)
    finally:  # also for a stopped (pruned) trial: the stages it ran are on record
        finalize(result, work_dir)
    return result
def _measure(result: TrialResult, prefix: str, prepared: Prepared, outputs: dict[str, np.ndarray]) -> None:
    values = prepared.stage_metrics(outputs)
    result.metrics.update({f"{prefix}.{k}": v for k, v in values.items()})


def _diagnose(
    result: TrialResult,
    prepared: Prepared,
    settings: Settings,
    fed: Fed,
    dev: DeviceOutputs,
    repeat: Repeat | None,
    diag: DiagnosticsConfig,
    reference: EmulationContext | None = None,
) -> None:
    """Where the error comes from: ladder steps, the worst layers (when analysed), and the findings of every check."""
    names = [o.name for o in prepared.outputs]
    result.metrics.update(ladder_steps(result.metrics, names))
    for rank, layer in enumerate(result.layer_noise[:3]):
        result.metrics[f"layer_noise.worst{rank + 1}_snr_db"] = layer.snr_db
    evidence = Evidence(
        candidate=dev.outputs,
        reference=prepared.reference,
        raw={k: v for k, v in dev.raw.items()},
        quant=dev.quant,
        requested_optimization_level=settings.optimization_level,
        params=result.params,
        flags=result.flags,
        repeat=repeat,
    )
    found = [*fed.input_findings, *run_all(evidence)]
    if fed.input_check_error:
        result.notes.append(fed.input_check_error)
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
