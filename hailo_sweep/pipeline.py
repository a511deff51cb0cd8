"""What a sweep computes once, before any trial, with no knowledge of Optuna or MLflow.

``load_inputs`` checks the model, outputs, data and normalization (bad input is refused before anything is written);
``prepare_sweep`` (step 0 of the design's ladder) computes the float reference outputs (cached by content hash) and
lets the backend translate or pre-process the model (cached too). A trial's stages are in ``hailo_sweep.trial``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from hailo_sweep import metrics as m
from hailo_sweep.backends.base import (
    Backend,
    BackendContext,
    ModelIO,
    Normalization,
)
from hailo_sweep.config import SweepConfig
from hailo_sweep.diagnose.findings import Finding, check_calibration_coverage, check_normalization_unset
from hailo_sweep.data import Dataset, check_label_range, feed, load_dataset
from hailo_sweep.errors import UserInputError
from hailo_sweep.model_io import batch_axes, class_counts, file_sha256, output_specs, probe_model, read_model_io, softmax_outputs, with_data_size
from hailo_sweep.reference import reference_outputs
from hailo_sweep.task_metrics import TaskMetric, find, load_task_metrics, stage_task_metrics

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
    fed: dict[str, Any] = field(default_factory=dict, repr=False)  # placement -> trial.Fed, made once (trial.fed_for)

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
    if normalization is None:
        unset = normalization_unset_finding(config.model, outputs, dataset, reference, reference_in)
        if unset is not None:
            prepared.findings.append(unset)
    coverage = check_calibration_coverage(dataset.calibration, dataset.evaluation)
    if coverage is not None:
        prepared.findings.append(coverage)
    if backend is not None:
        prepared.facts.update({f"backend.{k}": v for k, v in backend.prepare().items()})
    prepared.prepare_seconds = time.perf_counter() - start
    return prepared


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


#: labelled samples the float model is run on once more, standardized, when the config sets no normalization
UNSET_SAMPLES = 128
#: calibration samples behind the suggested mean and std
STATS_SAMPLES = 256


def normalization_unset_finding(
    model: Path, outputs: tuple[m.OutputSpec, ...], dataset: Dataset, reference: Mapping[str, np.ndarray], fed: np.ndarray,
) -> Finding | None:
    """Without a normalization: the float model's top-1 accuracy on the first labelled samples as fed, against the same
    samples standardized with the calibration data's per-channel statistics (one float run of at most
    ``UNSET_SAMPLES``); see ``check_normalization_unset``. Silent without class-id labels or a (N, classes) class output."""
    labels = dataset.labels
    name = next((o.name for o in outputs if o.kind in m.CLASS_KINDS and reference[o.name].ndim == 2), None)
    if labels is None or labels.ndim != 1 or name is None or fed.ndim != 4:
        return None
    n = min(len(labels), len(fed), UNSET_SAMPLES)
    calib = dataset.calibration[:STATS_SAMPLES]  # per channel, so that a 480x640 set is not copied to float64 whole
    mean = np.array([calib[:, c].mean(dtype=np.float64) for c in range(calib.shape[1])])
    std = np.array([calib[:, c].std(dtype=np.float64) for c in range(calib.shape[1])])
    if not np.all(std > 0):
        return None
    from hailo_sweep import onnx_runner

    standardized = ((fed[:n] - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    sess = onnx_runner.session(model, onnx_runner.ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    out = onnx_runner.run_chunked(sess, standardized, (name,), batch_axes(outputs))[name]
    as_fed = float(np.mean(np.argmax(reference[name][:n], axis=-1) == labels[:n]))
    after = float(np.mean(np.argmax(out, axis=-1) == labels[:n]))
    return check_normalization_unset(as_fed, after, n, tuple(float(v) for v in mean), tuple(float(v) for v in std), name)
