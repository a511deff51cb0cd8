"""Tests for the embedded backend's ONNX graph transforms (graph.py) and CLE / bias correction (equalize.py).

Models are built here with onnx.helper; quantized models come from onnxruntime's quantize_static with the settings
the backend uses (QDQ, per-channel, QUInt8 activations, QInt8 weights, ReLUs kept). Expected values come from
ONNX Runtime itself (reference runs, ORT's own DequantizeLinear) or from numpy written in this file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from hailo_sweep.backends.onnxruntime import graph
from hailo_sweep.backends.onnxruntime.weights import WeightTensor, output_producers, select_4bit_weights, weight_tensors
from hailo_sweep.backends.onnxruntime.equalize import bias_correction, cross_layer_equalize

DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

# -------------------------------------------------------------------------------------------------------------
# model builders and runners
# -------------------------------------------------------------------------------------------------------------


def _f32(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(
    nodes: list[onnx.NodeProto], inputs: list[Any], outputs: list[Any], inits: list[TensorProto]
) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "test", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def cnn(seed: int = 0, trans_b: int = 1) -> onnx.ModelProto:
    """input (N,1,16,16) -> Conv3x3+Relu -> MaxPool -> Conv3x3+Relu -> Conv1x1+Relu -> featmap (Conv1x1) and
    logits (GlobalAveragePool -> Flatten -> Gemm).

    conv1's output channels span three decades of scale so equalization and per-tensor quantization have work to do.
    """
    rng = np.random.default_rng(seed)
    spread1 = 10 ** np.linspace(-1.5, 1.5, 8)
    spread3 = 10 ** np.linspace(1.0, -1.0, 16)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)) * spread1[:, None, None, None]
    b1 = rng.normal(0, 0.1, 8) * spread1
    w2 = rng.normal(0, 0.2, (16, 8, 3, 3)) / np.sqrt(spread1)[None, :, None, None]
    b2 = rng.normal(0, 0.1, 16)
    w3 = rng.normal(0, 0.3, (16, 16, 1, 1)) * spread3[:, None, None, None]
    w4 = rng.normal(0, 0.3, (4, 16, 1, 1))
    b4 = rng.normal(0, 0.1, 4)
    wf = rng.normal(0, 0.3, (10, 16))
    bf = rng.normal(0, 0.1, 10)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["featmap"], name="head", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=trans_b),
    ]
    inits = [_f32("w1", w1), _f32("b1", b1), _f32("w2", w2), _f32("b2", b2), _f32("w3", w3), _f32("w4", w4)]
    inits += [_f32("b4", b4), _f32("wf", wf if trans_b else wf.T), _f32("bf", bf)]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [
            helper.make_tensor_value_info("featmap", TensorProto.FLOAT, ["N", 4, 8, 8]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel = DISABLE_ALL
) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


class _Reader(CalibrationDataReader):
    def __init__(self, data: np.ndarray, name: str, batch: int = 8):
        self.data, self.name, self.batch, self.pos = data, name, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.data):
            return None
        chunk = self.data[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def quantize(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    input_name: str,
    tmp_path: Path,
    per_channel: bool = True,
    overrides: dict[str, list[dict[str, Any]]] | None = None,
    weight_type: QuantType = QuantType.QInt8,
) -> onnx.ModelProto:
    out = tmp_path / f"q{len(list(tmp_path.iterdir()))}.onnx"
    extra: dict[str, Any] = {"QDQKeepRemovableActivations": True}
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    quantize_static(
        _copy(model),  # quantize_static(ModelProto) moves the caller's initializers to a deleted temp file
        str(out),
        _Reader(calibration.astype(np.float32), input_name),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=weight_type,
        extra_options=extra,
    )
    return onnx.load(str(out))


def images(n: int, seed: int, shape: Sequence[int] = (1, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, *shape)).astype(np.float32)


def ort_dequantized_weight(qdq: onnx.ModelProto, consumer: str) -> np.ndarray:
    """The weight a QDQ node really uses, computed by ORT's own DequantizeLinear on the stored initializers."""
    nodes = {n.name: n for n in qdq.graph.node}
    dq = next(n for n in qdq.graph.node if n.output[0] == nodes[consumer].input[1])
    inits = [i for i in qdq.graph.initializer if i.name in dq.input]
    probe = helper.make_model(
        helper.make_graph(
            [dq], "dq", [], [helper.make_tensor_value_info(dq.output[0], TensorProto.FLOAT, None)], inits
        ),
        opset_imports=list(qdq.opset_import),
    )
    probe.ir_version = qdq.ir_version
    return run(probe, {})[dq.output[0]].astype(np.float64)


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return images(48, seed=1)


# -------------------------------------------------------------------------------------------------------------
# prepend_normalization
# -------------------------------------------------------------------------------------------------------------


def _three_channel_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    return _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [_f32("w", rng.normal(size=(4, 3, 3, 3))), _f32("b", rng.normal(size=4))],
    )


def test_prepend_normalization_equals_host_normalization_per_channel() -> None:
    model = _three_channel_conv()
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    normed = graph.prepend_normalization(model, "x", mean, std, "raw")
    onnx.checker.check_model(normed, full_check=True)

    assert [i.name for i in normed.graph.input] == ["raw"]
    assert normed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [n.op_type for n in normed.graph.node[:2]] == ["Mul", "Add"]  # quantizable ops, not Sub/Div
    assert normed.graph.node[1].output[0] == "x"
    consts = {i.name: numpy_helper.to_array(i) for i in normed.graph.initializer}
    assert consts[normed.graph.node[0].input[1]].shape == (1, 3, 1, 1)
    assert [i.name for i in model.graph.input] == ["x"]  # argument untouched

    raw = np.random.default_rng(0).uniform(0, 255, (2, 3, 6, 6)).astype(np.float32)
    host = (raw - np.array(mean, np.float32)[None, :, None, None]) / np.array(std, np.float32)[None, :, None, None]
    expected = run(model, {"x": host})["y"]
    got = run(normed, {"raw": raw})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_prepend_normalization_single_value_broadcasts() -> None:
    model = cnn()
    normed = graph.prepend_normalization(model, "input", [0.25], [0.5], "image")
    raw = images(3, seed=5)
    expected = run(model, {"input": (raw - 0.25) / 0.5})
    got = run(normed, {"image": raw})
    for name in ("featmap", "logits"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-4)


def test_prepend_normalization_rejects_bad_arguments() -> None:
    model = _three_channel_conv()
    with pytest.raises(ValueError, match="channels"):
        graph.prepend_normalization(model, "x", [1.0, 2.0], [1.0, 1.0], "raw")
    with pytest.raises(ValueError, match="already"):
        graph.prepend_normalization(model, "x", [0.0], [1.0], "w")
    with pytest.raises(ValueError, match="non-zero"):
        graph.prepend_normalization(model, "x", [0.0], [0.0], "raw")
    with pytest.raises(ValueError, match="no graph input"):
        graph.prepend_normalization(model, "nope", [0.0], [1.0], "raw")


# -------------------------------------------------------------------------------------------------------------
# make_input_uint8
# -------------------------------------------------------------------------------------------------------------


def _uint8_override(scale: float = 1.0, zero_point: int = 0, qtype: QuantType = QuantType.QUInt8) -> dict[str, Any]:
    zp_dtype = np.uint8 if qtype == QuantType.QUInt8 else np.int8
    override = {"quant_type": qtype, "scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, zp_dtype)}
    return {"image": [override]}


def test_make_input_uint8_matches_qdq_model_on_float_frames(tmp_path: Path) -> None:
    normed = graph.prepend_normalization(cnn(), "input", [127.5], [64.0], "image")
    frames = np.random.default_rng(2).integers(0, 256, (40, 1, 16, 16), dtype=np.uint8)
    qdq = quantize(normed, frames[:32].astype(np.float32), "image", tmp_path, overrides=_uint8_override())
    u8 = graph.make_input_uint8(qdq, "image")
    onnx.checker.check_model(u8)

    assert u8.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert not any(n.op_type == "QuantizeLinear" and "image" in n.input for n in u8.graph.node)
    assert qdq.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # argument untouched
    held_out = frames[32:]
    for level in (DISABLE_ALL, ENABLE_ALL):
        expected = run(qdq, {"image": held_out.astype(np.float32)}, level)
        got = run(u8, {"image": held_out}, level)
        for name in ("featmap", "logits"):
            assert np.array_equal(got[name], expected[name]), (name, level)

    # the compiled form: uint8 frames in, raw integers out
    compiled, quant = graph.strip_output_dequantize(u8)
    expected = run(qdq, {"image": held_out.astype(np.float32)}, ENABLE_ALL)
    raw = run(compiled, {"image": held_out}, ENABLE_ALL)
    for name, q in quant.items():
        deq = (raw[name].astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
        assert np.array_equal(deq, expected[name]), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (None, "scale"),  # calibrated input scale, not 1
        (_uint8_override(zero_point=128), "zero point"),
        (_uint8_override(qtype=QuantType.QInt8), "INT8"),
    ],
)
def test_make_input_uint8_rejects_lossy_input_quantization(tmp_path: Path, override: Any, message: str) -> None:
    normed = graph.prepend_normalization(cnn(), "input", [127.5], [64.0], "image")
    # frames up to 199 only: a calibrated 0..255 range would give scale 1 / zero point 0 by itself
    frames = np.random.default_rng(2).integers(0, 200, (16, 1, 16, 16)).astype(np.float32)
    qdq = quantize(normed, frames, "image", tmp_path, overrides=override)
    with pytest.raises(ValueError, match=message):
        graph.make_input_uint8(qdq, "image")


def test_make_input_uint8_requires_a_quantized_input() -> None:
    with pytest.raises(ValueError, match="QuantizeLinear"):
        graph.make_input_uint8(cnn(), "input")


# -------------------------------------------------------------------------------------------------------------
# strip_output_dequantize / read_output_quant (acceptance: raw outputs dequantize bit-exactly)
# -------------------------------------------------------------------------------------------------------------


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.mark.parametrize(
    ("overrides", "dtypes"),
    [
        (None, {"featmap": np.uint8, "logits": np.uint8}),
        ({"logits": [{"quant_type": QuantType.QUInt16}]}, {"featmap": np.uint8, "logits": np.uint16}),
    ],
    ids=["all-8bit", "logits-16bit"],
)
def test_stripped_raw_outputs_dequantize_bit_exactly(
    tmp_path: Path, calib: np.ndarray, overrides: Any, dtypes: dict[str, type]
) -> None:
    qdq = quantize(cnn(), calib, "input", tmp_path, overrides=overrides)
    stripped, quant = graph.strip_output_dequantize(qdq)
    onnx.checker.check_model(stripped)

    assert [o.name for o in stripped.graph.output] == ["featmap", "logits"]
    assert graph.read_output_quant(stripped) == quant
    assert set(quant) == {"featmap", "logits"}
    producers = {n.output[0]: n for n in stripped.graph.node}
    for name, dtype in dtypes.items():
        assert producers[name].op_type == "QuantizeLinear"
        # ORT names the output's quantization parameters <output>_scale / <output>_zero_point
        assert quant[name].scale == float(_initializer(qdq, f"{name}_scale"))
        assert quant[name].zero_point == int(_initializer(qdq, f"{name}_zero_point"))
        assert quant[name].dtype == np.dtype(dtype).name
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == "logits" for n in qdq.graph.node)  # untouched

    x = images(24, seed=9)
    expected = run(qdq, {"input": x}, ENABLE_ALL)
    raw = run(stripped, {"input": x}, ENABLE_ALL)
    for name, dtype in dtypes.items():
        assert raw[name].dtype == dtype
        q = quant[name]
        deq = (raw[name].astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
        assert np.array_equal(deq, expected[name]), (name, float(np.abs(deq - expected[name]).max()))
        assert len(np.unique(raw[name])) > 10  # a real signal, not a saturated constant


def test_strip_keeps_a_dequantize_for_internal_float_users() -> None:
    # y is both a graph output and the input of Neg: the raw output must not leak into Neg.
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq"),
        helper.make_node("Neg", ["y"], ["z"], name="neg"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3]) for name in ("y", "z")],
        [_f32("s", np.array(0.5)), numpy_helper.from_array(np.array(10, np.uint8), "zp")],
    )
    stripped, quant = graph.strip_output_dequantize(model)
    assert quant == {"y": graph.OutputQuant("y", 0.5, 10, "uint8")}
    x = np.array([[0.0, 1.0, -2.0], [3.0, 0.26, 200.0]], np.float32)
    out = run(stripped, {"x": x})
    assert out["y"].dtype == np.uint8
    assert out["y"].tolist() == [[10, 12, 6], [16, 11, 255]]  # round(x / 0.5) + 10, saturated at 255
    np.testing.assert_array_equal(out["z"], -(out["y"].astype(np.float32) - 10) * 0.5)


def test_strip_output_that_also_feeds_the_graph(tmp_path: Path) -> None:
    # featmap is a graph output and the input of Relu -> GAP -> Gemm logits
    rng = np.random.default_rng(41)
    model = _model(
        [
            helper.make_node(
                "Conv", ["input", "w1", "b1"], ["featmap"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]
            ),
            helper.make_node("Relu", ["featmap"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [
            helper.make_tensor_value_info("featmap", TensorProto.FLOAT, ["N", 8, 16, 16]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
        ],
        [_f32("w1", rng.normal(size=(8, 1, 3, 3))), _f32("b1", rng.normal(size=8))]
        + [_f32("wf", rng.normal(size=(10, 8))), _f32("bf", rng.normal(size=10))],
    )
    qdq = quantize(model, images(32, seed=42), "input", tmp_path)
    stripped, quant = graph.strip_output_dequantize(qdq)
    assert set(quant) == {"featmap", "logits"}
    x = images(8, seed=43)
    for level in (DISABLE_ALL, ENABLE_ALL):
        expected, raw = run(qdq, {"input": x}, level), run(stripped, {"input": x}, level)
        for name, q in quant.items():
            assert raw[name].dtype == np.uint8
            deq = (raw[name].astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
            assert np.array_equal(deq, expected[name]), (name, level)


def test_strip_rejects_per_axis_output_quantization() -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["scores"], name="dq", axis=1),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3])],
        [_f32("s", np.array([0.1, 0.2, 0.3])), numpy_helper.from_array(np.zeros(3, np.uint8), "zp")],
    )
    with pytest.raises(ValueError, match="scores"):
        graph.strip_output_dequantize(model)


def test_read_output_quant_needs_metadata() -> None:
    with pytest.raises(ValueError, match="strip_output_dequantize"):
        graph.read_output_quant(cnn())
    model = cnn()
    entry = model.metadata_props.add()
    entry.key = graph.OUTPUT_QUANT_KEY
    entry.value = json.dumps({"logits": {"scale": 0.25, "zero_point": 3, "dtype": "uint16"}})
    assert graph.read_output_quant(model) == {"logits": graph.OutputQuant("logits", 0.25, 3, "uint16")}
    entry.value = json.dumps({"logits": {"scale": 0.25}})
    with pytest.raises(ValueError, match="malformed"):
        graph.read_output_quant(model)


# -------------------------------------------------------------------------------------------------------------
# weights and producers
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [1, 0])
def test_weight_tensors_lists_conv_and_gemm_weights(trans_b: int) -> None:
    weights = weight_tensors(cnn(trans_b=trans_b))
    # sizes: w2 16*8*3*3, w3 16*16, wf 10*16, w1 8*1*3*3, w4 4*16
    assert [(w.name, w.size) for w in weights] == [("w2", 1152), ("w3", 256), ("wf", 160), ("w1", 72), ("w4", 64)]
    by_name = {w.name: w for w in weights}
    assert by_name["wf"] == WeightTensor("wf", "fc", "Gemm", 160, 0 if trans_b else 1)
    assert by_name["w3"] == WeightTensor("w3", "conv3", "Conv", 256, 0)


@pytest.mark.parametrize(
    ("share", "names", "achieved"),
    [
        (0.0, [], 0.0),
        # w2 alone is 1152/1704 = 67.6 %: skipped, the smaller ones still fit (256+160+72+64 = 552)
        (0.6, ["w3", "wf", "w1", "w4"], 552 / 1704),
        (0.7, ["w2"], 1152 / 1704),  # nothing else fits in the remaining 40.8 elements
        (0.9, ["w2", "w3", "w1"], 1480 / 1704),  # wf would reach 1568 > 1533.6; w1 fits, then w4 would not
        (0.95, ["w2", "w3", "wf"], 1568 / 1704),
        (1.0, ["w2", "w3", "wf", "w1", "w4"], 1.0),
    ],
)
def test_select_4bit_weights_takes_largest_that_fit(share: float, names: list[str], achieved: float) -> None:
    chosen, got = select_4bit_weights(cnn(), share)
    assert [w.name for w in chosen] == names
    assert got == pytest.approx(achieved)
    assert got <= share + 1e-12


def test_select_4bit_weights_rejects_share_outside_unit_interval() -> None:
    with pytest.raises(ValueError):
        select_4bit_weights(cnn(), 1.2)


def test_output_producers() -> None:
    producers = output_producers(cnn())
    assert {name: node.name for name, node in producers.items()} == {"featmap": "head", "logits": "fc"}


# -------------------------------------------------------------------------------------------------------------
# cross-layer equalization
# -------------------------------------------------------------------------------------------------------------


def _channel_ranges(model: onnx.ModelProto, name: str, axis: int = 0) -> np.ndarray:
    w = np.moveaxis(_initializer(model, name), axis, 0)
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


def test_cross_layer_equalize_keeps_function_and_balances_ranges() -> None:
    model = cnn()
    before = model.SerializeToString()
    equalized, pairs = cross_layer_equalize(model)
    assert model.SerializeToString() == before  # argument untouched
    # conv1 -> relu -> maxpool -> conv2 and conv2 -> relu -> conv3; relu3 feeds two nodes, so conv3/head is no pair
    assert pairs == 2
    np.testing.assert_array_equal(_initializer(equalized, "w4"), _initializer(model, "w4"))
    assert not np.array_equal(_initializer(equalized, "w3"), _initializer(model, "w3"))

    x = images(16, seed=4)
    expected, got = run(model, {"input": x}), run(equalized, {"input": x})
    for name in ("featmap", "logits"):
        assert np.abs(got[name] - expected[name]).max() < 1e-4 * np.abs(expected[name]).max()

    spread = lambda r: r.max() / r.min()  # noqa: E731
    assert spread(_channel_ranges(model, "w1")) > 500
    assert spread(_channel_ranges(equalized, "w1")) < spread(_channel_ranges(model, "w1")) / 10


@pytest.mark.parametrize("with_bias", [True, False])
def test_cross_layer_equalize_single_pair_matches_formula(with_bias: bool) -> None:
    rng = np.random.default_rng(7)
    wa = rng.normal(size=(5, 2, 3, 3)) * np.array([0.01, 0.1, 1.0, 10.0, 0.0])[:, None, None, None]  # channel 4 dead
    ba = rng.normal(size=5)
    wb = rng.normal(size=(3, 5, 1, 1))
    conv_a_inputs = ["x", "wa", "ba"] if with_bias else ["x", "wa"]
    model = _model(
        [
            helper.make_node("Conv", conv_a_inputs, ["a"], name="a", kernel_shape=[3, 3]),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "wb"], ["y"], name="b", kernel_shape=[1, 1]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 3, 3])],
        [_f32("wa", wa), _f32("wb", wb)] + ([_f32("ba", ba)] if with_bias else []),
    )
    equalized, pairs = cross_layer_equalize(model, iterations=1)
    assert pairs == 1
    wa32, wb32 = wa.astype(np.float32).astype(np.float64), wb.astype(np.float32).astype(np.float64)
    r1 = np.array([np.abs(wa32[i]).max() for i in range(5)])
    r2 = np.array([np.abs(wb32[:, i]).max() for i in range(5)])
    s = np.ones(5)
    s[:4] = np.sqrt(r1[:4] / r2[:4])  # channel 4 has r1 == 0: left alone
    np.testing.assert_allclose(_initializer(equalized, "wa"), wa32 / s[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(_initializer(equalized, "wb"), wb32 * s[None, :, None, None], rtol=1e-6)
    if with_bias:
        np.testing.assert_allclose(_initializer(equalized, "ba"), ba.astype(np.float32) / s, rtol=1e-6)
    x = images(2, seed=8, shape=(2, 5, 5))
    np.testing.assert_allclose(run(equalized, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_cross_layer_equalize_helps_per_tensor_weights(tmp_path: Path, calib: np.ndarray) -> None:
    model = cnn()
    equalized, _ = cross_layer_equalize(model)
    held_out = images(32, seed=98)
    reference = run(model, {"input": held_out})["logits"]
    plain = run(quantize(model, calib, "input", tmp_path, per_channel=False), {"input": held_out})["logits"]
    balanced = run(quantize(equalized, calib, "input", tmp_path, per_channel=False), {"input": held_out})["logits"]
    assert np.abs(balanced - reference).mean() < 0.5 * np.abs(plain - reference).mean()


def test_cross_layer_equalize_without_pairs_returns_copy() -> None:
    model = _three_channel_conv()
    equalized, pairs = cross_layer_equalize(model)
    assert pairs == 0
    assert equalized.SerializeToString() == model.SerializeToString()
    assert equalized is not model


# -------------------------------------------------------------------------------------------------------------
# bias correction
# -------------------------------------------------------------------------------------------------------------


def _single_conv(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    w = rng.normal(size=(6, 3, 3, 3)) * np.array([0.02, 0.1, 0.5, 1.0, 3.0, 8.0])[:, None, None, None]
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    return _model(
        [helper.make_node("Conv", inputs, ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])],
        [_f32("w", w)] + ([_f32("b", rng.normal(size=6))] if with_bias else []),
    )


@pytest.mark.parametrize(
    ("per_channel", "weight_type", "overrides", "with_bias"),
    [
        (False, QuantType.QInt8, None, True),
        (False, QuantType.QUInt8, None, True),  # asymmetric: non-zero weight zero point
        (True, QuantType.QInt8, None, False),  # bias created
        (True, QuantType.QUInt8, None, True),
        (True, QuantType.QInt8, {"w": [{"quant_type": QuantType.QInt4, "axis": 0}]}, True),  # com.microsoft DQ
    ],
    ids=["per-tensor-int8", "per-tensor-uint8", "per-channel-int8-no-bias", "per-channel-uint8", "per-channel-int4"],
)
def test_bias_correction_single_conv_shifts_output_by_expected_bias(
    tmp_path: Path, per_channel: bool, weight_type: QuantType, overrides: Any, with_bias: bool
) -> None:
    model = _single_conv(with_bias)
    calibration = (images(40, seed=12, shape=(3, 8, 8)) + np.array([0.5, -0.3, 2.0], np.float32)[:, None, None])
    qdq = quantize(model, calibration, "x", tmp_path, per_channel, overrides, weight_type)
    corrected, count = bias_correction(model, qdq, calibration, "x")
    assert count == 1
    assert len(model.graph.node[0].input) == (3 if with_bias else 2)  # argument untouched

    d_w = ort_dequantized_weight(qdq, "conv") - _initializer(model, "w").astype(np.float64)
    assert np.abs(d_w).max() > 0
    mean_x = calibration.astype(np.float64).mean(axis=(0, 2, 3))
    expected_shift = np.einsum("oikl,i->o", d_w, mean_x)

    x = images(3, seed=13, shape=(3, 8, 8))
    delta = run(corrected, {"x": x})["y"].astype(np.float64) - run(model, {"x": x})["y"]
    np.testing.assert_allclose(delta, np.broadcast_to(-expected_shift[None, :, None, None], delta.shape), atol=2e-5)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_correction_gemm_orientation(tmp_path: Path, trans_b: int, with_bias: bool) -> None:
    rng = np.random.default_rng(21)
    w_kn = rng.normal(size=(6, 4)) * np.array([0.05, 0.5, 2.0, 9.0])  # (K, N)
    inputs = ["x", "w", "c"] if with_bias else ["x", "w"]
    model = _model(
        [helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [_f32("w", w_kn.T if trans_b else w_kn)] + ([_f32("c", rng.normal(size=4))] if with_bias else []),
    )
    calibration = rng.normal(size=(32, 6)).astype(np.float32) + np.linspace(-2, 3, 6, dtype=np.float32)
    qdq = quantize(model, calibration, "x", tmp_path, per_channel=False)
    corrected, count = bias_correction(model, qdq, calibration, "x")
    assert count == 1

    d_w = ort_dequantized_weight(qdq, "fc") - _initializer(model, "w").astype(np.float64)
    d_kn = d_w.T if trans_b else d_w
    expected_shift = calibration.astype(np.float64).mean(axis=0) @ d_kn  # (N,)
    assert np.abs(expected_shift).max() > 1e-4
    x = rng.normal(size=(5, 6)).astype(np.float32)
    delta = run(corrected, {"x": x})["y"].astype(np.float64) - run(model, {"x": x})["y"]
    np.testing.assert_allclose(delta, np.broadcast_to(-expected_shift, delta.shape), atol=2e-5)


def test_bias_correction_reduces_systematic_error_of_per_tensor_model(tmp_path: Path, calib: np.ndarray) -> None:
    model = cnn()
    qdq = quantize(model, calib, "input", tmp_path, per_channel=False)
    corrected, count = bias_correction(model, qdq, calib, "input")
    assert count == 5  # conv1, conv2, conv3, head, fc
    requantized = quantize(corrected, calib, "input", tmp_path, per_channel=False)

    held_out = images(64, seed=99)
    reference = run(model, {"input": held_out})
    before = run(qdq, {"input": held_out})
    after = run(requantized, {"input": held_out})
    for name, axes in (("featmap", (0, 2, 3)), ("logits", (0,))):
        bias_before = np.abs((before[name] - reference[name]).mean(axis=axes)).mean()
        bias_after = np.abs((after[name] - reference[name]).mean(axis=axes)).mean()
        assert bias_after < bias_before, (name, bias_before, bias_after)


def test_bias_correction_skips_layers_left_in_float(tmp_path: Path, calib: np.ndarray) -> None:
    model = cnn()
    out = tmp_path / "excluded.onnx"
    quantize_static(
        _copy(model),
        str(out),
        _Reader(calib, "input"),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=["head", "fc"],
        extra_options={"QDQKeepRemovableActivations": True},
    )
    corrected, count = bias_correction(model, onnx.load(str(out)), calib, "input")
    assert count == 3
    np.testing.assert_array_equal(_initializer(corrected, "b4"), _initializer(model, "b4"))
    np.testing.assert_array_equal(_initializer(corrected, "bf"), _initializer(model, "bf"))
    assert not np.array_equal(_initializer(corrected, "b2"), _initializer(model, "b2"))


def test_bias_correction_matches_unnamed_nodes_by_order(tmp_path: Path, calib: np.ndarray) -> None:
    named = cnn()
    unnamed = cnn()
    for node in unnamed.graph.node:
        node.name = ""
    qdq_named = quantize(named, calib, "input", tmp_path, per_channel=False)
    qdq_unnamed = quantize(unnamed, calib, "input", tmp_path, per_channel=False)
    by_name, count_named = bias_correction(named, qdq_named, calib, "input")
    by_order, count_unnamed = bias_correction(unnamed, qdq_unnamed, calib, "input")
    assert count_named == count_unnamed == 5
    for bias in ("b1", "b2", "b4", "bf"):
        np.testing.assert_array_equal(_initializer(by_order, bias), _initializer(by_name, bias))
    created = [n.input[2] for n in by_order.graph.node if n.op_type == "Conv" and n.input[1] == "w3"]
    assert created and np.abs(_initializer(by_order, created[0])).max() > 0  # conv3 had no bias: one was added


def test_bias_correction_grouped_conv_uses_each_groups_input_mean(tmp_path: Path) -> None:
    rng = np.random.default_rng(31)
    w = rng.normal(size=(6, 1, 3, 3)) * np.array([0.05, 0.3, 1.0, 2.0, 4.0, 7.0])[:, None, None, None]
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=3)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])],
        [_f32("w", w)],
    )
    calibration = images(16, seed=32, shape=(3, 8, 8)) + np.array([1.0, -2.0, 4.0], np.float32)[:, None, None]
    qdq = quantize(model, calibration, "x", tmp_path, per_channel=False)
    corrected, count = bias_correction(model, qdq, calibration, "x")
    assert count == 1
    d_w = ort_dequantized_weight(qdq, "dw") - _initializer(model, "w").astype(np.float64)
    mean_x = calibration.astype(np.float64).mean(axis=(0, 2, 3))
    # output channels 0,1 read input channel 0; 2,3 read 1; 4,5 read 2
    expected_shift = np.array([d_w[o].sum() * mean_x[o // 2] for o in range(6)])
    x = images(2, seed=33, shape=(3, 8, 8))
    delta = run(corrected, {"x": x})["y"].astype(np.float64) - run(model, {"x": x})["y"]
    np.testing.assert_allclose(delta, np.broadcast_to(-expected_shift[None, :, None, None], delta.shape), atol=2e-5)
