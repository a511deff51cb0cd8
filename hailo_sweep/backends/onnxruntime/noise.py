"""Per-layer noise of the embedded backend's QDQ model: the analogue of Hailo's layer noise analysis.

ONNX Runtime's ``qdq_loss_debug`` tools run the float model and the QDQ model on the same inputs, save every
intermediate float tensor, and pair each quantized tensor with its float counterpart (doc section 6.1). We report
the *cumulative* SNR ("xmodel_err": the QDQ model's dequantized tensor against the float model's same tensor), which
is what a user can act on: the layers where it drops are the ones that lose precision.

Two kinds of tensor are left out on purpose (pitfall P10):

- graph inputs: the input is not produced by a layer (its quantization is reported through the first activation);
- pre-activation tensors whose every consumer is a ``Relu``/``Clip``: the quantizer gives them the activation's
  range (rmin = 0), so their QDQ copy has the negatives clipped that the ReLU would remove a moment later. Both
  ``qdq_err`` and ``xmodel_err`` read 1-7 dB there although nothing is lost; the activation's own output carries
  the real number. On Hailo such a pair is one layer too (conv + activation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)

from hailo_sweep.backends.base import LayerNoise
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer
from hailo_sweep.onnx_runner import batches, declared_batch

log = logging.getLogger(__name__)

#: SNR values are clamped to this magnitude, like ``hailo_sweep.metrics.SNR_CAP_DB`` (identical tensors -> +cap)
SNR_CAP_DB = 200.0
_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16}


class _BatchReader(CalibrationDataReader):
    """Feeds one array to the named input: in one batch, or in batches of the model's fixed batch size."""

    def __init__(self, input_name: str, data: np.ndarray, fixed_batch: int | None):
        self._batches = iter([{input_name: batch} for batch, _ in batches(data, fixed_batch, chunk=len(data))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _input_spec(path: Path) -> tuple[str, type, int | None]:
    """Name, numpy dtype and static batch size (None when symbolic) of a model's single input."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.type not in _ORT_TYPES:
        raise ValueError(f"{path.name}: input {inp.name!r} has unsupported type {inp.type}")
    return inp.name, _ORT_TYPES[inp.type], declared_batch(inp.shape)


def _as_input(inputs: np.ndarray, dtype: type, model: str) -> np.ndarray:
    """``inputs`` in the dtype a model takes; refuses to turn non-integral floats into integers silently."""
    if inputs.dtype == dtype:
        return inputs
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not np.issubdtype(inputs.dtype, np.integer) and not np.all(inputs == np.round(inputs)):
            raise ValueError(f"the {model} model takes {np.dtype(dtype).name} input but got non-integral {inputs.dtype} values")
        if inputs.min() < info.min or inputs.max() > info.max:
            raise ValueError(f"the {model} model takes {np.dtype(dtype).name} input but the values exceed its range")
    return inputs.astype(dtype)


def _skipped_tensors(model: onnx.ModelProto) -> set[str]:
    """Graph inputs, initializers, and tensors consumed only by a foldable activation (see module docstring)."""
    graph = model.graph
    skipped = {i.name for i in graph.input} | {init.name for init in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    outputs = {o.name for o in graph.output}
    for name, ops in consumers.items():
        if name not in outputs and all(op in _FOLDABLE_ACTIVATIONS for op in ops):
            skipped.add(name)
    return skipped


def _typed_dequantize_outputs(model_path: Path, typed_path: Path) -> Path:
    """Declare the float type of every DequantizeLinear output that shape inference left untyped.

    With 4-bit weights below opset 21 the quantizer emits ``com.microsoft`` Q/DQ nodes, which ONNX shape inference
    does not know; their outputs then have no type and the debugging tools skip them, so no layer pairs at all.
    """
    model = onnx.load(str(model_path))
    typed = {v.name for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    added = 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            for out in node.output:
                if out not in typed:
                    model.graph.value_info.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
                    added += 1
    if not added:
        return model_path
    onnx.save(model, str(typed_path))
    return typed_path


def _activations(model_path: Path, augmented_path: Path, inputs: np.ndarray, role: str) -> dict[str, list[np.ndarray]]:
    """Every float tensor of the model on ``inputs`` (cast to the model's input dtype), keyed by tensor name."""
    input_name, dtype, batch = _input_spec(model_path)
    data = _as_input(inputs, dtype, role)
    model_path = _typed_dequantize_outputs(model_path, augmented_path.with_suffix(".typed.onnx"))
    modify_model_output_intermediate_tensors(str(model_path), str(augmented_path))
    return collect_activations(str(augmented_path), _BatchReader(input_name, data, batch))


def layer_noise(
    float_model_path: Path, qdq_model_path: Path, inputs: np.ndarray, work_dir: Path, max_samples: int = 32
) -> list[LayerNoise]:
    """Cumulative SNR (dB) of every quantized activation of the QDQ model against the float model, noisiest first.

    ``inputs`` are in the QDQ model's feed domain (uint8 frames when its input is uint8); the float model gets the
    same values as float32 when its input is float. Only the first ``max_samples`` samples are used: the tensors of
    every layer are held in memory. Layer names are the float model's tensor names; graph outputs have
    ``kind="output"``. Scratch models are written under ``work_dir``.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    data = np.asarray(inputs)[:max_samples]
    if len(data) == 0:
        raise ValueError("layer_noise needs at least one input sample")
    float_model_path, qdq_model_path = Path(float_model_path), Path(qdq_model_path)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with quiet_quantizer():
        float_acts = _activations(float_model_path, work_dir / "float.augmented.onnx", data, "float")
        qdq_acts = _activations(qdq_model_path, work_dir / "qdq.augmented.onnx", data, "QDQ")
        matching = create_activation_matching(qdq_acts, float_acts)
        float_model = onnx.load(str(float_model_path), load_external_data=False)
        skipped = _skipped_tensors(float_model)
        paired = {name: match for name, match in matching.items() if "float" in match and name not in skipped}
        errors = compute_activation_error(paired)
    graph_outputs = {o.name for o in float_model.graph.output}
    noise = [
        LayerNoise(
            layer=name,
            snr_db=float(np.clip(err["xmodel_err"], -SNR_CAP_DB, SNR_CAP_DB)),
            kind="output" if name in graph_outputs else "activation",
        )
        for name, err in errors.items()
    ]
    return sorted(noise, key=lambda n: (n.snr_db, n.layer))


def noisiest(noise: Sequence[LayerNoise], k: int) -> list[str]:
    """Names of the ``k`` layers with the lowest SNR (the candidates for 16-bit promotion)."""
    return [n.layer for n in sorted(noise, key=lambda n: (n.snr_db, n.layer))[:k]]
