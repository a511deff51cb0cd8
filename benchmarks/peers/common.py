"""Shared by the peer scripts, which run in the peers' own virtual environments (numpy, onnx, onnxruntime only: no
hailo_sweep import). The data file is written by ``benchmarks/bench_peers.py``: ``calib`` (the calibration pool, fed as
the float model expects it), ``eval`` (the evaluation inputs) and ``ref_<output>`` (the float model's outputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

COMPUTE_OPS = {"Conv", "Gemm", "MatMul"}
QUANTIZED_COMPUTE_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger"}
WIDE = {onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32}


def session(model: onnx.ModelProto | str, optimized: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray, names: list[str], chunk: int = 64) -> dict[str, np.ndarray]:
    name = sess.get_inputs()[0].name
    batch = sess.get_inputs()[0].shape[0]
    if isinstance(batch, int) and batch > 0:  # a fixed batch: exactly that many rows per run
        if len(x) % batch:
            raise ValueError(f"{len(x)} inputs do not fill batches of {batch}")
        chunk = batch
    outs = [sess.run(names, {name: x[i : i + chunk]}) for i in range(0, len(x), chunk)]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def logits_mae(outputs: dict[str, np.ndarray], ref: dict[str, np.ndarray], output: str = "logits") -> float:
    return float(np.mean(np.abs(outputs[output].astype(np.float64) - ref[output].astype(np.float64))))


def precision_report(model: onnx.ModelProto) -> dict[str, object]:
    """Which compute layers are left in float and which tensors are wider than 8 bit (QDQ or QOperator format)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    float_layers = []
    for n in model.graph.node:
        if n.op_type in COMPUTE_OPS:
            fed = [producers.get(i) for i in n.input[:2]]
            if not all(p is not None and p.op_type == "DequantizeLinear" for p in fed):
                float_layers.append(n.name or n.op_type)
    wide: list[str] = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            if inits[n.input[2]].data_type in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16):
                wide.append(n.input[0])
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].data_type in (onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            wide.append(n.input[0])
    return {"float_layers": float_layers, "non8bit_tensors": sorted(set(wide)),
            "quantized_layers": sum(n.op_type in QUANTIZED_COMPUTE_OPS for n in model.graph.node)}
