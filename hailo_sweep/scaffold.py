"""``hailo-sweep new``: a starter sweep config written from the model's own inputs and outputs, validated at once.

What is read: the model's input (name, channels, fixed or dynamic size), its outputs (names, shapes, the node that
produces each, looking through ``Identity`` pass-throughs) and, when given, the calibration and evaluation files
(layout, value range, sample count, a labels array). What is guessed: each output's ``kind`` (``probabilities`` when a
Softmax produces it, ``logits`` for a 2-D ``(N, C)`` output, else a plain tensor), a batch axis other than 0 when an
output carries the input's symbolic batch dimension elsewhere, and a search space whose ``calibset_size`` choices fit
the calibration set. What cannot be known (the normalization the model was trained with) is left as a commented line.
The written file is loaded with the config loader (and, when both data files exist, checked against the model) before
this returns; a file that does not load is removed and the problem reported.
"""

from __future__ import annotations

import json
import os
import re
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from hailo_sweep.config import DataConfig, OutputConfig, SweepConfig, load_config
from hailo_sweep.data import load_array
from hailo_sweep.errors import UserInputError
from hailo_sweep.model_io import read_model_io

CALIBSET_CHOICES = (64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class OutputGuess:
    name: str
    shape: tuple[int | str, ...]
    producer: str  # op type of the node that computes it (Identity chains followed)
    kind: str | None  # None: a plain tensor
    batch_axis: int | None  # None: axis 0


@dataclass(frozen=True)
class DataGuess:
    path: Path
    count: int
    layout: str
    domain: tuple[float, float]
    inputs_key: str
    sample_shape: tuple[int, int, int]  # one sample, in the file's layout
    labels_key: str | None = None


def _supported(field: str, value: object) -> bool:
    """Whether this version of the config accepts ``outputs.<name>.<field>: value`` (kinds and keys evolve)."""
    info = OutputConfig.model_fields.get(field)
    if info is None:
        return False
    args = typing.get_args(info.annotation)
    return value in args if args and all(isinstance(a, str) for a in args) else True


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim)


def guess_outputs(model: onnx.ModelProto) -> list[OutputGuess]:
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    input_batch = None
    initializers = {i.name for i in graph.initializer}
    for vi in graph.input:
        if vi.name not in initializers and vi.type.tensor_type.shape.dim:
            first = vi.type.tensor_type.shape.dim[0]
            input_batch = first.dim_param or None
            break
    guesses = []
    for out in graph.output:
        node = producer.get(out.name)
        while node is not None and node.op_type == "Identity" and node.input and node.input[0] in producer:
            node = producer[node.input[0]]
        op = node.op_type if node is not None else "?"
        shape = _dims(out)
        kind = None
        if op == "Softmax" and _supported("kind", "probabilities"):
            kind = "probabilities"
        elif len(shape) == 2 and isinstance(shape[1], int) and op != "Softmax":
            kind = "logits"
        batch_axis = None
        if input_batch and input_batch in shape[1:] and shape[0] != input_batch and _supported("batch_axis", 1):
            batch_axis = shape.index(input_batch)
        guesses.append(OutputGuess(name=out.name, shape=shape, producer=op, kind=kind, batch_axis=batch_axis))
    return guesses


def probe_batch_axes(model: Path, input_shape: tuple[int | str, ...], input_name: str) -> dict[str, int]:
    """Outputs whose samples are not on axis 0, found by running the float model on zeros (declared shapes can lie:
    ddddocr declares ``(1, seqlen)`` and returns ``(T, 1, C)``). Only an unambiguous axis is reported."""
    import onnxruntime as ort

    from hailo_sweep.onnx_runner import declared_batch, session

    fed = declared_batch(input_shape) or 2
    shape = (fed, *(int(d) for d in input_shape[1:]))
    sess = session(model, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    dtype = np.uint8 if sess.get_inputs()[0].type == "tensor(uint8)" else np.float32
    values = sess.run(None, {input_name: np.zeros(shape, dtype)})
    axes = {}
    for out, value in zip(sess.get_outputs(), values):
        dims = np.shape(value)
        if dims and dims[0] == fed:
            continue
        holding = [a for a, size in enumerate(dims) if size == fed]
        if len(holding) == 1:
            axes[out.name] = holding[0]
    return axes


def guess_data(path: Path, channels: int, *, key: str) -> DataGuess:
    """Layout, value range and size of a data file, from its first array (``x`` if present)."""
    inputs_key, labels_key = "x", None
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
        inputs_key = "x" if "x" in names else (names[0] if names else "x")
        for name in ("y", "labels", "label"):
            if name in names and name != inputs_key:
                labels_key = name
                break
    arr = load_array(path, inputs_key, config_file=None, config_key=key)
    if arr.ndim == 4 and arr.shape[1] == channels and arr.shape[-1] != channels:
        layout = "NCHW"
    elif arr.ndim == 4 and arr.shape[-1] == channels:
        layout = "NHWC"
    else:
        raise UserInputError(
            f"{path.name} has shape {arr.shape}; expected a batch of images with {channels} channel(s), NCHW or NHWC",
            key=key,
            fix=f"save the samples as (N, H, W, {channels}) or (N, {channels}, H, W)",
        )
    if arr.dtype == np.uint8:
        domain = (0.0, 255.0)
    else:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        domain = (float(np.floor(lo)), float(np.ceil(hi)) if np.ceil(hi) > np.floor(lo) else float(np.floor(lo)) + 1.0)
    if labels_key is not None:
        with np.load(path, allow_pickle=False) as npz:
            labels = npz[labels_key]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":  # other labels need a task metric (metrics:) to read them
            labels_key = None
    return DataGuess(
        path=path, count=int(arr.shape[0]), layout=layout, domain=domain, inputs_key=inputs_key,
        sample_shape=tuple(int(d) for d in arr.shape[1:]), labels_key=labels_key,  # type: ignore[arg-type]
    )


def ref_size(ref: DataGuess | None, input_shape: tuple[int | str, ...]) -> tuple[int, int, int]:
    """C, H, W of one sample: the model's where fixed, else the data's."""
    if ref is None:
        return tuple(int(d) for d in input_shape[1:])  # type: ignore[return-value]
    arr_shape = ref.sample_shape
    return arr_shape if ref.layout == "NCHW" else (arr_shape[2], arr_shape[0], arr_shape[1])


def _name(model: Path) -> str:
    stem = model.stem if model.stem.lower() != "model" else f"{model.parent.name}-{model.stem}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "model"
    return name if name[0].isalnum() else f"m{name}"


def _rel(path: Path, base: Path) -> str:
    """Relative to the config's directory when close by (configs move with their data), else absolute."""
    try:
        rel = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())
    return rel if Path(rel).parts[:3].count("..") < 3 else str(path.resolve())


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar: numeric or dotted names stay strings


def render(model: Path, out: Path, calibration: Path | None, evaluation: Path | None) -> str:
    """The starter config's text."""
    io = read_model_io(model)
    proto = onnx.load(str(model), load_external_data=False)
    channels = int(io.input_shape[1])
    outputs = guess_outputs(proto)
    base = out.parent
    calib = guess_data(calibration, channels, key="--calibration") if calibration is not None and calibration.exists() else None
    evald = guess_data(evaluation, channels, key="--evaluation") if evaluation is not None and evaluation.exists() else None
    ref = calib or evald
    if ref is not None or all(isinstance(d, int) for d in io.input_shape[1:]):
        size = ref_size(ref, io.input_shape)
        if _supported("batch_axis", 1):
            probed = probe_batch_axes(model, (io.input_shape[0], *size), io.input_name)
            outputs = [replace(o, batch_axis=probed.get(o.name, o.batch_axis)) for o in outputs]
    calib_path = _rel(calibration, base) if calibration is not None else "calib.npy"
    eval_path = _rel(evaluation, base) if evaluation is not None else "eval.npz"
    layout = ref.layout if ref else "NHWC"
    domain = ref.domain if ref else DataConfig.model_fields["domain"].default
    inputs_key = (evald or calib).inputs_key if (evald or calib) else "x"
    dims = ", ".join(str(d) for d in io.input_shape)
    n_norm = channels if channels <= 4 else 1
    lines = [
        f"# Starter sweep config for {model.name}, written by `hailo-sweep new` from the model's own interface.",
        f"# Input {_q(io.input_name)}: [{dims}] (NCHW){'; a dynamic height/width is taken from the data' if any(not isinstance(d, int) for d in io.input_shape[2:]) else ''}.",
        "# Check the normalization (the pre-processing the model was trained with) before sweeping.",
        f"name: {_name(model)}",
        f"model: {_q(_rel(model, base))}",
        "target: hailo8l                     # hailo8 | hailo8l | hailo10h",
        "backend: auto                       # hailo where the SDK imports, else the embedded onnxruntime backend",
        "data:",
        f"  calibration: {_q(calib_path)}" + (f"   # {calib.count} samples" if calib else "   # (N, H, W, C) or (N, C, H, W) .npy/.npz"),
        f"  evaluation: {_q(eval_path)}" + (f"   # {evald.count} samples" if evald else ""),
        f"  inputs_key: {_q(inputs_key)}",
    ]
    if evald and evald.labels_key:
        lines.append(f"  labels_key: {_q(evald.labels_key)}")
    lines += [
        f"  layout: {layout}" + ("" if ref else "                      # the layout of the files; the model input is NCHW"),
        f"  domain: [{domain[0]:g}, {domain[1]:g}]" + ("" if ref else "                # raw value range of the data"),
        f"# normalization: {{mean: [{', '.join(['0.0'] * n_norm)}], std: [{', '.join(['1.0'] * n_norm)}]}}   # (x - mean) / std, raw domain",
        "outputs:",
    ]
    for o in outputs:
        fields = ["weight: 1.0"]
        if o.kind:
            fields.append(f"kind: {o.kind}")
        if o.batch_axis is not None:
            fields.append(f"batch_axis: {o.batch_axis}")
        shape = ", ".join(str(d) for d in o.shape)
        lines.append(f"  {_q(o.name)}: {{{', '.join(fields)}}}   # [{shape}] from {o.producer}")
    size = (calib or evald).count if (calib or evald) else None
    choices = [c for c in CALIBSET_CHOICES if size is None or c <= size] or [size]
    lines += [
        "search:",
        "  optimization_level: [0, 1, 2]",
        f"  calibset_size: [{', '.join(str(c) for c in choices[:4])}]",
        "  normalization_placement: [host]   # add model once normalization is set",
        "  output_16bit: [none, all]",
        "objective: {metric: total.snr_db, stage: device, direction: maximize}",
        "diagnostics: {layer_noise: 'off'}   # per-layer noise takes long on large models; best: for the best trials at the end, per_trial: every trial",
        "trials: 16",
    ]
    return "\n".join(lines) + "\n"


def write_starter(model: Path, out: Path, calibration: Path | None = None, evaluation: Path | None = None, *, force: bool = False) -> SweepConfig:
    """Write the starter config to ``out`` and load it back; raise ``UserInputError`` (nothing left behind) if it fails."""
    model = model.expanduser().resolve()
    out = out.expanduser().resolve()
    if out.suffix not in (".yaml", ".yml"):
        raise UserInputError(f"{out.name}: the config must be a .yaml file", key="-o", fix="pass -o CONFIG.yaml")
    if out.exists() and not force:
        raise UserInputError(f"{out} exists; not overwritten", key="-o", fix="pass another -o path, or --force to replace it")
    text = render(model, out, calibration.resolve() if calibration else None, evaluation.resolve() if evaluation else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:
        config = load_config(out)
        if config.data.calibration.is_file() and config.data.evaluation.is_file():
            from hailo_sweep.pipeline import load_inputs

            load_inputs(config)  # the model, its outputs and the data checked against each other
    except UserInputError:
        out.unlink(missing_ok=True)
        raise
    return config
