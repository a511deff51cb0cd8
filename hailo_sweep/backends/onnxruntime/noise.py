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
from onnxruntime.quantization.qdq_loss_debug import create_activation_matching, modify_model_output_intermediate_tensors

from hailo_sweep.backends.base import LayerNoise
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer
from hailo_sweep.onnx_runner import batches, chunk_size, declared_batch

log = logging.getLogger(__name__)

#: SNR values are clamped to this magnitude, like ``hailo_sweep.metrics.SNR_CAP_DB`` (identical tensors -> +cap)
SNR_CAP_DB = 200.0
_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")
LAYER_NOISE_CHUNK = 4  # samples per call on a dynamic batch: every layer's tensors of a call are held at once
RANKING_SAMPLES = 32  # samples behind the once-per-sweep ranking of noisy layers, for inputs up to RANKING_ELEMENTS / 32
RANKING_ELEMENTS = 8 << 20  # input values behind the ranking: 32 samples of 3x224x224, 9 of 3x480x640
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16}


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


class _Tapped:
    """A model augmented to return every intermediate float tensor (ORT's debugging tool), run one chunk at a time."""

    def __init__(self, model_path: Path, augmented_path: Path, inputs: np.ndarray, role: str):
        input_name, dtype, self.batch = _input_spec(model_path)
        self.input_name = input_name
        self.data = _as_input(inputs, dtype, role)
        model_path = _typed_dequantize_outputs(model_path, augmented_path.with_suffix(".typed.onnx"))
        modify_model_output_intermediate_tensors(str(model_path), str(augmented_path))
        augmented = onnx.load(str(augmented_path), load_external_data=False)
        # every saved tensor leaves through a Reshape the tool appends: its graph output -> the tensor it saves
        appended = {o.name for o in augmented.graph.output} - {o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output}
        self.saved = {n.output[0]: n.input[0] for n in augmented.graph.node if n.op_type == "Reshape" and n.output[0] in appended}
        del augmented
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as collect_activations runs it
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = False  # every tensor is an output: an arena would keep a second copy of them all
        self.session = ort.InferenceSession(str(augmented_path), opts, providers=["CPUExecutionProvider"])
        self.output_of = {tensor: output for output, tensor in self.saved.items()}

    def run(self, start: int, stop: int, tensors: list[str]) -> dict[str, np.ndarray]:
        """The named saved tensors (flattened) of samples ``start:stop``, padded to the fixed batch by repeating the last.

        The padding stays in: a tensor's sample axis is not known (time-major layers), and both models see it alike.
        """
        part = self.data[start:stop]
        batch, _ = next(batches(part, self.batch, chunk=len(part)))
        outputs = [self.output_of[t] for t in tensors]
        return dict(zip(tensors, self.session.run(outputs, {self.input_name: batch}), strict=True))


def layer_noise(
    float_model_path: Path,
    qdq_model_path: Path,
    inputs: np.ndarray,
    work_dir: Path,
    max_samples: int = 32,
    samples_per_call: int | None = None,
) -> list[LayerNoise]:
    """Cumulative SNR (dB) of every quantized activation of the QDQ model against the float model, noisiest first.

    ``inputs`` are in the QDQ model's feed domain (uint8 frames when its input is uint8); the float model gets the
    same values as float32 when its input is float. Only the first ``max_samples`` samples are used. Both models run
    ``samples_per_call`` samples at a time (default: the model's fixed batch, else about ``CALL_ELEMENTS`` input
    values, at most 4 samples) and each layer's signal and noise energies are summed over the calls, so memory holds
    one call's tensors of every layer, not every sample's: the SNR is ORT's ``compute_signal_to_quantization_noice_ratio``
    (the norm of all samples' float tensor over the norm of their difference), computed without concatenating.
    Layer names are the float model's tensor names; graph outputs have ``kind="output"``. Scratch models are written
    under ``work_dir``.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    data = np.asarray(inputs)[:max_samples]
    if len(data) == 0:
        raise ValueError("layer_noise needs at least one input sample")
    float_model_path, qdq_model_path = Path(float_model_path), Path(qdq_model_path)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    float_model = onnx.load(str(float_model_path), load_external_data=False)
    skipped = _skipped_tensors(float_model)
    signal: dict[str, float] = {}
    noise_energy: dict[str, float] = {}
    with quiet_quantizer():
        fp = _Tapped(float_model_path, work_dir / "float.augmented.onnx", data, "float")
        qdq = _Tapped(qdq_model_path, work_dir / "qdq.augmented.onnx", data, "QDQ")
        # which float tensor pairs with which QDQ tensor: ORT's own matching rules, applied to the names only
        pairs = create_activation_matching({t: [t] for t in qdq.output_of}, {t: [t] for t in fp.output_of})
        wanted = {name: (m["float"][0], m["post_qdq"][0]) for name, m in pairs.items() if "float" in m and name not in skipped}
        step = fp.batch or qdq.batch or samples_per_call or min(LAYER_NOISE_CHUNK, chunk_size(data))
        for start in range(0, len(data), step):
            floats = fp.run(start, start + step, sorted({f for f, _ in wanted.values()}))
            quantized = qdq.run(start, start + step, sorted({q for _, q in wanted.values()}))
            for name, (f_name, q_name) in wanted.items():
                reference = floats[f_name]
                diff = reference - quantized[q_name]
                signal[name] = signal.get(name, 0.0) + float(np.dot(reference, reference))
                noise_energy[name] = noise_energy.get(name, 0.0) + float(np.dot(diff, diff))
            del floats, quantized
    graph_outputs = {o.name for o in float_model.graph.output}
    eps = float(np.finfo(float).eps)  # ORT's floor on both norms
    noise = [
        LayerNoise(
            layer=name,
            snr_db=float(np.clip(20 * np.log10(max(np.sqrt(signal[name]), eps) / max(np.sqrt(noise_energy[name]), eps)), -SNR_CAP_DB, SNR_CAP_DB)),
            kind="output" if name in graph_outputs else "activation",
        )
        for name in signal
    ]
    return sorted(noise, key=lambda n: (n.snr_db, n.layer))


def ranking_samples(inputs: np.ndarray) -> int:
    """Samples for the once-per-sweep ranking: ``RANKING_SAMPLES``, fewer for large inputs (at least 4).

    The ranking only orders layers, so it needs fewer samples than an error figure; on a 480x640 detector 32 samples
    run one at a time through both models cost minutes before the first trial.
    """
    per_sample = max(1, int(np.prod(np.asarray(inputs).shape[1:])))
    return int(np.clip(RANKING_ELEMENTS // per_sample, 4, RANKING_SAMPLES))


def noisiest(noise: Sequence[LayerNoise], k: int) -> list[str]:
    """Names of the ``k`` layers with the lowest SNR (the candidates for 16-bit promotion)."""
    return [n.layer for n in sorted(noise, key=lambda n: (n.snr_db, n.layer))[:k]]
