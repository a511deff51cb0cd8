"""Running an ONNX model with ONNX Runtime on the CPU: shared by the float reference and the embedded backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

CHUNK = 64  # samples per inference call: bounds memory on large models


def session(path: Path | str, level: ort.GraphOptimizationLevel, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_chunked(sess: ort.InferenceSession, inputs: np.ndarray, output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Run ``inputs`` through ``sess`` in chunks; outputs keyed by name, concatenated along the batch axis."""
    input_name = sess.get_inputs()[0].name
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(inputs), CHUNK):
        parts.append(sess.run(list(output_names), {input_name: inputs[start : start + CHUNK]}))
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(output_names)}
