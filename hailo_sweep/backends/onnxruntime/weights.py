"""The weight tensors of an ONNX model, the unit the embedded backend gives a bit width, and which go to 4 bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class WeightTensor:
    """A Conv/Gemm weight initializer, the unit the backend assigns a weight bit width to."""

    name: str
    node: str  # name of the (first) node using it; its first output's name when the node is unnamed
    op_type: str  # "Conv" or "Gemm"
    size: int  # number of elements
    out_axis: int  # output-channel axis, the axis per-channel quantization uses


def weight_tensors(model: onnx.ModelProto) -> list[WeightTensor]:
    """The Conv and Gemm weight initializers, largest first (ties by name), each listed once."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    found: dict[str, WeightTensor] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in found:
            continue
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
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
        node = next((n for n in graph.node if value.name in n.output), None)
        if node is not None:
            producers[value.name] = node
    return producers
