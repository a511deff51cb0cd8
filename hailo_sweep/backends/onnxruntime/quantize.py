"""One ``quantize_static`` call of the embedded backend: the recipe's types, overrides and calibrated ranges.

Calibration never happens inside ``quantize_static`` here: the ranges come from ``calibration.Calibrator`` (one cached
pass per model, data and method), merged for the recipe's clipping scope into one table, which ``quantize_static``
reads as its ``calibration_cache_path``. Everything else is ``quantize_static``'s default for the knobs that are not
set: QDQ, uint8 activations, int8 weights, per-channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData

from hailo_sweep.backends.onnxruntime.weights import WeightTensor, select_4bit_weights, tensor_producers, weight_tensors
from hailo_sweep.backends.onnxruntime.calibration import Calibrator, merge, write_table
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer
from hailo_sweep.backends.onnxruntime.recipe import Recipe
from hailo_sweep.settings import Settings

PASS_THROUGH = ("Relu", "Clip", "MaxPool", "LeakyRelu")  # ops whose output is "the layer's" activation
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")

Overrides = dict[str, list[dict[str, Any]]]


def uint8_input_override(input_name: str) -> Overrides:
    """Raw uint8 frames are the quantized input itself: scale 1, zero point 0 (doc §5 D)."""
    return {input_name: [{"quant_type": QuantType.QUInt8, "scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}]}


def overrides(
    model: onnx.ModelProto, settings: Settings, recipe: Recipe, uint8_input: str | None, noisy: list[str]
) -> tuple[Overrides, list[WeightTensor], float]:
    """Per-tensor overrides: 16-bit outputs and noisy layers (with their weights), 4-bit weights, the uint8 input."""
    out: Overrides = {}
    weights = {w.node: w for w in weight_tensors(model)}
    producers = tensor_producers(model, [t for node in model.graph.node for t in node.output])
    sixteen: set[str] = set()
    for name in (*settings.output_16bit, *noisy):
        out[name] = [{"quant_type": QuantType.QUInt16}]
        node = producers.get(name)
        # a16_w16 is a property of the layer: an activation or pooling output is promoted with the conv feeding it
        while node is not None and node.name not in weights and node.op_type in PASS_THROUGH and node.input:
            node = producers.get(node.input[0])
        if node is not None and node.name in weights:
            w = weights[node.name]
            out[w.name] = [{"quant_type": QuantType.QInt16, **({"axis": w.out_axis} if recipe.per_channel else {})}]
            sixteen.add(w.name)
    chosen: list[WeightTensor] = []
    share = 0.0
    if recipe.share_4bit > 0 and not recipe.all_16bit:  # all_16bit: every weight at 16 bit, none at 4
        chosen, share = select_4bit_weights(model, recipe.share_4bit)
        chosen = [w for w in chosen if w.name not in sixteen]
    for w in chosen:
        out[w.name] = [{"quant_type": QuantType.QInt4, **({"axis": w.out_axis} if recipe.per_channel else {})}]
    if uint8_input is not None:
        out.update(uint8_input_override(uint8_input))
    return out, chosen, share


def scope_tensors(model: onnx.ModelProto, scope: str) -> set[str] | None:
    """Activation tensors a clipping scope names: None for all; ``first``: the first weight layer's output and the
    pass-through ops right after it; ``outputs``: the graph outputs and the pass-through chain back to their layer."""
    if scope == "all":
        return None
    nodes = list(model.graph.node)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensors: set[str] = set()
    if scope == "first":
        first = next((n for n in nodes if n.op_type in WEIGHT_OPS), None)
        if first is None:
            return set()
        current = first.output[0]
        tensors.add(current)
        while len(consumers.get(current, [])) == 1 and consumers[current][0].op_type in PASS_THROUGH:
            current = consumers[current][0].output[0]
            tensors.add(current)
        return tensors
    if scope == "outputs":
        producers = tensor_producers(model, [t for n in nodes for t in n.output])
        for value in model.graph.output:
            current = value.name
            tensors.add(current)
            node = producers.get(current)
            while node is not None and node.op_type in PASS_THROUGH and node.input:
                current = node.input[0]
                tensors.add(current)
                node = producers.get(current)
        return tensors
    raise ValueError(f"unknown clipping scope {scope!r}")


def ranges(model: onnx.ModelProto, calibrator: Calibrator, recipe: Recipe) -> TensorsData:
    """The trial's activation ranges: MinMax everywhere, the recipe's statistic on the scoped tensors."""
    base = calibrator.minmax()
    if recipe.calibrate_method == "MinMax":
        return base
    clipped = calibrator.table(recipe.calibrate_method.lower(), recipe.percentile)
    return merge(base, clipped, scope_tensors(model, recipe.clipping_scope))


def quantize(model: onnx.ModelProto, table: TensorsData, recipe: Recipe, extra: Overrides, out_path: Path) -> onnx.ModelProto:
    """``quantize_static`` of ``model`` with the given ranges (no calibration inside) and the recipe's types."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table_path = write_table(table, out_path.with_suffix(".ranges.json"))
    # quantize_static rewrites a ModelProto argument in place (external data), so it gets a file of its own
    source = out_path.with_suffix(".input.onnx")
    onnx.save(model, str(source))
    with quiet_quantizer():
        quantize_static(
            str(source),
            str(out_path),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            activation_type=QuantType.QUInt16 if recipe.all_16bit else QuantType.QUInt8,
            weight_type=QuantType.QInt16 if recipe.all_16bit else QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"QDQKeepRemovableActivations": recipe.keep_activations, "TensorQuantOverrides": extra},
            calibration_cache_path=str(table_path),
        )
    source.unlink(missing_ok=True)
    return onnx.load(str(out_path))
