"""Graph edits on ONNX models that turn ONNX Runtime's QDQ output into a Hailo-like deployable model.

The embedded backend stands in for the Hailo compiler: a QDQ model run with ``ORT_ENABLE_ALL`` plays the device.
To mirror what a HEF does, the model must take raw uint8 frames (normalization on-chip), return raw integers
whose scale/zero point travel with the model, and let the backend pick which weights go to 4 bit. Each of those
is a small, pure edit here: functions take a ``ModelProto`` and return a new one, never mutating the argument.
The measurements behind each edit are in docs/onnxruntime-quantization.md (sections 3, 5, 6.2, 9.2, 9.3).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: metadata_props key under which ``strip_output_dequantize`` records each raw output's quantization
OUTPUT_QUANT_KEY = "hailo_sweep.output_quant"

# QuantizeLinear/DequantizeLinear live in the default domain, or in com.microsoft when ORT needs 4/16-bit types
# below opset 21 (doc section 6.2).
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
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


@dataclass(frozen=True)
class WeightTensor:
    """A Conv/Gemm weight initializer, the unit the backend assigns a weight bit width to."""

    name: str
    node: str  # name of the (first) node using it; its first output's name when the node is unnamed
    op_type: str  # "Conv" or "Gemm"
    size: int  # number of elements
    out_axis: int  # output-channel axis, the axis per-channel quantization uses


# --------------------------------------------------------------------------------------------------------------
# small graph helpers
# --------------------------------------------------------------------------------------------------------------


def _is_op(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in _QDQ_DOMAINS


def _initializer_map(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {init.name: init for init in graph.initializer}


def _constant_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """Value of a constant tensor (initializer or Constant node output), or None when it is computed."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    for node in graph.node:
        if name in node.output:
            return node
    return None


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """A detached copy of a node, safe to keep while the graph's node list is rebuilt."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    return clone


def _copy_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    clone = onnx.ValueInfoProto()
    clone.CopyFrom(value)
    return clone


def _all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {v.name for v in graph.value_info}
    names |= {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in _subgraphs(node):
            names |= _all_tensor_names(sub)
    names.discard("")
    return names


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = _all_tensor_names(graph)
    if base not in taken:
        return base
    k = 1
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def _replace_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every use of ``old`` (including uses from inside subgraphs) at ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in _subgraphs(node):
            _replace_input(sub, old, new)


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it is produced, used or declared."""
    _replace_input(graph, old, new)
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for collection in (graph.input, graph.output, graph.value_info):
        for value in collection:
            if value.name == old:
                value.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def _is_used(graph: onnx.GraphProto, name: str) -> bool:
    if name in {o.name for o in graph.output}:
        return True
    for node in graph.node:
        if name in node.input:
            return True
        if any(_is_used(sub, name) for sub in _subgraphs(node)):
            return True
    return False


def _drop_unused_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    unused = {name for name in names if name and not _is_used(graph, name)}
    keep = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _remove_nodes(graph: onnx.GraphProto, first_outputs: set[str]) -> None:
    """Remove the nodes whose first output is in ``first_outputs`` (tensor names are unique, nodes may not be)."""
    keep = [node for node in graph.node if not (node.output and node.output[0] in first_outputs)]
    del graph.node[:]
    graph.node.extend(keep)


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _graph_input(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for value in graph.input:
        if value.name == name:
            return value
    raise ValueError(f"the model has no graph input named {name!r}; inputs are {[v.name for v in graph.input]}")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _q_output_type(graph: onnx.GraphProto, q_node: onnx.NodeProto) -> int:
    """ONNX element type of a QuantizeLinear's output: its zero point's type, else ``output_dtype``, else uint8."""
    if len(q_node.input) > 2 and q_node.input[2]:
        zp = _constant_array(graph, q_node.input[2])
        if zp is not None:
            return helper.np_dtype_to_tensor_dtype(zp.dtype)
    output_dtype = int(_attr(q_node, "output_dtype", 0))  # type: ignore[call-overload]
    return output_dtype or TensorProto.UINT8


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
    old_input = _graph_input(graph, input_name)
    if raw_input_name in _all_tensor_names(graph):
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

    scale_name = _unique_name(graph, f"{raw_input_name}_norm_scale")
    graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    bias_name = _unique_name(graph, f"{raw_input_name}_norm_bias")
    graph.initializer.append(numpy_helper.from_array(bias, bias_name))
    scaled_name = _unique_name(graph, f"{raw_input_name}_norm_scaled")
    mul = helper.make_node("Mul", [raw_input_name, scale_name], [scaled_name], name=f"{raw_input_name}_norm_mul")
    add = helper.make_node("Add", [scaled_name, bias_name], [input_name], name=f"{raw_input_name}_norm_add")

    raw_input = onnx.ValueInfoProto()
    raw_input.CopyFrom(old_input)
    raw_input.name = raw_input_name
    normalized = onnx.ValueInfoProto()
    normalized.CopyFrom(old_input)  # the old input tensor is now internal; keep its declared type and shape
    inputs = [raw_input if value.name == input_name else _copy_value(value) for value in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    graph.value_info.append(normalized)
    nodes = [mul, add, *(_copy_node(node) for node in graph.node)]
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
    graph_input = _graph_input(graph, input_name)
    consumers = _consumers(graph, input_name)
    quantizers = [node for node in consumers if _is_op(node, "QuantizeLinear") and node.input[0] == input_name]
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
        _replace_input(graph, q_node.output[0], input_name)
        removed_params.extend(q_node.input[1:])
    _remove_nodes(graph, q_outputs)
    _drop_value_info(graph, q_outputs)
    _drop_unused_initializers(graph, removed_params)
    graph_input.type.tensor_type.elem_type = TensorProto.UINT8
    return out


def _check_identity_quantizer(graph: onnx.GraphProto, q_node: onnx.NodeProto, input_name: str) -> None:
    """Raise unless ``q_node`` maps float pixel values to the same uint8 values (scale 1, zero point 0)."""
    scale = _constant_array(graph, q_node.input[1])
    if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) != 1.0:
        raise ValueError(
            f"the QuantizeLinear on input {input_name!r} has scale {None if scale is None else scale.tolist()}, "
            "not 1: quantize with TensorQuantOverrides {input: [{scale: 1, zero_point: 0, quant_type: QUInt8}]}"
        )
    elem_type = _q_output_type(graph, q_node)
    if elem_type != TensorProto.UINT8:
        raise ValueError(
            f"the QuantizeLinear on input {input_name!r} produces {TensorProto.DataType.Name(elem_type)}, not UINT8"
        )
    zero_point = _constant_array(graph, q_node.input[2]) if len(q_node.input) > 2 and q_node.input[2] else None
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
        _copy_node(node) for node in graph.node if _is_op(node, "DequantizeLinear") and node.output[0] in outputs
    ]
    quant = {dq.output[0]: _output_quant(graph, dq) for dq in dequantizers}
    _remove_nodes(graph, set(quant))
    claimed: dict[str, str] = {}  # quantized tensor -> the output name it now carries
    removed_params: list[str] = []
    for dq in dequantizers:
        name, raw = dq.output[0], dq.input[0]
        if raw in graph_inputs or raw in outputs:
            raise ValueError(f"output {name!r}: its quantized tensor {raw!r} is a graph input/output; cannot strip")
        float_users = [node.output[0] for node in _consumers(graph, name)]
        if float_users:  # the float output also feeds other nodes: keep a DequantizeLinear for them
            dq.output[0] = _unique_name(graph, f"{name}_dequantized")
            _replace_input(graph, name, dq.output[0])
            position = min(i for i, node in enumerate(graph.node) if node.output and node.output[0] in float_users)
            graph.node.insert(position, dq)
        else:
            removed_params.extend(dq.input[1:])
        if raw in claimed:  # two outputs share one quantized tensor: copy it under the second name
            graph.node.append(helper.make_node("Identity", [claimed[raw]], [name], name=f"{name}_raw_identity"))
        else:
            _drop_value_info(graph, {raw, name})
            _rename_tensor(graph, raw, name)
            claimed[raw] = name
        outputs[name].type.tensor_type.elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(quant[name].dtype))
    _drop_unused_initializers(graph, removed_params)
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
        if source is None or not _is_op(source, "DequantizeLinear"):
            continue
        dq = _copy_node(source)
        dq.output[0] = value.name
        dq.name = _unique_name(graph, f"{value.name}_dequantize")
        replacements[value.name] = dq
    if replacements:
        nodes = [replacements.get(node.output[0], node) if node.output else node for node in graph.node]
        nodes = [_copy_node(node) for node in nodes]
        del graph.node[:]
        graph.node.extend(nodes)
    return out


def _output_quant(graph: onnx.GraphProto, dq: onnx.NodeProto) -> OutputQuant:
    name = dq.output[0]
    scale = _constant_array(graph, dq.input[1])
    if scale is None:
        raise ValueError(f"output {name!r}: the DequantizeLinear scale {dq.input[1]!r} is not a constant")
    if scale.size != 1:
        raise ValueError(
            f"output {name!r} is quantized per axis ({scale.size} scales); only per-tensor output quantization "
            "can be stripped"
        )
    zero_point = _constant_array(graph, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if zero_point is not None:
        elem_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
        zp_value = int(zero_point.reshape(-1)[0])
    else:
        producer = _producer(graph, dq.input[0])
        is_q = producer is not None and _is_op(producer, "QuantizeLinear")
        elem_type = _q_output_type(graph, producer) if producer is not None and is_q else TensorProto.UINT8
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


# --------------------------------------------------------------------------------------------------------------
# weights: which tensors exist and which go to 4 bit
# --------------------------------------------------------------------------------------------------------------


def weight_tensors(model: onnx.ModelProto) -> list[WeightTensor]:
    """The Conv and Gemm weight initializers, largest first (ties by name), each listed once."""
    graph = model.graph
    inits = _initializer_map(graph)
    found: dict[str, WeightTensor] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in found:
            continue
        trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
        out_axis = 0 if node.op_type == "Conv" or trans_b == 1 else 1
        size = int(np.prod(inits[name].dims, dtype=np.int64))
        found[name] = WeightTensor(
            name=name, node=node.name or node.output[0], op_type=node.op_type, size=size, out_axis=out_axis
        )
    return sorted(found.values(), key=lambda w: (-w.size, w.name))


def select_4bit_weights(model: onnx.ModelProto, share: float) -> tuple[list[WeightTensor], float]:
    """Pick the weights to quantize at 4 bit: the largest tensors first, while their share stays <= ``share``.

    Mirrors Hailo's ``compression_level`` (the backend maps level k to share 0.2*k). A tensor that would overshoot
    is skipped and smaller ones are still considered, so a model whose largest layer holds most of the weights still
    gets some 4-bit weights at low levels. Returns the tensors and the share of weight elements they hold.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    weights = weight_tensors(model)
    total = sum(w.size for w in weights)
    chosen: list[WeightTensor] = []
    taken = 0
    for weight in weights:
        if total == 0 or (taken + weight.size) / total > share + 1e-12:
            continue
        chosen.append(weight)
        taken += weight.size
    return chosen, (taken / total if total else 0.0)


def tensor_producers(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node producing it, for the given tensors (absent names are left out)."""
    wanted = set(names)
    return {out: node for node in model.graph.node for out in node.output if out in wanted}


def output_producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Graph output name -> the node producing it (outputs that are graph inputs or constants are left out)."""
    graph = model.graph
    producers: dict[str, onnx.NodeProto] = {}
    for value in graph.output:
        node = _producer(graph, value.name)
        if node is not None:
            producers[value.name] = node
    return producers
