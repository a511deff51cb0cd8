"""``hailo-sweep diagnose``: explain one trial, or a compiled model and the outputs a user's own code produced.

Two modes:
- a trial of a sweep (``--trial N``): its settings are run again through the stage ladder with every diagnostic on, the
  report is written and logged to the trial's MLflow run;
- a compiled model and/or outputs from the user's pipeline (``--compiled``, ``--outputs``, ``--inputs``): the outputs are
  compared with the float model on the config's evaluation data, and every check that has evidence runs. This is the
  user-story case: "the emulator is fine but the chip is not".
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from hailo_sweep import metrics as m
from hailo_sweep.backends import select_backend
from hailo_sweep.backends.base import CompiledModel, QuantParams
from hailo_sweep.config import SweepConfig, check_file
from hailo_sweep.data import feed, load_array, open_data_file
from hailo_sweep.diagnose.findings import Evidence, Finding, run_all
from hailo_sweep.diagnose.ladder import explain
from hailo_sweep.diagnose.report import render_report, write_report
from hailo_sweep.errors import RunFailed, UserInputError
from hailo_sweep.device_stage import DEVICE_PREFIX
from hailo_sweep.pipeline import prepare_sweep
from hailo_sweep.trial import run_trial
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.stores import resolve_stores
from hailo_sweep.tracking import Tracker


@dataclass
class Diagnosis:
    title: str
    findings: list[Finding]
    explanation: list[str]
    report: Path
    metrics: dict[str, float] = field(default_factory=dict)
    logged_to_run: str | None = None


def diagnose_trial(config: SweepConfig, number: int, report: Path | None = None) -> Diagnosis:
    """Re-run trial ``number``'s settings with every diagnostic and write (and log) the HTML report."""
    from hailo_sweep.selection import load_study

    study, stores = load_study(config)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserInputError(
            f"sweep '{config.name}' has no trial {number} (it has {len(trials)} trials)", file=config.source,
            fix=f"pick one of the trial numbers shown by `hailo-sweep best {config.source}`",
        )
    trial = trials[number]
    backend_cls, _ = select_backend(config.backend)
    with tempfile.TemporaryDirectory(prefix="hailo-sweep-diagnose-") as tmp:
        work = Path(tmp)
        prepared = prepare_sweep(config, stores.work_dir)
        backend = backend_cls(prepared.backend_context())
        space = SearchSpace(config.search, prepared.model_io.output_names, config.source)
        settings = space.settings_from_params(dict(trial.params))
        with backend:
            prepared.facts.update(backend.prepare())
            on_demand = config.diagnostics.model_copy(update={"layer_noise": "per_trial"})  # asked for: every diagnostic runs
            result = run_trial(prepared, backend, settings, work, diagnostics=on_demand, timeouts=config.timeouts.model_dump())
        if not result.ok:
            reason = (result.error or "no reason given").splitlines()[0]
            raise RunFailed(f"trial {number} failed again at run time, in stage {result.failed_stage}: {reason}")
        outputs = [o.name for o in prepared.outputs]
        title = f"{config.name}: trial {number}"
        html = render_report(
            title=title, settings=result.settings.as_params(), metrics=result.metrics, outputs=outputs,
            findings=result.findings, lsb_histograms=result.lsb_histograms, layer_noise=result.layer_noise,
            notes=result.notes, work_dir=work,
        )
        path = write_report(report or stores.work_dir / "diagnose" / f"trial-{number:04d}.html", html)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        Tracker(stores.mlflow_uri, config.name, stores.artifact_location).client.log_artifact(run_id, str(path), artifact_path="diagnosis")
    return Diagnosis(title, result.findings, explain(result.metrics, outputs), path, result.metrics, run_id)


def diagnose_files(
    config: SweepConfig,
    *,
    compiled: Path | None,
    outputs_file: Path | None,
    inputs_file: Path | None,
    placement: str,
    report: Path | None = None,
) -> Diagnosis:
    """Check a compiled model and/or the outputs (and inputs) of the user's own pipeline against the float model."""
    if compiled is None and outputs_file is None:
        raise UserInputError("nothing to diagnose", fix="pass --trial N, or --compiled FILE and/or --outputs FILE.npz")
    if compiled is not None:  # the user's files are refused before anything is computed
        compiled = check_file(compiled, what="compiled model", key="--compiled", fix="pass a compiled model file (a .hef, or the int8 .onnx of the onnxruntime backend)")
    stores = resolve_stores(config)
    prepared = prepare_sweep(config, stores.work_dir)
    names = [o.name for o in prepared.outputs]
    candidate = _load_outputs(outputs_file, names) if outputs_file is not None else None
    fed = feed(prepared.dataset.evaluation, placement, prepared.normalization, config.data.domain)  # type: ignore[arg-type]
    evidence = Evidence(reference=prepared.reference, domain=config.data.domain, normalization=prepared.normalization, placement=placement)  # type: ignore[arg-type]
    metrics: dict[str, float] = {}
    notes: list[str] = []
    quant: dict[str, QuantParams] = {}
    if inputs_file is not None:
        user_inputs = load_array(inputs_file, config.data.inputs_key, config_file=None, config_key="--inputs")
        evidence.fed = user_inputs
        evidence.data_shape = tuple(user_inputs.shape)
        evidence.model_input_shape = prepared.model_io.input_shape
        evidence.declared_layout = "NCHW"
    if compiled is not None:
        backend_cls, _ = select_backend(config.backend)
        backend = backend_cls(prepared.backend_context())
        artifact = CompiledModel(path=compiled, size_bytes=compiled.stat().st_size, kind=backend_cls.compiled_kind)
        with backend, contextlib.ExitStack() as stack:
            try:  # loading and a first run: a file this backend cannot run is bad input, refused with the reason
                runner = stack.enter_context(backend.device(artifact))
                dev = runner.run(fed)
            except Exception as exc:  # noqa: BLE001  (onnxruntime, HailoRT and protobuf each raise their own types)
                raise UserInputError(
                    f"{compiled.name} cannot be run by the {backend_cls.name} backend ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})",
                    key="--compiled", fix=f"pass a {backend_cls.compiled_kind} file compiled by hailo-sweep (e.g. from `hailo-sweep best CONFIG --export DIR`) for this model",
                ) from None
            again = runner.run(fed[: max(1, config.diagnostics.determinism_samples)])
        quant = dict(dev.quant)
        notes.extend(dev.notes)
        values = m.stage_metrics(prepared.reference, dev.outputs, prepared.outputs, prepared.dataset.labels)
        metrics.update({f"{DEVICE_PREFIX}.{k}": v for k, v in values.items()})
        metrics.update({f"{DEVICE_PREFIX}.{k}": float(v) for k, v in dev.metrics.items()})
        evidence.raw, evidence.quant = dev.raw, quant
        evidence.repeat = ({k: v[: len(next(iter(again.raw.values())))] for k, v in dev.raw.items()}, again.raw)
        if compiled.suffix == ".onnx":
            evidence.expected_input_dtype = _onnx_input_dtype(compiled)
            if evidence.fed is None:
                evidence.fed = fed
    if candidate is not None:
        evidence.candidate = candidate
        if quant:
            evidence.quant = quant
        try:
            values = m.stage_metrics(prepared.reference, {k: v.astype(np.float32) for k, v in candidate.items()}, prepared.outputs, prepared.dataset.labels)
            metrics.update({f"yours.{k}": v for k, v in values.items()})
        except ValueError as exc:
            notes.append(f"your outputs could not be compared directly: {exc}")
    findings = run_all(evidence) + prepared.findings
    title = f"{config.name}: " + ", ".join(p.name for p in (compiled, outputs_file) if p is not None)
    with tempfile.TemporaryDirectory(prefix="hailo-sweep-diagnose-") as tmp:
        html = render_report(
            title=title, settings={"normalization_placement": placement, "compiled": str(compiled), "outputs": str(outputs_file)},
            metrics=metrics, outputs=names, findings=findings, lsb_histograms={}, layer_noise=[], notes=notes, work_dir=Path(tmp),
        )
        path = write_report(report or stores.work_dir / "diagnose" / "files.html", html)
    ladder = explain(metrics, names) if any(k.startswith("emulated.") for k in metrics) else []  # no emulation here
    return Diagnosis(title, findings, ladder, path, metrics)


def _onnx_input_dtype(path: Path) -> str:
    elem = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.elem_type
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _load_outputs(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The user's outputs: an .npz with one array per ONNX output name (never unpickled)."""
    check_file(path, what="outputs file", key="--outputs", fix=f"pass an .npz written with np.savez(path, {'=..., '.join(names)}=...)")
    if path.suffix != ".npz":
        raise UserInputError(f"{path.name}: outputs must be an .npz with one array per output", key="--outputs", fix=f"np.savez(path, {'=..., '.join(names)}=...)")
    with open_data_file(path, config_file=None, config_key="--outputs") as data:  # headers checked, never unpickled
        missing = [n for n in names if n not in data.files]
        if missing:
            raise UserInputError(
                f"{path.name} has no array for output(s) {', '.join(missing)} (it has: {', '.join(data.files)})", key="--outputs",
                fix="name the arrays after the model's ONNX outputs",
            )
        try:
            outputs = {n: data[n] for n in names}
        except (ValueError, OSError, EOFError) as exc:
            raise UserInputError(f"cannot read {path.name}: {exc}", key="--outputs", fix="re-save the outputs with numpy.savez") from None
    bad = [n for n, v in outputs.items() if v.dtype.kind not in "uifb"]
    if bad:
        raise UserInputError(f"{path.name}: output(s) {', '.join(bad)} are not numeric arrays", key="--outputs", fix="save the raw numeric outputs")
    return outputs
