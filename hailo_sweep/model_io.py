"""Reading and checking the float ONNX model's interface, and the config's outputs against it."""

from __future__ import annotations

import hashlib
from dataclasses import replace
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hailo_sweep.backends.base import ModelIO
from hailo_sweep.config import MODEL_FILE_FIX, SweepConfig, check_file
from hailo_sweep.errors import UserInputError
from hailo_sweep.metrics import OutputSpec
from hailo_sweep.onnx_runner import BatchAxisError, run_chunked


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_io(path: Path, *, config_file: Path | None = None) -> ModelIO:
    """Load the ONNX model's signature; refuse a missing, unreadable or unsupported model with a clear message."""
    path = check_file(path, what="model file", fix=MODEL_FILE_FIX, config_file=config_file, key="model")
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))  # by path: external data files are found next to the model
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        raise UserInputError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
            file=config_file,
            key="model",
            fix=(
                "keep the model's external data file(s) next to it, under the name the model records"
                if _has_external_data(model_or_none(path))
                else "export the network to ONNX (e.g. torch.onnx.export) and point 'model' at the .onnx file"
            ),
        ) from None
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserInputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); hailo-sweep supports one image input",
            file=config_file,
            key="model",
        )
    dims: list[int | str] = []
    for d in inputs[0].type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "N"))
    if len(dims) != 4 or not (isinstance(dims[1], int) and dims[1] > 0):
        raise UserInputError(
            f"model input '{inputs[0].name}' has shape {dims}; expected a 4-D NCHW image input with a fixed channel count",
            file=config_file,
            key="model",
            fix="export the model with a fixed number of input channels (batch, height and width may be dynamic)",
        )
    # a dynamic height or width (e.g. Paddle exports: [-1, 3, '?', '?']) is taken from the data: see with_data_size()
    dims = [d if not isinstance(d, int) or d > 0 or i == 0 else "?" for i, d in enumerate(dims)]
    return ModelIO(
        input_name=inputs[0].name,
        input_shape=tuple(dims),
        output_names=tuple(o.name for o in model.graph.output),
    )


def with_data_size(model_io: ModelIO, sample_shape: tuple[int, ...]) -> ModelIO:
    """The interface with a dynamic height/width replaced by the data's (``sample_shape``: C, H, W of one sample)."""
    dims = list(model_io.input_shape)
    for axis in (2, 3):
        if not isinstance(dims[axis], int):
            dims[axis] = int(sample_shape[axis - 1])
    return replace(model_io, input_shape=tuple(dims))


def output_specs(config: SweepConfig, model_io: ModelIO) -> tuple[OutputSpec, ...]:
    """The outputs to measure: the config's, checked against the model; all model outputs when none are listed."""
    if not config.outputs:
        return tuple(OutputSpec(name=name) for name in model_io.output_names)
    unknown = [name for name in config.outputs if name not in model_io.output_names]
    if unknown:
        numeric = unknown[0].lstrip("-").isdigit()
        raise UserInputError(
            f"output {unknown[0]!r} is not an output of the model; the model's outputs are: {', '.join(model_io.output_names)}",
            file=config.source,
            key=f"outputs.{unknown[0]}",
            fix="use the ONNX output names exactly as in the model (see them with netron or onnx.load(...).graph.output)"
            + ("; YAML reads an unquoted number as a number (0123 becomes 83), so quote numeric names: '0123':" if numeric else ""),
        )
    return tuple(OutputSpec(name=n, weight=o.weight, kind=o.kind, batch_axis=o.batch_axis) for n, o in config.outputs.items())


def batch_axes(outputs: tuple[OutputSpec, ...]) -> dict[str, int]:
    """The outputs whose samples lie on an axis other than 0."""
    return {o.name: o.batch_axis for o in outputs if o.batch_axis}


def model_or_none(path: Path) -> onnx.ModelProto | None:
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return None


def _has_external_data(model: onnx.ModelProto | None) -> bool:
    return model is not None and any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )


_SHAPE_ONLY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


def softmax_outputs(path: Path, outputs: tuple[OutputSpec, ...]) -> list[str]:
    """Outputs declared ``kind: logits`` that the model computes with a Softmax (through reshapes only)."""
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for spec in outputs:
        if spec.kind != "logits":
            continue
        node = producers.get(spec.name)
        while node is not None and node.op_type in _SHAPE_ONLY and node.input:
            node = producers.get(node.input[0])
        if node is not None and node.op_type == "Softmax":
            found.append(spec.name)
    return found


def probe_model(path: Path, model_io: ModelIO, outputs: tuple[OutputSpec, ...], sample: np.ndarray, *, config_file: Path | None) -> None:
    """Run the float model on a few samples (fed as the reference is) and refuse, naming the cause, what cannot run.

    Catches before any store is written what would otherwise fail every trial: a model ONNX Runtime cannot load or
    run, an output whose samples are not on its declared batch axis, a class output without a class axis.
    """
    axes = {o.name: o.batch_axis for o in outputs}
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.log_severity_level = 4  # the failure is reported below, once, not also on stderr
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        values = run_chunked(sess, sample.astype(np.float32), model_io.output_names, axes)
    except BatchAxisError as exc:
        holding = [a for a, size in enumerate(exc.shape) if size == exc.fed and a != exc.axis]
        hint = f"set outputs: {{{exc.output!r}: {{batch_axis: {holding[0]}}}}}" if len(holding) == 1 else f"set outputs.{exc.output}.batch_axis to the axis of size {exc.fed}"
        raise UserInputError(
            f"{exc}; outputs are compared sample by sample, so each output's batch axis must be known",
            file=config_file,
            key=f"outputs.{exc.output}.batch_axis",
            fix=hint + " (a time-major (T, N, C) output has batch_axis: 1)",
        ) from None
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/NotImplemented/... types
        message = str(exc).strip()
        raise UserInputError(
            f"the model {path.name} does not run in ONNX Runtime {ort.__version__}{_culprit(message)}"
            + f": {type(exc).__name__}: {message.splitlines()[0][:300] if message else ''}",
            file=config_file,
            key="model",
            fix="the float reference runs in ONNX Runtime on the CPU: re-export the model (or the named node) with standard ONNX operators it supports",
        ) from None
    for spec in outputs:
        if spec.kind != "tensor" and values[spec.name].ndim < 2:
            raise UserInputError(
                f"output {spec.name!r} is kind {spec.kind} but has shape {list(values[spec.name].shape)} per batch: no class axis",
                file=config_file,
                key=f"outputs.{spec.name}.kind",
                fix="use kind: tensor for an output without a class axis (the last axis holds the classes)",
            )


def external_data_files(path: Path) -> list[Path]:
    """The files holding a model's external tensor data, next to the model (sorted, each once)."""
    model = model_or_none(path)
    if model is None:
        return []
    names = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return sorted(path.parent / name for name in names if (path.parent / name).is_file())


def _culprit(message: str) -> str:
    """The node (or unregistered op) an ONNX Runtime error message names, as `` (node 'x', Conv)``."""
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", message)
    if node:
        return f" (node '{node.group(2)}', {node.group(1)})"
    op = re.search(r"([\w.]+:\w+)\(-?\d+\) is not a registered function/op", message)
    if op:
        return f" (operator {op.group(1)} is unknown to it)"
    return ""


def class_counts(path: Path, names: list[str]) -> dict[str, int | None]:
    """The size of the class axis (the last) of each named output, from the ONNX graph; None where it is not fixed."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int | None] = {}
    for out in model.graph.output:
        if out.name in names:
            dims = out.type.tensor_type.shape.dim
            counts[out.name] = int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else None
    return counts
