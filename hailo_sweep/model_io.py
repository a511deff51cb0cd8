"""Reading and checking the float ONNX model's interface, and the config's outputs against it."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import onnx

from hailo_sweep.backends.base import ModelIO
from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.metrics import OutputSpec


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_io(path: Path, *, config_file: Path | None = None) -> ModelIO:
    """Load the ONNX model's signature; refuse a missing, unreadable or unsupported model with a clear message."""
    if not path.is_file():
        raise UserInputError(
            f"model file not found: {path}", file=config_file, key="model", fix="point 'model' at an existing .onnx file"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        raise UserInputError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
            file=config_file,
            key="model",
            fix="export the network to ONNX (e.g. torch.onnx.export) and point 'model' at the .onnx file",
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
        raise UserInputError(
            f"output {unknown[0]!r} is not an output of the model; the model's outputs are: {', '.join(model_io.output_names)}",
            file=config.source,
            key=f"outputs.{unknown[0]}",
            fix="use the ONNX output names exactly as in the model (see them with netron or onnx.load(...).graph.output)",
        )
    return tuple(OutputSpec(name=n, weight=o.weight, kind=o.kind) for n, o in config.outputs.items())
