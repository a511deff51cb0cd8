"""Shared internals of the two contract fakes (``hailo_sdk_client`` and ``hailo_platform``). Test-only.

The fakes follow Hailo's *documented API*; the numbers they compute are this file's own, simple stand-ins, chosen
so a sweep on the fakes is meaningful, NOT Hailo's algorithms (which are closed source):

- the network is run with onnxruntime (NCHW inside, NHWC at the API, as the HN is NHWC: hailo-api.md §1.2);
- the HN has one layer per ONNX node (an activation after conv/dense, and shape-only ops, folded into the layer before),
  the input layer and an ``output_layerN`` per output (names and types: hailo-api.md §1.6, §2; numbering is the fake's);
- the model script's ``normalization`` layer is applied first when present (hailo-api.md §1.4);
- "quantization" = min/max ranges over the calibration set (float network), rounding to 8 or 16 bits (16 for layers
  set to an ``a16_*`` precision mode): every hidden layer's activation is rounded inside the network, so later layers
  compute on its grid; outputs are rounded after the network, per channel when ``output_encoding_vector=enabled``
  (hailo-api.md §2, §3.5). Layers reading an output layer's value inside the network read it in float (a
  simplification);
- the layer noise analysis (``layer_noise``) compares those same quantized values with the float network's, so its
  SNRs are what the emulator and the chip actually lose, layer by layer (Hailo's own algorithm is not public);
- a deterministic extra error of ``0.25*(4-optimization_level) + 0.35*compression_level`` LSB (effective levels) is
  added before output rounding, so trials at different levels give different numbers (an invention of this fake);
- quantize/dequantize use HailoRT's formulas in float32 (``quantization.hpp``: ``q = bankers_round(clip(x, limvals)
  / qp_scale + qp_zp)``, ``x = (q - qp_zp) * qp_scale``).

HAR and HEF files written by the fakes are this file's own formats (a zip, a JSON blob); only the fakes read them.

Slow stages, for benchmarks (sleeps, so a measurement sees the scheduling and not this machine's CPU); each is read
from the environment when the stage runs, so a worker process started with the variable has it. Default 0 (no sleep):

- ``HAILO_FAKE_COMPILE_DELAY_S``: seconds ``ClientRunner.compile()`` sleeps before it returns the HEF;
- ``HAILO_FAKE_DEVICE_DELAY_S``: seconds the fake device sleeps each time a compiled model is loaded onto it
  (``InferModel.configure()``, ``VDevice.configure()``): once per device stage, however many inferences it then runs,
  so the device metrics (latency, throughput) stay the fake's own.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import io
import json
import os
import re
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

HEF_MAGIC = b"FAKEHEF1\n"
# Keyed by the model bytes themselves: a bytes object caches its hash, so a lookup per inference call stays cheap.
_SESSIONS: dict[bytes, ort.InferenceSession] = {}
_MODELS: dict[tuple[Any, ...], bytes] = {}
_ACTIVATIONS = {"Relu", "Sigmoid", "Clip", "LeakyRelu", "Tanh", "HardSigmoid"}
_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"}  # no arithmetic: folded into the layer before
_FUSES_ACTIVATION = {"Conv", "Gemm", "MatMul"}
# ONNX op -> (layer name prefix, HN "type"). input_layer/output_layer/conv/dense are the HN types seen in public code
# (hailo-api.md §1.6; LUX exporter.py); concat/feature_splitter are the layer kinds the 16-bit notebook names (§2).
# The other strings are this fake's own.
_KINDS = {
    "Conv": ("conv", "conv"),
    "Gemm": ("fc", "dense"),
    "MatMul": ("fc", "dense"),
    "GlobalAveragePool": ("avgpool", "avgpool"),
    "AveragePool": ("avgpool", "avgpool"),
    "MaxPool": ("maxpool", "maxpool"),
    "ReduceMean": ("reduce_mean", "reduce_mean"),
    "Add": ("ew_add", "ew_add"),
    "Sub": ("ew_sub", "ew_sub"),
    "Mul": ("ew_mult", "ew_mult"),
    "Concat": ("concat", "concat"),
    "Split": ("feature_splitter", "feature_splitter"),
    **{op: ("activation", "activation") for op in _ACTIVATIONS},
}
MIN_OPSET = 11  # Round and Clip(min, max inputs), used to emulate the quantized hidden layers (see ``chain_model``)


def stage_delay(variable: str) -> None:
    """Sleep ``float($variable)`` seconds (unset, empty or 0: not at all); see the module docstring."""
    value = os.environ.get(variable, "").strip()
    seconds = float(value) if value else 0.0
    if seconds > 0:
        time.sleep(seconds)


class ParsingError(Exception):
    """Raised by the fake parser (the real DFC's parser exception classes are not public)."""


class ModelScriptError(Exception):
    """Raised for a model script the fake cannot accept (the real DFC's exception class is not public)."""


# -- graph ----------------------------------------------------------------------------------------------------------
@dataclass
class OutputRoute:
    producer: str  # scoped producing layer = HEF output vstream name (MZ hw_infer_utils.py get_real_output_layers)
    output_layer: str  # scoped pseudo-layer output_layerN (hailo-api.md §1.6)
    onnx_output: str  # the ONNX tensor this output carries
    original_names: list[str]  # ONNX node names fused into the producer (LUX exporter.py reads original_names)
    shape: list[int]  # HN shape without batch: [H, W, C] (NHWC) or [C] (NC)
    order: str  # "NHWC" | "NC"


@dataclass
class Layer:
    """One HN layer: an ONNX node, plus a following activation (after conv/dense) or shape-only op folded into it."""

    name: str  # scoped, e.g. "net/conv2"
    type: str  # HN "type" (see _KINDS)
    inputs: list[str]  # scoped names of the layers feeding it (the input layer included)
    tensor: str  # ONNX tensor holding the layer's output
    original_names: list[str]  # ONNX node names folded into the layer
    shape: list[int]  # HN shape without batch ([H, W, C] for feature maps)


@dataclass
class Graph:
    net_name: str
    input_name: str  # ONNX input tensor
    input_layer: str  # scoped input layer
    input_shape: list[int]  # [H, W, C]
    outputs: list[OutputRoute]
    layers: list[Layer] = field(default_factory=list)  # every layer between the input and output layers, in order

    def layer_names(self) -> list[str]:
        names = [self.input_layer, *(layer.name for layer in self.layers)]
        for route in self.outputs:
            if route.producer not in names:
                names.append(route.producer)
        return names + [route.output_layer for route in self.outputs]

    def hidden_layers(self) -> list[Layer]:
        """Layers whose output is not a network output: quantized inside the network (see ``chain_model``)."""
        outputs = {route.onnx_output for route in self.outputs}
        return [layer for layer in self.layers if layer.tensor not in outputs]

    def resolve(self, name: str) -> str | None:
        """Short or scoped layer name -> scoped name (hailo-api.md §2: both forms are accepted)."""
        names = self.layer_names()
        if name in names:
            return name
        scoped = f"{self.net_name}/{name}"
        return scoped if scoped in names else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Graph:
        return cls(
            **{
                **data,
                "outputs": [OutputRoute(**o) for o in data["outputs"]],
                "layers": [Layer(**layer) for layer in data.get("layers", [])],
            }
        )


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    if onnx_bytes not in _SESSIONS:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        _SESSIONS[onnx_bytes] = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    return _SESSIONS[onnx_bytes]


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> None:
    """Expose ``tensors`` as extra graph outputs (float, shape left to the runtime)."""
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            existing.add(name)


def tapped_model(onnx_bytes: bytes, tensors: list[str]) -> bytes:
    """The network with ``tensors`` (layer outputs) exposed as graph outputs, to read every layer's float value."""
    key = ("taps", onnx_bytes, tuple(tensors))
    if key not in _MODELS:
        model = onnx.load_from_string(onnx_bytes)
        _with_outputs(model, tensors)
        _MODELS[key] = model.SerializeToString()
    return _MODELS[key]


@dataclass
class _Group:
    prefix: str
    type: str
    base_op: str
    nodes: list[Any]
    tensor: str
    input_tensors: list[str]


def _group_nodes(model: onnx.ModelProto, outputs: set[str]) -> list[_Group]:
    """ONNX nodes -> layers, in graph (topological) order; see ``Layer`` for what is folded."""
    inits = {i.name for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    owner: dict[str, _Group] = {}
    groups: list[_Group] = []
    for node in model.graph.node:
        if len(node.output) != 1:
            raise ParsingError(f"the fake supports single-output nodes only; {node.name!r} ({node.op_type}) has {len(node.output)}")
        src = node.input[0] if node.input else ""
        group = owner.get(src)
        foldable = group is not None and group.tensor == src and uses.get(src) == 1 and src not in outputs
        activation_after = node.op_type in _ACTIVATIONS and group is not None and group.base_op in _FUSES_ACTIVATION
        if foldable and group is not None and (node.op_type in _SHAPE_OPS or (activation_after and len(group.nodes) == 1)):
            group.nodes.append(node)
            group.tensor = node.output[0]
            owner[node.output[0]] = group
            continue
        prefix, kind = _KINDS.get(node.op_type, (node.op_type.lower(), node.op_type.lower()))
        inputs = [name for name in node.input if name and name not in inits]
        group = _Group(prefix, kind, node.op_type, [node], node.output[0], inputs)
        groups.append(group)
        owner[node.output[0]] = group
    return groups


def translate(
    onnx_path: str,
    net_name: str,
    start_node_names: list[str] | None,
    end_node_names: list[str] | None,
    net_input_shapes: dict[str, list[int]] | None,
) -> tuple[Graph, bytes]:
    """An HN of the whole graph: the input layer, one layer per ONNX node (activations after conv/dense and
    shape-only ops folded in), and an output_layerN per network output. Whole graphs only (no cutting)."""
    onnx_bytes = Path(onnx_path).read_bytes()
    model = onnx.load_from_string(onnx_bytes)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ParsingError(f"the fake parser needs ONNX opset >= {MIN_OPSET}, the model has {opset}")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ParsingError(f"the fake parser supports one input, the model has {len(inputs)}")
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    if net_input_shapes is not None:
        if set(net_input_shapes) != {inp.name}:
            raise ParsingError(f"net_input_shapes keys {sorted(net_input_shapes)} do not match the model inputs [{inp.name!r}]")
        given = list(net_input_shapes[inp.name])
        if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims[1:], given[1:], strict=True)):
            raise ParsingError(f"net_input_shapes {given} does not match the model's input shape {dims}")
        dims = given
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise ParsingError(f"input {inp.name!r} needs a fixed NCHW shape, got {dims}")
    _, c, h, w = (int(d) if d is not None else 1 for d in dims)

    consumers = {node.name for node in model.graph.node if inp.name in node.input}
    for name in start_node_names or []:
        if name != inp.name and name not in consumers:
            raise ParsingError(f"start node {name!r} is not the model input or a node reading it (the fake cannot cut graphs)")
    graph_outputs = [o.name for o in model.graph.output]
    if end_node_names:
        nodes = {node.name: node for node in model.graph.node}
        ordered = []
        for name in end_node_names:
            if name not in nodes:
                raise ParsingError(f"end node {name!r} is not a node of the model")
            carried = [o for o in nodes[name].output if o in graph_outputs]
            if not carried:
                raise ParsingError(f"end node {name!r} does not produce a graph output (the fake cannot cut graphs)")
            ordered += carried
        graph_outputs = ordered

    groups = _group_nodes(model, set(graph_outputs))
    counters: dict[str, int] = {}
    names: dict[int, str] = {}
    for group in groups:
        counters[group.prefix] = counters.get(group.prefix, 0) + 1
        names[id(group)] = f"{net_name}/{group.prefix}{counters[group.prefix]}"
    input_layer = f"{net_name}/input_layer1"
    layer_of = {inp.name: input_layer}
    for group in groups:
        for node in group.nodes:
            layer_of[node.output[0]] = names[id(group)]

    tensors = [group.tensor for group in groups]
    probe_model = tapped_model(onnx_bytes, tensors)
    values = dict(zip(tensors, session(probe_model).run(tensors, {inp.name: np.zeros((1, c, h, w), np.float32)}), strict=True))
    layers = []
    for group in groups:
        value = values[group.tensor]
        shape = [int(value.shape[2]), int(value.shape[3]), int(value.shape[1])] if value.ndim == 4 else [int(d) for d in value.shape[1:]]
        feeding = [layer_of[t] for t in group.input_tensors if t in layer_of]
        layers.append(Layer(names[id(group)], group.type, feeding, group.tensor, [n.name for n in group.nodes], shape))

    by_tensor = {layer.tensor: layer for layer in layers}
    routes = []
    for index, out in enumerate(graph_outputs, 1):
        layer = by_tensor.get(out)
        if layer is None:
            raise ParsingError(f"output {out!r} is not the output of a whole layer (the fake cannot cut graphs)")
        value = values[out]
        if value.ndim == 4:
            order = "NHWC"
        elif value.ndim == 2:
            order = "NC"
        else:
            raise ParsingError(f"the fake supports 4-D and 2-D outputs, {out!r} is {value.ndim}-D")
        routes.append(OutputRoute(layer.name, f"{net_name}/output_layer{index}", out, list(layer.original_names), list(layer.shape), order))
    graph = Graph(net_name, inp.name, input_layer, [h, w, c], routes, layers)
    return graph, onnx_bytes


def hn_dict(graph: Graph) -> dict[str, Any]:
    """The HN as a dict (hailo-api.md §1.6: layers[name] = {type, input, output, original_names, input_shapes})."""
    shapes = {graph.input_layer: graph.input_shape, **{layer.name: layer.shape for layer in graph.layers}}
    consumers: dict[str, list[str]] = {}
    for layer in graph.layers:
        for source in dict.fromkeys(layer.inputs):  # x*x reads one layer twice; it consumes it once
            consumers.setdefault(source, []).append(layer.name)
    for route in graph.outputs:
        consumers.setdefault(route.producer, []).append(route.output_layer)
    layers: dict[str, Any] = {
        graph.input_layer: {
            "type": "input_layer",
            "input": [],
            "output": consumers.get(graph.input_layer, []),
            "input_shapes": [[-1, *graph.input_shape]],
            "output_shapes": [[-1, *graph.input_shape]],
            "original_names": [graph.input_name],
        }
    }
    for layer in graph.layers:
        layers[layer.name] = {
            "type": layer.type,
            "input": list(layer.inputs),
            "output": consumers.get(layer.name, []),
            "input_shapes": [[-1, *shapes[source]] for source in layer.inputs],
            "output_shapes": [[-1, *layer.shape]],
            "original_names": list(layer.original_names),
        }
    for route in graph.outputs:
        layers[route.output_layer] = {
            "type": "output_layer",
            "input": [route.producer],
            "output": [],
            "input_shapes": [[-1, *route.shape]],
            "output_shapes": [[-1, *route.shape]],
            "original_names": [route.original_names[-1]],
        }
    return {
        "name": graph.net_name,
        # LUX exporter.py maps output_layers_order entries as producing-layer names
        "net_params": {"output_layers_order": [r.producer for r in graph.outputs]},
        "layers": layers,
    }


# -- model script -----------------------------------------------------------------------------------------------------
#: commands seen in Hailo's public scripts and call sites (hailo-api.md §2; MZ main_utils.py for resize/input_conversion)
KNOWN_COMMANDS = {
    "normalization",
    "model_optimization_flavor",
    "model_optimization_config",
    "quantization_param",
    "pre_quantization_optimization",
    "post_quantization_optimization",
    "performance_param",
    "resources_param",
    "nms_postprocess",
    "change_output_activation",
    "input_conversion",
    "resize",
}
PRECISION_MODES = {"a8_w8", "a8_w4", "a16_w16", "a8_w8_a16", "a16_w4"}  # hailo-api.md §2 "Precision modes"
_LINE = re.compile(r"^(?:([\w/, ]+?)\s*=\s*)?(\w+)\s*\((.*)\)$")


@dataclass
class Script:
    text: str = ""
    normalization: tuple[list[float], list[float]] | None = None
    optimization_level: int | None = None
    compression_level: int | None = None
    calibset_size: int | None = None
    precision: dict[str, str] = field(default_factory=dict)  # scoped layer -> precision_mode
    output_encoding_vector: bool = False


def _split_args(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _layers(arg: str, graph: Graph) -> list[str]:
    arg = arg.strip()
    if arg.startswith("{"):  # wildcard, e.g. {conv*}
        pattern = arg.strip("{}").strip()
        return [n for n in graph.layer_names() if fnmatch.fnmatch(n.rsplit("/", 1)[-1], pattern)]
    names = [a.strip() for a in arg.strip("[]").split(",") if a.strip()]
    resolved = []
    for name in names:
        scoped = graph.resolve(name)
        if scoped is None:
            raise ModelScriptError(f"layer {name!r} does not exist in the network; layers: {', '.join(graph.layer_names())}")
        resolved.append(scoped)
    return resolved


def parse_script(text: str, graph: Graph) -> Script:
    script = Script(text=text)
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ModelScriptError(f"cannot parse model script line {raw!r}")
        target, command, args_text = match.groups()
        if command not in KNOWN_COMMANDS:
            raise ModelScriptError(f"unknown model script command {command!r} in line {raw!r}")
        args = _split_args(args_text)
        positional = [a for a in args if "=" not in a]
        keywords = dict(a.split("=", 1) for a in args if "=" in a)
        keywords = {k.strip(): v.strip() for k, v in keywords.items()}
        if command == "normalization":
            _normalization(script, target, positional, graph, raw)
        elif command == "model_optimization_flavor":
            _flavor(script, keywords, raw)
        elif command == "model_optimization_config":
            _config(script, positional, keywords, raw)
        elif command == "quantization_param":
            if not positional:
                raise ModelScriptError(f"quantization_param needs a layer: {raw!r}")
            mode = keywords.get("precision_mode")
            if mode is not None and mode not in PRECISION_MODES:
                raise ModelScriptError(f"unknown precision_mode {mode!r} in {raw!r}")
            for layer in _layers(positional[0], graph):
                if mode is not None:
                    script.precision[layer] = mode
    return script


def _normalization(script: Script, target: str | None, positional: list[str], graph: Graph, raw: str) -> None:
    if not target or len(positional) not in (2, 3):
        raise ModelScriptError(f"normalization expects 'name = normalization(mean, std[, layer])': {raw!r}")
    mean, std = (list(map(float, ast.literal_eval(p))) for p in positional[:2])
    channels = graph.input_shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ModelScriptError(f"normalization has {len(mean)}/{len(std)} values for an input with {channels} channels")
    if len(positional) == 3 and graph.resolve(positional[2]) is None:
        raise ModelScriptError(f"normalization layer argument {positional[2]!r} does not exist")
    script.normalization = (mean, std)


def _flavor(script: Script, keywords: dict[str, str], raw: str) -> None:
    unknown = set(keywords) - {"optimization_level", "compression_level", "batch_size"}
    if unknown:
        raise ModelScriptError(f"model_optimization_flavor got unknown argument(s) {sorted(unknown)}: {raw!r}")
    if "optimization_level" in keywords:
        level = int(keywords["optimization_level"])
        if level not in (0, 1, 2, 3, 4, -100):  # hailo-api.md §2: 0..4, or -100 to disable all optimizations
            raise ModelScriptError(f"optimization_level must be 0..4 (or -100), got {level}")
        script.optimization_level = level
    if "compression_level" in keywords:
        level = int(keywords["compression_level"])
        if not 0 <= level <= 5:  # hailo-api.md §2: 0..5
            raise ModelScriptError(f"compression_level must be 0..5, got {level}")
        script.compression_level = level


def _config(script: Script, positional: list[str], keywords: dict[str, str], raw: str) -> None:
    if not positional:
        raise ModelScriptError(f"model_optimization_config needs a section: {raw!r}")
    if positional[0] == "calibration":
        unknown = set(keywords) - {"batch_size", "calibset_size"}
        if unknown:
            raise ModelScriptError(f"model_optimization_config(calibration) got unknown argument(s) {sorted(unknown)}")
        if "calibset_size" in keywords:
            script.calibset_size = int(keywords["calibset_size"])
    elif positional[0] == "globals" and keywords.get("output_encoding_vector") == "enabled":
        script.output_encoding_vector = True


# -- quantization -----------------------------------------------------------------------------------------------------
@dataclass
class QP:
    scale: float
    zp: float
    lo: float  # limvals_min
    hi: float  # limvals_max


def qp_for_range(lo: float, hi: float, bits: int) -> QP:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = (1 << bits) - 1
    scale = float(np.float32(max(hi - lo, 1e-6) / levels))
    zp = float(np.rint(-lo / scale))
    return QP(scale, zp, float(np.float32((0 - zp) * scale)), float(np.float32((levels - zp) * scale)))


@dataclass
class OutputQuant:
    bits: int
    qps: list[QP]  # one, or one per channel (last axis)


@dataclass
class LayerQuant:
    """A hidden layer's activation quantization: 8 bits, or 16 for a16_* precision modes (hailo-api.md §2)."""

    bits: int
    qp: QP


@dataclass
class Quantization:
    input_bits: int
    input_qp: QP
    outputs: list[OutputQuant]
    normalization: tuple[list[float], list[float]] | None
    optimization_level: int  # effective
    compression_level: int  # effective
    layers: dict[str, LayerQuant] = field(default_factory=dict)  # hidden layers by scoped name

    @property
    def error_lsb(self) -> float:
        return 0.25 * (4 - max(self.optimization_level, 0)) + 0.35 * self.compression_level

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Quantization:
        outs = [OutputQuant(o["bits"], [QP(**q) for q in o["qps"]]) for o in data["outputs"]]
        norm = data["normalization"]
        layers = {name: LayerQuant(v["bits"], QP(**v["qp"])) for name, v in (data.get("layers") or {}).items()}
        return cls(
            data["input_bits"], QP(**data["input_qp"]), outs, tuple(norm) if norm else None,  # type: ignore[arg-type]
            data["optimization_level"], data["compression_level"], layers,
        )


def dtype_for(bits: int) -> np.dtype:
    return np.dtype(np.uint16 if bits == 16 else np.uint8)


def _arrays(qps: list[QP]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([q.scale for q in qps], np.float32), np.array([q.zp for q in qps], np.float32)


def quantize(x: np.ndarray, qps: list[QP], bits: int, clip_limvals: bool = False) -> np.ndarray:
    scale, zp = _arrays(qps)
    x = np.asarray(x, np.float32)
    if clip_limvals:
        lo, hi = np.array([q.lo for q in qps], np.float32), np.array([q.hi for q in qps], np.float32)
        x = np.clip(x, lo, hi)
    q = np.rint(x / scale + zp)
    return np.clip(q, 0, (1 << bits) - 1).astype(dtype_for(bits))


def dequantize(raw: np.ndarray, qps: list[QP]) -> np.ndarray:
    scale, zp = _arrays(qps)
    return ((raw.astype(np.float32) - zp) * scale).astype(np.float32)


def _fake_quant_nodes(src: str, dst: str, lq: LayerQuant) -> tuple[list[Any], list[Any]]:
    """ONNX nodes computing ``dequantize(quantize(src))`` in float32, in the same order of operations as
    ``quantize``/``dequantize`` above (Round is round-half-to-even like ``np.rint``)."""
    p = f"{src}__fq"
    consts = {
        f"{p}_scale": lq.qp.scale,
        f"{p}_zp": lq.qp.zp,
        f"{p}_min": 0.0,
        f"{p}_max": float((1 << lq.bits) - 1),
    }
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [], [np.float32(value)]) for name, value in consts.items()]
    nodes = [
        helper.make_node("Div", [src, f"{p}_scale"], [f"{p}_div"], name=f"{p}_div"),
        helper.make_node("Add", [f"{p}_div", f"{p}_zp"], [f"{p}_add"], name=f"{p}_add"),
        helper.make_node("Round", [f"{p}_add"], [f"{p}_round"], name=f"{p}_round"),
        helper.make_node("Clip", [f"{p}_round", f"{p}_min", f"{p}_max"], [f"{p}_clip"], name=f"{p}_clip"),
        helper.make_node("Sub", [f"{p}_clip", f"{p}_zp"], [f"{p}_sub"], name=f"{p}_sub"),
        helper.make_node("Mul", [f"{p}_sub", f"{p}_scale"], [dst], name=f"{p}_mul"),
    ]
    return nodes, inits


def chain_model(onnx_bytes: bytes, graph: Graph, layers: dict[str, LayerQuant]) -> tuple[bytes, dict[str, str]]:
    """The network with every hidden layer's output quantized and dequantized in place, so the layers after it compute
    on its integer grid, as on a chip with 8- or 16-bit activations. Returns the model (every hidden layer's quantized
    value exposed as an output) and {layer name: tensor holding that value}.

    A simplification of this fake: output layers are quantized after the network (``run_quantized``, with the extra
    error); layers that read an output layer's value inside the network read it in float.
    """
    hidden = {layer.tensor: layer.name for layer in graph.hidden_layers() if layer.name in layers}
    renamed = {tensor: f"{tensor}__fq" for tensor in hidden}
    taps = {name: renamed[tensor] for tensor, name in hidden.items()}
    key = ("chain", onnx_bytes, tuple(sorted((k, v.bits, v.qp.scale, v.qp.zp) for k, v in layers.items())))
    if key not in _MODELS:
        model = onnx.load_from_string(onnx_bytes)
        nodes: list[Any] = []
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
            nodes.append(node)
            for out in node.output:
                if out in hidden:
                    extra, inits = _fake_quant_nodes(out, renamed[out], layers[hidden[out]])
                    nodes.extend(extra)
                    model.graph.initializer.extend(inits)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _with_outputs(model, list(taps.values()))
        _MODELS[key] = model.SerializeToString()
    return _MODELS[key], taps


def _hn_layout(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if value.ndim == 4 else value


def run_network(
    onnx_bytes: bytes,
    graph: Graph,
    x_nhwc: np.ndarray,
    normalization: Any,
    layers: dict[str, LayerQuant] | None = None,
    taps: bool = False,
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """(float outputs in HN layout and order, {hidden layer: value} when ``taps``); hidden layers quantized in place
    when ``layers`` is given (``chain_model``); the normalization layer first when the script has one."""
    x = np.asarray(x_nhwc, np.float32)
    if normalization is not None:
        mean, std = (np.asarray(v, np.float32) for v in normalization)
        x = ((x - mean) / std).astype(np.float32)
    if layers:
        model, tap_names = chain_model(onnx_bytes, graph, layers)
    else:
        tap_names = {layer.name: layer.tensor for layer in graph.hidden_layers()}
        model = tapped_model(onnx_bytes, list(tap_names.values())) if taps else onnx_bytes
    names = [r.onnx_output for r in graph.outputs] + (list(tap_names.values()) if taps else [])
    values = session(model).run(names, {graph.input_name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
    outs = [_hn_layout(v) for v in values[: len(graph.outputs)]]
    hidden = dict(zip(tap_names, values[len(graph.outputs) :], strict=True)) if taps else {}
    return outs, hidden


def run_float(onnx_bytes: bytes, graph: Graph, x_nhwc: np.ndarray, normalization: Any) -> list[np.ndarray]:
    """Float outputs in HN layout and HN output order; the normalization layer first when the script has one."""
    return run_network(onnx_bytes, graph, x_nhwc, normalization)[0]


def calibrate(onnx_bytes: bytes, graph: Graph, script: Script, calib: np.ndarray, opt: int, comp: int) -> Quantization:
    input_bits = 16 if script.precision.get(graph.input_layer) == "a16_w16" else 8
    input_qp = qp_for_range(float(calib.min()), float(calib.max()), input_bits)
    outs, hidden = run_network(onnx_bytes, graph, calib, script.normalization, taps=True)
    quants = []
    for route, y in zip(graph.outputs, outs, strict=True):
        sixteen = "a16_w16" in (script.precision.get(route.output_layer), script.precision.get(route.producer))
        bits = 16 if sixteen else 8
        if script.output_encoding_vector:
            flat = y.reshape(-1, y.shape[-1])
            qps = [qp_for_range(flat[:, c].min(), flat[:, c].max(), bits) for c in range(flat.shape[1])]
        else:
            qps = [qp_for_range(y.min(), y.max(), bits)]
        quants.append(OutputQuant(bits, qps))
    layers = {}
    for name, value in hidden.items():  # ranges from the float network on the calibration set
        bits = 16 if script.precision.get(name, "").startswith("a16") else 8
        layers[name] = LayerQuant(bits, qp_for_range(float(value.min()), float(value.max()), bits))
    return Quantization(input_bits, input_qp, quants, script.normalization, opt, comp, layers)


def _error(shape: tuple[int, ...], qps: list[QP], amount_lsb: float) -> np.ndarray:
    """Deterministic per-element error pattern (the same for every sample), ``amount_lsb`` output LSBs tall."""
    size = int(np.prod(shape[1:]))
    pattern = np.sin(np.arange(size, dtype=np.float64) * 1.7 + 0.3).reshape(shape[1:]).astype(np.float32)
    scale, _ = _arrays(qps)
    return (np.float32(amount_lsb) * pattern * scale).astype(np.float32)


def _output_integers(outs: list[np.ndarray], q: Quantization) -> list[np.ndarray]:
    """The output layers' integers: the extra error added, then rounded to each output's grid."""
    return [quantize(y + _error(y.shape, oq.qps, q.error_lsb), oq.qps, oq.bits) for y, oq in zip(outs, q.outputs, strict=True)]


def run_quantized(onnx_bytes: bytes, graph: Graph, q: Quantization, raw_input: np.ndarray) -> list[np.ndarray]:
    """Raw output integers from raw input integers: what the fake chip (and quantized emulation) computes."""
    x = dequantize(raw_input, [q.input_qp])
    outs, _ = run_network(onnx_bytes, graph, x, q.normalization, q.layers)
    return _output_integers(outs, q)


#: share of output elements on which the fake's quantized (not bit-exact) emulation rounds one step off the chip
DRIFT_SHARE = 0.06


def _drift(raw: np.ndarray, bits: int) -> np.ndarray:
    """The chip's integers moved one step up or down on a fixed ~``DRIFT_SHARE`` of the elements: the fake's stand-in
    for the normal rounding differences between SDK_QUANTIZED and the hardware (issue 11 measured 92-95 % identical at
    8 bit); where and in which direction is this fake's own deterministic pattern."""
    index = np.arange(raw.size, dtype=np.int64).reshape(raw.shape)
    hashed = (index * 2654435761) % 1000
    step = np.where(hashed < DRIFT_SHARE * 500, 1, np.where(hashed >= 1000 - DRIFT_SHARE * 500, -1, 0))
    return np.clip(raw.astype(np.int64) + step, 0, (1 << bits) - 1).astype(raw.dtype)


def emulate_quantized(onnx_bytes: bytes, graph: Graph, q: Quantization, x_nhwc: np.ndarray, rounding_drift: bool = False) -> list[np.ndarray]:
    """Dequantized outputs of the fake chip on ``x_nhwc`` (bit-exact); with ``rounding_drift``, the quantized
    emulation's few one-step differences from it (see ``_drift``)."""
    raw_in = quantize(x_nhwc, [q.input_qp], q.input_bits, clip_limvals=True)
    raws = run_quantized(onnx_bytes, graph, q, raw_in)
    if rounding_drift:
        raws = [_drift(r, oq.bits) for r, oq in zip(raws, q.outputs, strict=True)]
    return [dequantize(r, oq.qps) for r, oq in zip(raws, q.outputs, strict=True)]


# -- layer noise analysis ------------------------------------------------------------------------------------------------
def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10*log10(signal power / noise power) in float64: +inf when identical, -inf when the reference is all zeros."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(10.0 * np.log10(np.float64(signal) / np.float64(noise)))


def layer_noise(onnx_bytes: bytes, graph: Graph, q: Quantization, x_nhwc: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-layer SNR (dB) of the fake's quantized network against its float network on ``x_nhwc``, two ways:

    - ``snr``: the layer's value in the quantized network (every earlier layer quantized too) against float;
    - ``partial_snr``: the layer's own quantization alone, applied to its float value.

    Both come from the same numbers the fake's emulator and chip compute, so a layer moved to 16 bits gains ~48 dB of
    ``partial_snr`` and its ``snr`` rises as far as the noise inherited from earlier layers allows. Output layers
    carry their producer's values (the emulator's dequantized output, extra error included).
    """
    x = np.asarray(x_nhwc, np.float32)
    x_q = dequantize(quantize(x, [q.input_qp], q.input_bits, clip_limvals=True), [q.input_qp])
    float_outs, float_hidden = run_network(onnx_bytes, graph, x, q.normalization, taps=True)
    quant_outs, quant_hidden = run_network(onnx_bytes, graph, x_q, q.normalization, q.layers, taps=True)
    input_snr = snr_db(x, x_q)
    result = {graph.input_layer: {"snr": input_snr, "partial_snr": input_snr}}
    for name, value in float_hidden.items():
        lq = q.layers[name]
        own = dequantize(quantize(value, [lq.qp], lq.bits), [lq.qp])
        result[name] = {"snr": snr_db(value, quant_hidden[name]), "partial_snr": snr_db(value, own)}
    emulated = [dequantize(r, oq.qps) for r, oq in zip(_output_integers(quant_outs, q), q.outputs, strict=True)]
    own_outs = [dequantize(r, oq.qps) for r, oq in zip(_output_integers(float_outs, q), q.outputs, strict=True)]
    for route, f, e, o in zip(graph.outputs, float_outs, emulated, own_outs, strict=True):
        values = {"snr": snr_db(f, e), "partial_snr": snr_db(f, o)}
        result[route.producer] = values
        result[route.output_layer] = dict(values)
    return result


# -- files --------------------------------------------------------------------------------------------------------------
def write_har(path: str, state: dict[str, Any], onnx_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("har.json", json.dumps(state))
        zf.writestr("model.onnx", onnx_bytes)


def read_har(path: str) -> tuple[dict[str, Any], bytes]:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("har.json")), zf.read("model.onnx")


def hef_bytes(hw_arch: str, graph: Graph, q: Quantization, onnx_bytes: bytes) -> bytes:
    payload = {
        "hw_arch": hw_arch,
        "graph": graph.to_json(),
        "quantization": q.to_json(),
        "onnx": base64.b64encode(onnx_bytes).decode(),
    }
    return HEF_MAGIC + json.dumps(payload).encode()


@dataclass
class HefModel:
    hw_arch: str
    graph: Graph
    quantization: Quantization
    onnx_bytes: bytes


def read_hef(data: bytes) -> HefModel:
    if not data.startswith(HEF_MAGIC):
        raise ValueError("not a fake HEF")
    payload = json.loads(io.BytesIO(data[len(HEF_MAGIC) :]).read())
    return HefModel(
        payload["hw_arch"],
        Graph.from_json(payload["graph"]),
        Quantization.from_json(payload["quantization"]),
        base64.b64decode(payload["onnx"]),
    )
