"""Names across the three graphs: ONNX outputs, HN output layers (model script, emulator), HEF output vstreams.

Why: the config names outputs by their ONNX names; the model script addresses the HN's ``output_layerN``
pseudo-layers; the emulator returns a list in the HN's output order; HailoRT keys outputs by vstream names, which are
the producing layers' names (e.g. ``net/conv63``). Facts (hailo-api.md §1.6): an ``output_layer``'s ``input[0]`` is
the producing layer, ``original_names`` hold the ONNX node names, ``net_params.output_layers_order`` lists the
outputs in order (LUX ``exporter.py::_force_onnx_names`` maps its entries as producing-layer names; both forms are
accepted here), and ``HEF.get_original_names_from_vstream_name`` maps a vstream back (HRT-py L510).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from hailo_sweep.errors import UserInputError


@dataclass(frozen=True)
class OnnxOutput:
    """One ONNX graph output: its tensor name (the config's output name), the node producing it, its rank."""

    name: str
    producer: str
    rank: int | None


def read_onnx_outputs(path: Path) -> tuple[OnnxOutput, ...]:
    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    result = []
    for out in model.graph.output:
        shape = out.type.tensor_type.shape if out.type.HasField("tensor_type") else None
        rank = len(shape.dim) if shape is not None and shape.dim else None
        result.append(OnnxOutput(name=out.name, producer=producers.get(out.name, ""), rank=rank))
    return tuple(result)


def onnx_name_for(original_names: Iterable[str], outputs: Iterable[OnnxOutput]) -> str | None:
    """The ONNX output that a Hailo layer's original names refer to (tensor name first, then producing node)."""
    names = set(original_names)
    outs = list(outputs)
    for out in outs:
        if out.name in names:
            return out.name
    for out in outs:
        if out.producer and out.producer in names:
            return out.name
    return None


def short_name(layer: str) -> str:
    """``net/output_layer1`` -> ``output_layer1`` (model scripts accept both forms, hailo-api.md §2)."""
    return layer.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class HnOutput:
    onnx_name: str
    output_layer: str  # scoped pseudo-layer, e.g. "net/output_layer1"
    producer: str  # scoped producing layer, e.g. "net/conv1": the HEF output vstream name
    index: int  # position in the HN output order, i.e. in the list ``runner.infer`` returns
    onnx_rank: int | None

    @property
    def script_name(self) -> str:
        return short_name(self.output_layer)


@dataclass(frozen=True)
class HnGraph:
    """What the backend needs from the HN: layer names (to validate scripts) and the output mapping."""

    net_name: str
    layers: frozenset[str]
    outputs: tuple[HnOutput, ...]  # in HN output order
    input_shape: tuple[int, ...] | None  # (H, W, C) of the input layer, when the HN states it
    types: Mapping[str, str] = field(default_factory=dict)  # scoped layer name -> HN "type" (e.g. "conv")
    first_layers: tuple[str, ...] = ()  # scoped layers fed by an input layer (clipping_scope "first")

    def has_layer(self, name: str) -> bool:
        if name in self.layers or f"{self.net_name}/{name}" in self.layers:
            return True
        return "/" not in name and any(short_name(layer) == name for layer in self.layers)

    def output_names(self) -> dict[str, str]:
        """Output pseudo-layers *and* their producing layers -> ONNX output name (both carry the output's values)."""
        names = {o.output_layer: o.onnx_name for o in self.outputs}
        names.update({o.producer: o.onnx_name for o in self.outputs})
        return names

    def script_names(self) -> dict[str, str]:
        """ONNX output name -> the HN output layer name used in model scripts."""
        return {o.onnx_name: o.script_name for o in self.outputs}

    def clipping_layers(self, scope: str) -> list[str] | None:
        """Short names of the layers a clipping scope names: None = every layer, else the first / output-producing ones."""
        if scope == "first":
            return [short_name(layer) for layer in self.first_layers]
        if scope == "outputs":
            return [short_name(o.producer) for o in self.outputs]
        return None

    def vstream_to_onnx(self) -> dict[str, str]:
        return {o.producer: o.onnx_name for o in self.outputs}

    def onnx_ranks(self) -> dict[str, int | None]:
        return {o.onnx_name: o.onnx_rank for o in self.outputs}


def _layer_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else 0


def parse_hn(hn: Mapping[str, Any] | str, onnx_outputs: tuple[OnnxOutput, ...]) -> HnGraph:
    """Map every ONNX output to its HN output layer; refuse an HN whose outputs are not the ONNX model's."""
    data: Mapping[str, Any] = json.loads(hn) if isinstance(hn, str) else hn
    layers: Mapping[str, Mapping[str, Any]] = data["layers"]
    any_layer = next(iter(layers), "net/x")
    net_name = str(data.get("name") or any_layer.split("/", 1)[0])

    output_layers = [name for name, layer in layers.items() if layer.get("type") == "output_layer"]
    by_producer = {str(layers[name]["input"][0]): name for name in output_layers if layers[name].get("input")}
    order = list(data.get("net_params", {}).get("output_layers_order", []) or [])
    resolved = [name if name in output_layers else by_producer.get(name, "") for name in order]
    if not resolved or "" in resolved or sorted(resolved) != sorted(output_layers):
        resolved = sorted(output_layers, key=_layer_number)

    ranks = {o.name: o.rank for o in onnx_outputs}
    outputs: list[HnOutput] = []
    for index, out_layer in enumerate(resolved):
        producer = str(layers[out_layer]["input"][0])
        names = list(layers[out_layer].get("original_names", [])) + list(layers.get(producer, {}).get("original_names", []))
        onnx_name = onnx_name_for(names, onnx_outputs)
        if onnx_name is None or any(o.onnx_name == onnx_name for o in outputs):
            raise UserInputError(
                f"the translated model's output {out_layer} (original names {names}) matches no ONNX output "
                f"({', '.join(o.name for o in onnx_outputs)})",
                key="hailo.end_node_names",
                fix="leave end_node_names unset, or list the ONNX nodes that produce the model's outputs",
            )
        outputs.append(HnOutput(onnx_name, out_layer, producer, index, ranks.get(onnx_name)))
    missing = [o.name for o in onnx_outputs if o.name not in {h.onnx_name for h in outputs}]
    if missing:
        raise UserInputError(
            f"ONNX output(s) {', '.join(missing)} have no output layer in the translated model; its outputs map to "
            f"{', '.join(o.onnx_name for o in outputs) or 'nothing'}",
            key="hailo.end_node_names",
            fix="leave end_node_names unset, or list the ONNX nodes that produce every model output",
        )

    input_shape = None
    for layer in layers.values():
        if layer.get("type") == "input_layer" and layer.get("input_shapes"):
            input_shape = tuple(int(d) for d in layer["input_shapes"][0][1:])
            break
    types = {name: str(layer.get("type", "")) for name, layer in layers.items()}
    inputs = {name for name, kind in types.items() if kind == "input_layer"}
    first = tuple(sorted(name for name, layer in layers.items() if inputs & {str(i) for i in layer.get("input", []) or []}))
    return HnGraph(
        net_name=net_name, layers=frozenset(layers), outputs=tuple(outputs), input_shape=input_shape, types=types, first_layers=first
    )
