"""Small ONNX models shaped like the exports users bring (fixed batch 1, Paddle-style, softmax heads, time-major).

Built with onnx.helper in the tests that need them; each option reproduces one trait of a real export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

CHANNELS, SIZE, CLASSES = 3, 12, 5


@dataclass(frozen=True)
class Spec:
    batch: int | None = None  # None: a symbolic batch dimension
    opset: int = 13
    constant_weights: bool = False  # weights in Constant nodes (Paddle), not initializers
    identity_output: bool = False  # graph output produced by an Identity node (Paddle's scale_0.tmp_0)
    softmax: bool = False  # the classifier ends in Softmax
    time_major: bool = False  # a second output (W, N, C): per-column class scores, time first
    output_name: str = "logits"
    identity_of_output: bool = False  # the Identity's input is a graph output too (ONNX Runtime cannot drop the Identity)
    fused_conv: bool = False  # an output "aux" from a com.microsoft FusedConv: ONNX Runtime runs it, symbolic shape inference gives up


def build(spec: Spec) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, arr: np.ndarray) -> str:
        arr = arr.astype(np.float32)
        if spec.constant_weights:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_value")))
        else:
            inits.append(numpy_helper.from_array(arr, name))
        return name

    w1 = weight("w1", rng.normal(0, 0.4, (8, CHANNELS, 3, 3)))
    b1 = weight("b1", rng.normal(0, 0.1, (8,)))
    w2 = weight("w2", rng.normal(0, 0.3, (CLASSES, 8, 3, 3)))
    b2 = weight("b2", rng.normal(0, 0.1, (CLASSES,)))
    nodes += [
        helper.make_node("Conv", ["x", w1, b1], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", w2, b2], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
    ]
    head = "flat"
    if spec.softmax:
        nodes.append(helper.make_node("Softmax", [head], ["prob"], axis=1, name="softmax"))
        head = "prob"
    if spec.identity_output:
        nodes.append(helper.make_node("Identity", [head], [spec.output_name], name="identity_out"))
    else:
        nodes[-1].output[0] = spec.output_name
    batch: int | str = spec.batch if spec.batch is not None else "N"
    outputs = [helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, [batch, CLASSES])]
    if spec.identity_of_output:
        outputs.append(helper.make_tensor_value_info(head, TensorProto.FLOAT, [batch, CLASSES]))
    if spec.fused_conv:
        w3 = weight("w3", rng.normal(0, 0.3, (16, CHANNELS, 3, 3)))
        nodes += [
            helper.make_node("FusedConv", ["x", w3], ["f1"], pads=[1, 1, 1, 1], activation="Relu", name="fused", domain="com.microsoft"),
            helper.make_node("GlobalAveragePool", ["f1"], ["fgap"], name="fgap"),
            helper.make_node("Flatten", ["fgap"], ["aux"], axis=1, name="fflat"),
        ]
        outputs.append(helper.make_tensor_value_info("aux", TensorProto.FLOAT, [batch, 16]))
    if spec.time_major:
        nodes += [
            helper.make_node("ReduceMean", ["c2"], ["rows"], axes=[2], keepdims=0, name="reduce_rows"),
            helper.make_node("Transpose", ["rows"], ["seq"], perm=[2, 0, 1], name="time_major"),
        ]
        outputs.append(helper.make_tensor_value_info("seq", TensorProto.FLOAT, [SIZE, batch, CLASSES]))
    graph = helper.make_graph(
        nodes, "structural", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CHANNELS, SIZE, SIZE])], outputs, inits
    )
    opsets = [helper.make_opsetid("", spec.opset)] + ([helper.make_opsetid("com.microsoft", 1)] if spec.fused_conv else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path, *, external_data: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def write_data(root: Path, n_calib: int = 16, n_eval: int = 12, labels: np.ndarray | None = None) -> dict[str, Path]:
    """Calibration and evaluation .npz files of uint8 NCHW images (deterministic)."""
    rng = np.random.default_rng(1)
    calib = rng.integers(0, 256, (n_calib, CHANNELS, SIZE, SIZE), dtype=np.uint8)
    evaluation = rng.integers(0, 256, (n_eval, CHANNELS, SIZE, SIZE), dtype=np.uint8)
    np.savez(root / "calib.npz", x=calib)
    extra = {} if labels is None else {"y": labels}
    np.savez(root / "eval.npz", x=evaluation, **extra)
    return {"calibration": root / "calib.npz", "evaluation": root / "eval.npz"}


def config(root: Path, model: Path, data: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "structural",
        "model": str(model),
        "target": "hailo8l",
        "backend": "onnxruntime",
        "data": {"calibration": str(data["calibration"]), "evaluation": str(data["evaluation"]), "layout": "NCHW", "domain": [0, 255]},
        "normalization": {"mean": [127.0], "std": [64.0]},
        "search": {"optimization_level": [0], "calibset_size": [16], "normalization_placement": ["host"]},
        "objective": {"metric": "total.nmae", "stage": "device"},
        "diagnostics": {"layer_noise_samples": 4, "determinism_samples": 2},
        "trials": 1,
        "stores": {"root": str(root)},
    }
    cfg.update(overrides)
    return cfg


def write_config(root: Path, cfg: dict[str, Any], text: str | None = None) -> Path:
    path = root / "sweep.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(cfg, sort_keys=False))
    return path
