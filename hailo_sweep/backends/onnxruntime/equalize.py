"""Cross-layer equalization and empirical bias correction on float ONNX models.

ONNX Runtime has neither, yet they are what Hailo's ``optimization_level`` >= 1 switches on (equalization before
quantization, bias correction after). Both are cheap numpy edits of the float model that the backend applies
before (CLE) or between two runs of (bias correction) ``quantize_static``; doc section 6.3 measured that CLE makes
per-tensor weights as good as per-channel and bias correction helps per-channel int8.
Functions are pure: they copy the ``ModelProto`` they are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hailo_sweep.onnx_runner import batches, chunk_size, declared_batch

# Ops between two convolutions that commute with a positive per-channel scale: f(x / s) = f(x) / s for s > 0.
_POSITIVE_HOMOGENEOUS = ("Relu", "MaxPool")
_DEFAULT_DOMAINS = ("", "ai.onnx")
_QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")
_MEANS_BATCH = 32


# --------------------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------------------


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _is(node: onnx.NodeProto, *op_types: str) -> bool:
    return node.domain in _DEFAULT_DOMAINS and node.op_type in op_types


def _use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    for value in graph.output:
        counts[value.name] = counts.get(value.name, 0) + 1
    return counts


def _private_initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Initializers that are true constants: not overridable as graph inputs (old IR) and used exactly once."""
    graph_inputs = {value.name for value in graph.input}
    counts = _use_counts(graph)
    return {
        init.name: init
        for init in graph.initializer
        if init.name not in graph_inputs and counts.get(init.name, 0) == 1
    }


def _array(init: TensorProto) -> np.ndarray:
    """An initializer's value, with a clear error for data that lives in a file the model no longer reaches."""
    try:
        return numpy_helper.to_array(init)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError/OSError depending on the failure
        if init.data_location == TensorProto.EXTERNAL:
            raise ValueError(
                f"initializer {init.name!r} is stored as external data that cannot be read ({exc}). Note that "
                "onnxruntime's quantize_static(ModelProto) moves the caller's initializers into a temporary file "
                "it deletes: pass it a copy of the model."
            ) from exc
        raise


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {init.name for init in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        taken.update(node.input)
        taken.update(node.output)
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
            return
    graph.initializer.append(numpy_helper.from_array(value, name))


def _set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


# --------------------------------------------------------------------------------------------------------------
# cross-layer equalization
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """Two convolutions joined by positive-homogeneous ops; channel i of ``a`` feeds input channel i of ``b``."""

    a_weight: str
    a_bias: str | None
    b_weight: str


def cross_layer_equalize(model: onnx.ModelProto, iterations: int = 3) -> tuple[onnx.ModelProto, int]:
    """Balance the per-channel weight ranges of Conv -> (Relu|MaxPool)* -> Conv chains (doc 9.4).

    Output channel i of the first conv (weights and bias) is divided by ``s_i = sqrt(r1_i / r2_i)`` and input
    channel i of the second multiplied by it, with ``r1 = max|W_a[i]|`` and ``r2 = max|W_b[:, i]|``. Relu and
    MaxPool commute with a positive scale, so the float function is unchanged while both convs end up with
    equal per-channel ranges, which is what per-tensor weight quantization needs. Sweeping ``iterations``
    times lets chains of three or more convs settle. Returns the new model and the number of pairs equalized.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    out = _copy(model)
    graph = out.graph
    pairs = _equalization_pairs(graph)
    if not pairs or iterations == 0:
        return out, 0
    names = {p.a_weight for p in pairs} | {p.b_weight for p in pairs} | {p.a_bias for p in pairs if p.a_bias}
    originals = {init.name: _array(init) for init in graph.initializer if init.name in names}
    values = {name: arr.astype(np.float64) for name, arr in originals.items()}
    for _ in range(iterations):
        for pair in pairs:
            _equalize_pair(values, pair)
    for name, arr in values.items():
        _set_initializer(graph, name, arr.astype(originals[name].dtype))
    return out, len(pairs)


def _equalization_pairs(graph: onnx.GraphProto) -> list[_Pair]:
    """Every Conv_a -> (Relu|MaxPool)* -> Conv_b chain that can be rescaled without changing the function."""
    private = _private_initializers(graph)
    counts = _use_counts(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    pairs = []
    for conv_a in graph.node:
        bias = conv_a.input[2] if len(conv_a.input) > 2 and conv_a.input[2] else None
        if not _equalizable_conv(conv_a, private) or (bias is not None and bias not in private):
            continue  # a computed or shared bias cannot be rescaled for this conv alone
        tensor = conv_a.output[0]
        while True:
            users = consumers.get(tensor, [])
            if counts.get(tensor, 0) != 1 or len(users) != 1 or list(users[0].input).count(tensor) != 1:
                break  # the tensor is a graph output or feeds several nodes: scaling it would leak
            user = users[0]
            single_output = len([o for o in user.output if o]) == 1
            if _is(user, *_POSITIVE_HOMOGENEOUS) and user.input[0] == tensor and single_output:
                tensor = user.output[0]
                continue
            if user.input[0] == tensor and _equalizable_conv(user, private):
                w_a, w_b = private[conv_a.input[1]], private[user.input[1]]
                if w_a.dims[0] == w_b.dims[1]:
                    pairs.append(_Pair(a_weight=conv_a.input[1], a_bias=bias, b_weight=user.input[1]))
            break
    return pairs


def _equalizable_conv(node: onnx.NodeProto, private: dict[str, TensorProto]) -> bool:
    if not _is(node, "Conv") or int(_attr(node, "group", 1)) != 1 or len(node.input) < 2:  # type: ignore[call-overload]
        return False
    weight = private.get(node.input[1])
    float_types = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)
    return weight is not None and len(weight.dims) >= 3 and weight.data_type in float_types


def _equalize_pair(values: dict[str, np.ndarray], pair: _Pair) -> None:
    w_a, w_b = values[pair.a_weight], values[pair.b_weight]
    r1 = np.abs(w_a).reshape(w_a.shape[0], -1).max(axis=1)
    r2 = np.abs(np.moveaxis(w_b, 1, 0)).reshape(w_b.shape[1], -1).max(axis=1)
    scale = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    scale[ok] = np.sqrt(r1[ok] / r2[ok])
    values[pair.a_weight] = w_a / scale.reshape((-1,) + (1,) * (w_a.ndim - 1))
    if pair.a_bias is not None:
        values[pair.a_bias] = values[pair.a_bias] / scale
    values[pair.b_weight] = w_b * scale.reshape((1, -1) + (1,) * (w_b.ndim - 2))


# --------------------------------------------------------------------------------------------------------------
# empirical bias correction
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """A float Conv/Gemm whose weight the QDQ model quantized, with the dequantized weight it will really use."""

    node_index: int  # index in the float graph's node list
    weight: np.ndarray  # float weight W
    dequantized: np.ndarray  # W_dq, as the quantized model computes it
    mean_axis: int  # axis of the node's input holding the channels dW contracts with
    weight_dtype: np.dtype  # the float weight's stored type, used for a newly created bias


def bias_correction(
    float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, calibration: np.ndarray, input_name: str
) -> tuple[onnx.ModelProto, int]:
    """Fold the mean output error that weight quantization causes back into the float biases (doc 6.3, 9.4).

    With ``dW = W_dq - W`` the quantized layer outputs on average ``dW . E[x]`` more than the float one, where
    ``E[x]`` is the per-channel mean of its input; subtracting that from the bias (creating a zero bias if
    needed) removes the systematic error. ``E[x]`` comes from running the float model on ``calibration`` (fed to
    ``input_name``) with every target's input as an extra output. Zero padding makes border means differ; the
    empirical method accepts that. Returns the corrected float model, to be quantized again, and the number of
    layers corrected.
    """
    out = _copy(float_model)
    graph = out.graph
    targets = _quantized_targets(graph, qdq_model.graph)
    if not targets:
        return out, 0
    requests = sorted({(graph.node[t.node_index].input[0], t.mean_axis) for t in targets})
    means = _channel_means(float_model, calibration, input_name, requests)
    corrected = 0
    for target in targets:
        node = graph.node[target.node_index]
        mean = means[(node.input[0], target.mean_axis)]
        if _correct_bias(graph, node, target, mean):
            corrected += 1
    return out, corrected


def _quantized_targets(float_graph: onnx.GraphProto, qdq_graph: onnx.GraphProto) -> list[_Target]:
    float_inits = {init.name: init for init in float_graph.initializer}
    qdq_inits = {init.name: init for init in qdq_graph.initializer}
    producers = {out: node for node in qdq_graph.node for out in node.output}
    targets = []
    for index, qdq_node in _match_nodes(float_graph, qdq_graph):
        node = float_graph.node[index]
        if len(node.input) < 2 or node.input[1] not in float_inits:
            continue
        dq = producers.get(qdq_node.input[1]) if len(qdq_node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in _QDQ_DOMAINS:
            continue  # weight left in float (excluded node): nothing to correct
        if dq.input[0] not in qdq_inits:
            continue
        stored = _array(float_inits[node.input[1]])
        weight = stored.astype(np.float64)
        dequantized = _dequantize_weight(qdq_graph, dq).astype(np.float64)
        if dequantized.shape != weight.shape:
            raise ValueError(
                f"node {node.name or node.output[0]!r}: quantized weight shape {dequantized.shape} differs from "
                f"the float weight shape {weight.shape}; was the QDQ model made from this float model?"
            )
        trans_a = int(_attr(node, "transA", 0))  # type: ignore[call-overload]
        mean_axis = 1 if node.op_type == "Conv" else (0 if trans_a else 1)
        targets.append(_Target(index, weight, dequantized, mean_axis, stored.dtype))
    return targets


def _match_nodes(float_graph: onnx.GraphProto, qdq_graph: onnx.GraphProto) -> list[tuple[int, onnx.NodeProto]]:
    """Pair each float Conv/Gemm with its QDQ counterpart: by node name, else by order (quantizers keep both)."""
    float_ops = [(i, n) for i, n in enumerate(float_graph.node) if _is(n, "Conv", "Gemm")]
    qdq_ops = [n for n in qdq_graph.node if _is(n, "Conv", "Gemm")]
    names = [n.name for _, n in float_ops]
    by_name = {n.name: n for n in qdq_ops if n.name}
    if all(names) and len(set(names)) == len(names) and all(name in by_name for name in names):
        pairs = [(i, by_name[n.name]) for i, n in float_ops]
    elif [n.op_type for _, n in float_ops] == [n.op_type for n in qdq_ops]:
        pairs = [(i, q) for (i, _), q in zip(float_ops, qdq_ops, strict=True)]
    else:
        raise ValueError("cannot match the float model's Conv/Gemm nodes to the QDQ model's (names and order differ)")
    for i, qdq_node in pairs:
        if qdq_node.op_type != float_graph.node[i].op_type:
            raise ValueError(f"node {qdq_node.name!r} is {qdq_node.op_type} in the QDQ model but not in the float one")
    return pairs


def _dequantize_weight(graph: onnx.GraphProto, dq: onnx.NodeProto) -> np.ndarray:
    """``(q - zero_point) * scale`` of a constant DequantizeLinear, per tensor or per axis, any integer width."""
    inits = {init.name: init for init in graph.initializer}
    if int(_attr(dq, "block_size", 0)):  # type: ignore[call-overload]
        raise ValueError(f"DequantizeLinear {dq.name!r}: blocked quantization is not supported")
    q = _array(inits[dq.input[0]]).astype(np.int64)
    scale = _array(inits[dq.input[1]]).astype(np.float32)
    has_zp = len(dq.input) > 2 and dq.input[2]
    zero_point = _array(inits[dq.input[2]]).astype(np.int64) if has_zp else np.zeros(scale.shape, np.int64)
    if scale.size > 1:
        axis = int(_attr(dq, "axis", 1)) % q.ndim  # type: ignore[call-overload]
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((q - zero_point).astype(np.float32) * scale).astype(np.float32)


def _channel_means(
    model: onnx.ModelProto, calibration: np.ndarray, input_name: str, requests: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], np.ndarray]:
    """Per-channel means of internal tensors over ``calibration``, by running the float model with extra outputs."""
    import onnxruntime as ort  # heavy import, needed only here

    probe = _copy(model)
    graph = probe.graph
    input_value = next((v for v in graph.input if v.name == input_name), None)
    if input_value is None:
        raise ValueError(f"the float model has no input named {input_name!r}")
    graph_inputs = {v.name for v in graph.input}
    existing = {v.name for v in graph.output}
    types = _tensor_types(probe)
    for name in sorted({name for name, _ in requests} - graph_inputs - existing):
        graph.output.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    fetch = sorted({name for name, _ in requests} - graph_inputs)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed_type = helper.tensor_dtype_to_np_dtype(input_value.type.tensor_type.elem_type)
    if len(calibration) == 0:
        raise ValueError("bias correction needs at least one calibration sample")
    fixed = declared_batch([d.dim_value if d.HasField("dim_value") else None for d in input_value.type.tensor_type.shape.dim])

    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    # a fixed batch gets exactly that many samples per run, the last batch padded by repeating a sample
    for part, _ in batches(calibration, fixed, chunk_size(calibration, _MEANS_BATCH)):
        chunk = np.ascontiguousarray(part, dtype=feed_type)
        values = dict(zip(fetch, session.run(fetch, {input_name: chunk}), strict=True)) if fetch else {}
        values[input_name] = chunk
        for name, axis in requests:
            tensor = np.asarray(values[name], dtype=np.float64)
            reduce = tuple(a for a in range(tensor.ndim) if a != axis)
            sums[(name, axis)] = sums.get((name, axis), 0) + tensor.sum(axis=reduce)
            counts[(name, axis)] = counts.get((name, axis), 0) + tensor.size // tensor.shape[axis]
    return {key: sums[key] / counts[key] for key in requests}


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of internal tensors from ONNX shape inference (empty when inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is best effort; FLOAT is the fallback
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.type.tensor_type.elem_type}


def _correct_bias(graph: onnx.GraphProto, node: onnx.NodeProto, target: _Target, mean: np.ndarray) -> bool:
    """Subtract the expected output shift from the node's bias; False when the bias cannot be edited."""
    delta = target.dequantized - target.weight
    if node.op_type == "Conv":
        shift = _conv_shift(delta, mean, int(_attr(node, "group", 1)))  # type: ignore[call-overload]
        bias_scale = 1.0
    else:  # Gemm: Y = alpha * A' @ B' + beta * C
        delta_kn = delta.T if int(_attr(node, "transB", 0)) else delta  # type: ignore[call-overload]
        if delta_kn.shape[0] != mean.shape[0]:
            raise ValueError(
                f"Gemm {node.name!r}: input has {mean.shape[0]} features, weight expects {delta_kn.shape[0]}"
            )
        shift = float(_attr(node, "alpha", 1.0)) * (mean @ delta_kn)  # type: ignore[arg-type]
        bias_scale = float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        if bias_scale == 0.0:
            return False  # C is ignored: there is no bias to correct
    if len(node.input) > 2 and node.input[2]:
        name = node.input[2]
        init = next((i for i in graph.initializer if i.name == name), None)
        if init is None or name in {v.name for v in graph.input}:
            return False  # computed or overridable bias
        current = _array(init)
        if sum(1 for n in graph.node for i in n.input if i == name) > 1:
            name = _unique_name(graph, f"{name}_corrected")  # shared with other nodes: give this one its own
    else:
        current = np.zeros(shift.shape, dtype=target.weight_dtype)
        name = _unique_name(graph, f"{node.name or node.output[0]}_bias")
    corrected = (current.astype(np.float64) - shift / bias_scale).astype(current.dtype)
    _set_initializer(graph, name, corrected)
    _set_input(node, 2, name)
    return True


def _conv_shift(delta: np.ndarray, mean: np.ndarray, groups: int) -> np.ndarray:
    """``sum over (in, k...) of dW[o, in, k...] * E[x][channel of in]``, honouring grouped convolutions."""
    out_channels, in_per_group = delta.shape[0], delta.shape[1]
    if mean.shape[0] != in_per_group * groups or out_channels % groups:
        raise ValueError(f"Conv input has {mean.shape[0]} channels, weight expects {in_per_group} x {groups} groups")
    per_output = mean.reshape(groups, in_per_group)[np.arange(out_channels) // (out_channels // groups)]
    return (delta.reshape(out_channels, in_per_group, -1).sum(axis=2) * per_output).sum(axis=1)
