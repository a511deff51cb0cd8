"""Graph edits on ONNX models that turn ONNX Runtime's QDQ output into a Hailo-like deployable model.

The embedded backend stands in for the Hailo compiler: a QDQ model run with ``ORT_ENABLE_ALL`` plays the device.
To mirror what a HEF does, the model must take raw uint8 frames (normalization on-chip), return raw integers
whose scale/zero point travel with the model, and let the backend pick which weights go to 4 bit. Each of those
is a small, pure edit here: functions take a ``ModelProto`` and return a new one, never mutating the argument.
The measurements behind each edit are in docs/onnxruntime-quantization.md (sections 3, 5, 6.2, 9.2, 9.3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hailo_sweep.backends.onnxruntime import graph_ops as ops

#: metadata_props key under which ``strip_output_dequantize`` records each raw output's quantization
OUTPUT_QUANT_KEY = "hailo_sweep.output_quant"

_INTEGER_OUTPUT_TYPES = {
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.UINT16: "uint16",
    TensorProto.INT16: "int16",
}


@dataclass(frozen=True)
class OutputQuant:
    """Affine quantization of one raw integer graph output: ``x = (raw - zero_point) * scale``."""

    name: str
    scale: float
    zero_point: int
    dtype: str  # numpy dtype name of the raw integers: uint8, int8, uint16 or int16


# --------------------------------------------------------------------------------------------------------------
# input side: normalization in the model, uint8 frames
# --------------------------------------------------------------------------------------------------------------


def prepend_normalization(
    model: onnx.ModelProto,
    input_name: str,
    mean: Sequence[float],
    std: Sequence[float],
    raw_input_name: str,
) -> onnx.ModelProto:
    """Put ``(raw - mean) / std`` inside the model, as Hailo's on-chip ``normalization`` layer does.

    The new float32 graph input ``raw_input_name`` feeds ``Mul(raw, 1/std)`` then ``Add(., -mean/std)``, whose
    output is the old input tensor, so the rest of the graph is untouched. Mul/Add rather than Sub/Div because
    ORT quantizes Mul/Add (QLinearMul/QLinearAdd) but leaves Sub/Div in float (doc section 5). ``mean``/``std``
    are per channel (channel axis 1) in the raw domain, of length 1 or C.
    """
    mean_arr = np.asarray(mean, dtype=np.float64).reshape(-1)
    std_arr = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean_arr.size == 0 or std_arr.size == 0:
        raise ValueError("normalization mean and std must not be empty")
    if np.any(std_arr == 0) or not np.all(np.isfinite(std_arr)) or not np.all(np.isfinite(mean_arr)):
        raise ValueError(f"normalization std must be finite and non-zero, mean finite; got mean={mean}, std={std}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    old_input = ops.graph_input(graph, input_name)
    if raw_input_name in ops.all_tensor_names(graph):
        raise ValueError(f"raw_input_name {raw_input_name!r} is already a tensor name in the model")
    if old_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {input_name!r} must be float32 to prepend normalization")

    tensor_type = old_input.type.tensor_type
    dims = tensor_type.shape.dim if tensor_type.HasField("shape") else None
    channels = max(mean_arr.size, std_arr.size)
    for arr, what in ((mean_arr, "mean"), (std_arr, "std")):
        if arr.size not in (1, channels):
            raise ValueError(f"normalization {what} has {arr.size} values; mean and std must have length 1 or C")
    if dims is not None and len(dims) >= 2 and dims[1].HasField("dim_value") and channels not in (1, dims[1].dim_value):
        raise ValueError(
            f"normalization has {channels} channels but input {input_name!r} has {dims[1].dim_value} on axis 1"
        )
    if (dims is None or len(dims) < 2) and channels != 1:
        raise ValueError(f"per-channel normalization needs an input of known rank >= 2; {input_name!r} has none")
    if dims is None:
        shape = [1]  # broadcasts against any rank
    else:
        shape = [1, channels] + [1] * (len(dims) - 2) if len(dims) >= 2 else [1] * len(dims)
    scale = np.broadcast_to(1.0 / std_arr, (channels,)).astype(np.float32).reshape(shape)
    bias = np.broadcast_to(-mean_arr / std_arr, (channels,)).astype(np.float32).reshape(shape)

    scale_name = ops.unique_name(graph, f"{raw_input_name}_norm_scale")
    graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    bias_name = ops.unique_name(graph, f"{raw_input_name}_norm_bias")
    graph.initializer.append(numpy_helper.from_array(bias, bias_name))
    scaled_name = ops.unique_name(graph, f"{raw_input_name}_norm_scaled")
    mul = helper.make_node("Mul", [raw_input_name, scale_name], [scaled_name], name=f"{raw_input_name}_norm_mul")
    add = helper.make_node("Add", [scaled_name, bias_name], [input_name], name=f"{raw_input_name}_norm_add")

    raw_input = onnx.ValueInfoProto()
    raw_input.CopyFrom(old_input)
    raw_input.name = raw_input_name
    normalized = onnx.ValueInfoProto()
    normalized.CopyFrom(old_input)  # the old input tensor is now internal; keep its declared type and shape
    inputs = [raw_input if value.name == input_name else ops.copy_value(value) for value in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    graph.value_info.append(normalized)
    nodes = [mul, add, *(ops.copy_node(node) for node in graph.node)]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def make_input_uint8(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """Let a QDQ model take raw uint8 frames: drop the input's QuantizeLinear and declare the input UINT8.

    Valid only when the model was quantized with the input override scale 1 / zero point 0 / QUInt8 (doc 9.3):
    then the quantized input equals the raw pixels and removing the Q is lossless, exactly like feeding uint8
    frames to a HEF.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph_input = ops.graph_input(graph, input_name)
    consumers = ops.consumers(graph, input_name)
    quantizers = [node for node in consumers if ops.is_op(node, "QuantizeLinear") and node.input[0] == input_name]
    if not quantizers:
        raise ValueError(f"input {input_name!r} is not consumed by a QuantizeLinear; quantize the model first")
    q_outputs = {node.output[0] for node in quantizers}
    others = [node.name or node.op_type for node in consumers if node.output[0] not in q_outputs]
    if others:
        raise ValueError(f"input {input_name!r} is also used in float by {others}; it cannot become uint8")
    graph_outputs = {o.name for o in graph.output}
    removed_params: list[str] = []
    for q_node in quantizers:
        _check_identity_quantizer(graph, q_node, input_name)
        if q_node.output[0] in graph_outputs:
            raise ValueError(f"the quantized input {q_node.output[0]!r} is a graph output; cannot remove its Q")
        ops.replace_input(graph, q_node.output[0], input_name)
        removed_params.extend(q_node.input[1:])
    ops.remove_nodes(graph, q_outputs)
    ops.drop_value_info(graph, q_outputs)
    ops.drop_unused_initializers(graph, removed_params)
    graph_input.type.tensor_type.elem_type = TensorProto.UINT8
    return out


def _check_identity_quantizer(graph: onnx.GraphProto, q_node: onnx.NodeProto, input_name: str) -> None:
    """Raise unless ``q_node`` maps float pixel values to the same uint8 values (scale 1, zero point 0)."""
    scale = ops.constant_array(graph, q_node.input[1])
    if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) != 1.0:
        raise ValueError(
            f"the QuantizeLinear on input {input_name!r} has scale {None if scale is None else scale.tolist()}, "
            "not 1: quantize with TensorQuantOverrides {input: [{scale: 1, zero_point: 0, quant_type: QUInt8}]}"
        )
    elem_type = ops.q_output_type(graph, q_node)
    if elem_type != TensorProto.UINT8:
        raise ValueError(
            f"the QuantizeLinear on input {input_name!r} produces {TensorProto.DataType.Name(elem_type)}, not UINT8"
        )
    zero_point = ops.constant_array(graph, q_node.input[2]) if len(q_node.input) > 2 and q_node.input[2] else None
    if zero_point is not None and (zero_point.size != 1 or int(zero_point.reshape(-1)[0]) != 0):
        raise ValueError(
            f"the QuantizeLinear on input {input_name!r} has zero point {zero_point.tolist()}, not 0"
        )


# --------------------------------------------------------------------------------------------------------------
# output side: raw integer outputs that carry their own quantization
# --------------------------------------------------------------------------------------------------------------


def strip_output_dequantize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, OutputQuant]]:
    """Make each dequantized graph output return its raw integers, the way a HEF's output vstreams do.

    Every DequantizeLinear whose output is a graph output is removed; the quantized tensor is renamed to the
    output's original name and the output's element type becomes the integer type. The scale and zero point are
    returned and also stored in ``metadata_props[OUTPUT_QUANT_KEY]``, so the compiled model carries them like a
    HEF. Host-side ``(raw - zero_point) * scale`` is bit-exact against the QDQ model (doc section 3).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {value.name: value for value in graph.output}
    graph_inputs = {value.name for value in graph.input}
    dequantizers = [
        ops.copy_node(node) for node in graph.node if ops.is_op(node, "DequantizeLinear") and node.output[0] in outputs
    ]
    quant = {dq.output[0]: _output_quant(graph, dq) for dq in dequantizers}
    ops.remove_nodes(graph, set(quant))
    claimed: dict[str, str] = {}  # quantized tensor -> the output name it now carries
    removed_params: list[str] = []
    for dq in dequantizers:
        name, raw = dq.output[0], dq.input[0]
        if raw in graph_inputs or raw in outputs:
            raise ValueError(f"output {name!r}: its quantized tensor {raw!r} is a graph input/output; cannot strip")
        float_users = [node.output[0] for node in ops.consumers(graph, name)]
        if float_users:  # the float output also feeds other nodes: keep a DequantizeLinear for them
            dq.output[0] = ops.unique_name(graph, f"{name}_dequantized")
            ops.replace_input(graph, name, dq.output[0])
            position = min(i for i, node in enumerate(graph.node) if node.output and node.output[0] in float_users)
            graph.node.insert(position, dq)
        else:
            removed_params.extend(dq.input[1:])
        if raw in claimed:  # two outputs share one quantized tensor: copy it under the second name
            graph.node.append(helper.make_node("Identity", [claimed[raw]], [name], name=f"{name}_raw_identity"))
        else:
            ops.drop_value_info(graph, {raw, name})
            ops.rename_tensor(graph, raw, name)
            claimed[raw] = name
        outputs[name].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(quant[name].dtype))
    ops.drop_unused_initializers(graph, removed_params)
    _write_output_quant(out, quant)
    return out, quant


def dequantize_pass_through_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give each graph output that is an ``Identity`` of a dequantized tensor a DequantizeLinear of its own.

    Paddle exports end in ``Identity`` (``save_infer_model/scale_0.tmp_0``); when it survives pre-processing the
    quantizer leaves it after the last DequantizeLinear, so ``strip_output_dequantize`` would find no quantized
    tensor under the output's name. Replacing the Identity by a copy of the DequantizeLinear it passes through keeps
    the output's name and value and lets the output be returned as raw integers like any other.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {name: node for node in graph.node for name in node.output}
    replacements: dict[str, onnx.NodeProto] = {}
    for value in graph.output:
        node = producers.get(value.name)
        if node is None or node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        source = producers.get(node.input[0])
        while source is not None and source.op_type == "Identity" and source.domain in ("", "ai.onnx"):
            source = producers.get(source.input[0])
        if source is None or not ops.is_op(source, "DequantizeLinear"):
            continue
        dq = ops.copy_node(source)
        dq.output[0] = value.name
        dq.name = ops.unique_name(graph, f"{value.name}_dequantize")
        replacements[value.name] = dq
    if replacements:
        nodes = [replacements.get(node.output[0], node) if node.output else node for node in graph.node]
        nodes = [ops.copy_node(node) for node in nodes]
        del graph.node[:]
        graph.node.extend(nodes)
    return out


def _output_quant(graph: onnx.GraphProto, dq: onnx.NodeProto) -> OutputQuant:
    name = dq.output[0]
    scale = ops.constant_array(graph, dq.input[1])
    if scale is None:
        raise ValueError(f"output {name!r}: the DequantizeLinear scale {dq.input[1]!r} is not a constant")
    if scale.size != 1:
        raise ValueError(
            f"output {name!r} is quantized per axis ({scale.size} scales); only per-tensor output quantization "
            "can be stripped"
        )
    zero_point = ops.constant_array(graph, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if zero_point is not None:
        elem_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
        zp_value = int(zero_point.reshape(-1)[0])
    else:
        producer = ops.producer(graph, dq.input[0])
        is_q = producer is not None and ops.is_op(producer, "QuantizeLinear")
        elem_type = ops.q_output_type(graph, producer) if producer is not None and is_q else TensorProto.UINT8
        zp_value = 0
    if elem_type not in _INTEGER_OUTPUT_TYPES:
        raise ValueError(
            f"output {name!r} is quantized to {TensorProto.DataType.Name(elem_type)}; "
            "only 8/16-bit integers are supported"
        )
    return OutputQuant(
        name=name, scale=float(scale.reshape(-1)[0]), zero_point=zp_value, dtype=_INTEGER_OUTPUT_TYPES[elem_type]
    )


def _write_output_quant(model: onnx.ModelProto, quant: dict[str, OutputQuant]) -> None:
    """Merge ``quant`` into the model's output-quantization metadata (earlier entries for other outputs stay)."""
    merged: dict[str, dict[str, object]] = {}
    kept = []
    for prop in model.metadata_props:
        if prop.key == OUTPUT_QUANT_KEY:
            merged.update(json.loads(prop.value))
        else:
            kept.append(prop)
    for name, q in quant.items():
        merged[name] = {"scale": q.scale, "zero_point": q.zero_point, "dtype": q.dtype}
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key = OUTPUT_QUANT_KEY
    entry.value = json.dumps(merged, sort_keys=True)


def read_output_quant(model: onnx.ModelProto) -> dict[str, OutputQuant]:
    """Read back the raw outputs' quantization that ``strip_output_dequantize`` stored in the model."""
    for prop in model.metadata_props:
        if prop.key == OUTPUT_QUANT_KEY:
            try:
                entries = json.loads(prop.value)
                return {
                    name: OutputQuant(
                        name=name,
                        scale=float(entry["scale"]),
                        zero_point=int(entry["zero_point"]),
                        dtype=str(np.dtype(entry["dtype"])),
                    )
                    for name, entry in entries.items()
                }
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"malformed {OUTPUT_QUANT_KEY!r} metadata in the model: {exc}") from exc
    raise ValueError(f"the model has no {OUTPUT_QUANT_KEY!r} metadata; run strip_output_dequantize on it first")


def describe_io(model: onnx.ModelProto) -> dict[str, Any]:
    """The compiled model's inputs and outputs as a deployment needs them: name, numpy dtype, shape, and for each raw
    integer output its scale and zero point (``x = (raw - zero_point) * scale``)."""
    quant = read_output_quant(model)

    def entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return {"name": value.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), "shape": shape}

    outputs = []
    for value in model.graph.output:
        item = entry(value)
        q = quant.get(value.name)
        if q is not None:
            item.update({"raw_integers": True, "scale": q.scale, "zero_point": q.zero_point, "dequantize": "(raw - zero_point) * scale"})
        outputs.append(item)
    return {"inputs": [entry(v) for v in model.graph.input], "outputs": outputs}
