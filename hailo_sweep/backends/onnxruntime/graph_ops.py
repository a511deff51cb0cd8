"""Small, generic edits and queries on an ONNX graph, shared by the embedded backend's graph transformations."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# QuantizeLinear/DequantizeLinear live in the default domain, or in com.microsoft when ORT needs 4/16-bit types
# below opset 21 (doc section 6.2).
QDQ_DOMAINS = ("", "ai.onnx", "com.microsoft")


def is_op(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in QDQ_DOMAINS


def constant_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
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


def consumers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if name in node.input]


def producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    for node in graph.node:
        if name in node.output:
            return node
    return None


def subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """A detached copy of a node, safe to keep while the graph's node list is rebuilt."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    return clone


def copy_value(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    clone = onnx.ValueInfoProto()
    clone.CopyFrom(value)
    return clone


def all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {v.name for v in graph.value_info}
    names |= {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            names |= all_tensor_names(sub)
    names.discard("")
    return names


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = all_tensor_names(graph)
    if base not in taken:
        return base
    k = 1
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


def replace_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every use of ``old`` (including uses from inside subgraphs) at ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for sub in subgraphs(node):
            replace_input(sub, old, new)


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it is produced, used or declared."""
    replace_input(graph, old, new)
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


def is_used(graph: onnx.GraphProto, name: str) -> bool:
    if name in {o.name for o in graph.output}:
        return True
    for node in graph.node:
        if name in node.input:
            return True
        if any(is_used(sub, name) for sub in subgraphs(node)):
            return True
    return False


def drop_unused_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    unused = {name for name in names if name and not is_used(graph, name)}
    keep = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def remove_nodes(graph: onnx.GraphProto, first_outputs: set[str]) -> None:
    """Remove the nodes whose first output is in ``first_outputs`` (tensor names are unique, nodes may not be)."""
    keep = [node for node in graph.node if not (node.output and node.output[0] in first_outputs)]
    del graph.node[:]
    graph.node.extend(keep)


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def graph_input(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for value in graph.input:
        if value.name == name:
            return value
    raise ValueError(f"the model has no graph input named {name!r}; inputs are {[v.name for v in graph.input]}")


def attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def q_output_type(graph: onnx.GraphProto, q_node: onnx.NodeProto) -> int:
    """ONNX element type of a QuantizeLinear's output: its zero point's type, else ``output_dtype``, else uint8."""
    if len(q_node.input) > 2 and q_node.input[2]:
        zp = constant_array(graph, q_node.input[2])
        if zp is not None:
            return helper.np_dtype_to_tensor_dtype(zp.dtype)
    output_dtype = int(attr(q_node, "output_dtype", 0))  # type: ignore[call-overload]
    return output_dtype or TensorProto.UINT8
