"""Shared internals of the two contract fakes (``hailo_sdk_client`` and ``hailo_platform``). Test-only.

The fakes follow Hailo's *documented API*; the numbers they compute are this file's own, simple stand-ins, chosen
so a sweep on the fakes is meaningful, NOT Hailo's algorithms (which are closed source):

- the network is run with onnxruntime (NCHW inside, NHWC at the API, as the HN is NHWC: hailo-api.md §1.2);
- the model script's ``normalization`` layer is applied first when present (hailo-api.md §1.4);
- "quantization" = per-output min/max ranges over the calibration set, rounding to 8 or 16 bits (16 for layers
  set to ``precision_mode=a16_w16``), per channel when ``output_encoding_vector=enabled`` (hailo-api.md §2, §3.5);
- a deterministic extra error of ``0.25*(4-optimization_level) + 0.35*compression_level`` LSB (effective levels) is
  added before output rounding, so trials at different levels give different numbers (an invention of this fake);
- quantize/dequantize use HailoRT's formulas in float32 (``quantization.hpp``: ``q = bankers_round(clip(x, limvals)
  / qp_scale + qp_zp)``, ``x = (q - qp_zp) * qp_scale``).

HAR and HEF files written by the fakes are this file's own formats (a zip, a JSON blob); only the fakes read them.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

HEF_MAGIC = b"FAKEHEF1\n"
_SESSIONS: dict[str, ort.InferenceSession] = {}
_ACTIVATIONS = {"Relu", "Sigmoid", "Clip", "LeakyRelu", "Tanh", "HardSigmoid"}
_KINDS = {"Conv": ("conv", "conv"), "Gemm": ("fc", "dense"), "MatMul": ("fc", "dense")}


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
class Graph:
    net_name: str
    input_name: str  # ONNX input tensor
    input_layer: str  # scoped input layer
    input_shape: list[int]  # [H, W, C]
    outputs: list[OutputRoute]

    def layer_names(self) -> list[str]:
        names = [self.input_layer]
        for route in self.outputs:
            names += [route.producer, route.output_layer]
        return names

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
        return cls(**{**data, "outputs": [OutputRoute(**o) for o in data["outputs"]]})


def session(onnx_bytes: bytes) -> ort.InferenceSession:
    key = hashlib.sha256(onnx_bytes).hexdigest()
    if key not in _SESSIONS:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        _SESSIONS[key] = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def translate(
    onnx_path: str,
    net_name: str,
    start_node_names: list[str] | None,
    end_node_names: list[str] | None,
    net_input_shapes: dict[str, list[int]] | None,
) -> tuple[Graph, bytes]:
    """A reduced HN: the input layer, each output's producing layer and its output_layerN. Whole graphs only."""
    onnx_bytes = Path(onnx_path).read_bytes()
    model = onnx.load_from_string(onnx_bytes)
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
    producers = {out: node for node in model.graph.node for out in node.output}
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

    sess = session(onnx_bytes)
    probe = sess.run(graph_outputs, {inp.name: np.zeros((1, c, h, w), np.float32)})
    counters: dict[str, int] = {}
    routes = []
    for index, (out, value) in enumerate(zip(graph_outputs, probe, strict=True), 1):
        node = producers[out]
        base = node
        feeding = producers.get(node.input[0]) if node.input else None
        if node.op_type in _ACTIVATIONS and feeding is not None and feeding.op_type in _KINDS:
            base = feeding  # an activation fused into its conv/dense layer
        prefix = _KINDS.get(base.op_type, (base.op_type.lower(), base.op_type.lower()))[0]
        counters[prefix] = counters.get(prefix, 0) + 1
        originals = [base.name, node.name] if base is not node else [node.name]
        if value.ndim == 4:
            shape, order = [int(value.shape[2]), int(value.shape[3]), int(value.shape[1])], "NHWC"
        elif value.ndim == 2:
            shape, order = [int(value.shape[1])], "NC"
        else:
            raise ParsingError(f"the fake supports 4-D and 2-D outputs, {out!r} is {value.ndim}-D")
        routes.append(OutputRoute(f"{net_name}/{prefix}{counters[prefix]}", f"{net_name}/output_layer{index}", out, originals, shape, order))
    graph = Graph(net_name, inp.name, f"{net_name}/input_layer1", [h, w, c], routes)
    return graph, onnx_bytes


def hn_dict(graph: Graph) -> dict[str, Any]:
    """The HN as a dict (hailo-api.md §1.6: layers[name] = {type, input, output, original_names, input_shapes})."""
    layers: dict[str, Any] = {
        graph.input_layer: {
            "type": "input_layer",
            "input": [],
            "output": [r.producer for r in graph.outputs],
            "input_shapes": [[-1, *graph.input_shape]],
            "output_shapes": [[-1, *graph.input_shape]],
            "original_names": [graph.input_name],
        }
    }
    for route in graph.outputs:
        kind = "dense" if route.order == "NC" else "conv"
        layers[route.producer] = {
            "type": kind,
            "input": [graph.input_layer],  # reduced HN: intermediate layers are not listed
            "output": [route.output_layer],
            "input_shapes": [[-1, *graph.input_shape]],
            "output_shapes": [[-1, *route.shape]],
            "original_names": list(route.original_names),
        }
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
class Quantization:
    input_bits: int
    input_qp: QP
    outputs: list[OutputQuant]
    normalization: tuple[list[float], list[float]] | None
    optimization_level: int  # effective
    compression_level: int  # effective

    @property
    def error_lsb(self) -> float:
        return 0.25 * (4 - max(self.optimization_level, 0)) + 0.35 * self.compression_level

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Quantization:
        outs = [OutputQuant(o["bits"], [QP(**q) for q in o["qps"]]) for o in data["outputs"]]
        norm = data["normalization"]
        return cls(
            data["input_bits"], QP(**data["input_qp"]), outs, tuple(norm) if norm else None,  # type: ignore[arg-type]
            data["optimization_level"], data["compression_level"],
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


def run_float(onnx_bytes: bytes, graph: Graph, x_nhwc: np.ndarray, normalization: Any) -> list[np.ndarray]:
    """Float outputs in HN layout and HN output order; the normalization layer first when the script has one."""
    x = np.asarray(x_nhwc, np.float32)
    if normalization is not None:
        mean, std = (np.asarray(v, np.float32) for v in normalization)
        x = ((x - mean) / std).astype(np.float32)
    sess = session(onnx_bytes)
    outs = sess.run([r.onnx_output for r in graph.outputs], {graph.input_name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
    return [np.ascontiguousarray(o.transpose(0, 2, 3, 1)) if o.ndim == 4 else o for o in outs]


def calibrate(onnx_bytes: bytes, graph: Graph, script: Script, calib: np.ndarray, opt: int, comp: int) -> Quantization:
    input_bits = 16 if script.precision.get(graph.input_layer) == "a16_w16" else 8
    input_qp = qp_for_range(float(calib.min()), float(calib.max()), input_bits)
    outs = run_float(onnx_bytes, graph, calib, script.normalization)
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
    return Quantization(input_bits, input_qp, quants, script.normalization, opt, comp)


def _error(shape: tuple[int, ...], qps: list[QP], amount_lsb: float) -> np.ndarray:
    """Deterministic per-element error pattern (the same for every sample), ``amount_lsb`` output LSBs tall."""
    size = int(np.prod(shape[1:]))
    pattern = np.sin(np.arange(size, dtype=np.float64) * 1.7 + 0.3).reshape(shape[1:]).astype(np.float32)
    scale, _ = _arrays(qps)
    return (np.float32(amount_lsb) * pattern * scale).astype(np.float32)


def run_quantized(onnx_bytes: bytes, graph: Graph, q: Quantization, raw_input: np.ndarray) -> list[np.ndarray]:
    """Raw output integers from raw input integers: what the fake chip (and quantized emulation) computes."""
    x = dequantize(raw_input, [q.input_qp])
    outs = run_float(onnx_bytes, graph, x, q.normalization)
    raws = []
    for y, oq in zip(outs, q.outputs, strict=True):
        y = y + _error(y.shape, oq.qps, q.error_lsb)
        raws.append(quantize(y, oq.qps, oq.bits))
    return raws


def emulate_quantized(onnx_bytes: bytes, graph: Graph, q: Quantization, x_nhwc: np.ndarray) -> list[np.ndarray]:
    raw_in = quantize(x_nhwc, [q.input_qp], q.input_bits, clip_limvals=True)
    return [dequantize(r, oq.qps) for r, oq in zip(run_quantized(onnx_bytes, graph, q, raw_in), q.outputs, strict=True)]


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
