"""Running an ONNX model with ONNX Runtime on the CPU: shared by the float reference and the embedded backend.

Batching lives here, once, for every runner and calibration reader: a model whose batch dimension is fixed (exports
of batch 1 are common) is fed exactly that many samples per call, the last call padded by repeating its last sample
and the padding dropped from the outputs; a dynamic batch is fed up to ``CHUNK`` samples per call, fewer for large
inputs (about ``CALL_ELEMENTS`` input values per call), because ONNX Runtime's memory grows with the batch's
activations (a 480x640 detector fed 16 frames at once peaks at gigabytes). Outputs leave this
module batch-first: an output whose samples lie on another axis (time-major ``(T, N, C)``) is concatenated along
that axis and the axis moved to the front, so every comparison downstream reads axis 0 as the sample axis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

CHUNK = 64  # samples per inference call when the batch is dynamic: bounds memory on large models
CALL_ELEMENTS = 1 << 20  # input values per call when the batch is dynamic (6 samples of 3x224x224, 1 of 3x480x640)


class BatchAxisError(ValueError):
    """An output whose declared batch axis does not hold the samples fed."""

    def __init__(self, output: str, axis: int, shape: tuple[int, ...], fed: int):
        self.output, self.axis, self.shape, self.fed = output, axis, shape, fed
        super().__init__(
            f"output {output!r} has shape {list(shape)} for a batch of {fed} samples: its axis {axis} does not hold "
            "the samples"
        )


def session(path: Path | str, level: ort.GraphOptimizationLevel, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def declared_batch(shape: Sequence[object] | None) -> int | None:
    """The fixed batch size of an input shape (its first dimension when a positive integer), else None (dynamic)."""
    if not shape:
        return None
    first = shape[0]
    return first if isinstance(first, int) and not isinstance(first, bool) and first > 0 else None


def session_batch(sess: ort.InferenceSession) -> int | None:
    return declared_batch(sess.get_inputs()[0].shape)


def chunk_size(inputs: np.ndarray, largest: int = CHUNK) -> int:
    """Samples per call for a dynamic batch: at most ``largest``, and about ``CALL_ELEMENTS`` input values."""
    per_sample = max(1, int(np.prod(inputs.shape[1:], dtype=np.int64)))
    return max(1, min(largest, CALL_ELEMENTS // per_sample))


def batches(inputs: np.ndarray, fixed: int | None, chunk: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch, valid)`` pairs covering ``inputs``: ``fixed`` samples per batch (the last padded), else ``chunk``
    (default: ``chunk_size(inputs)``)."""
    size = fixed or chunk or chunk_size(inputs)
    for start in range(0, len(inputs), size):
        part = inputs[start : start + size]
        valid = len(part)
        if fixed and valid < fixed:
            part = np.concatenate([part, np.repeat(part[-1:], fixed - valid, axis=0)])
        yield part, valid


def equal_batch(inputs: np.ndarray, fixed: int | None, largest: int = 32) -> int:
    """Batch size for a calibration reader whose batches must all have one shape (histogram calibrators).

    A fixed batch is the model's; otherwise the largest divisor of ``len(inputs)`` up to ``chunk_size(inputs, largest)``.
    """
    if fixed:
        return fixed
    n = len(inputs)
    return max(b for b in range(1, min(chunk_size(inputs, largest), n) + 1) if n % b == 0)


def run_chunked(
    sess: ort.InferenceSession,
    inputs: np.ndarray,
    output_names: tuple[str, ...],
    batch_axes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``inputs`` through ``sess`` in batches; outputs keyed by name, batch-first (see the module docstring)."""
    input_name = sess.get_inputs()[0].name
    axes = {name: (batch_axes or {}).get(name, 0) for name in output_names}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for batch, valid in batches(inputs, session_batch(sess)):
        for name, value in zip(output_names, sess.run(list(output_names), {input_name: batch}), strict=True):
            axis = axes[name]
            if value.ndim <= axis or value.shape[axis] != len(batch):
                raise BatchAxisError(name, axis, tuple(value.shape), len(batch))
            parts[name].append(np.take(value, np.arange(valid), axis=axis) if valid < len(batch) else value)
    return {name: np.moveaxis(np.concatenate(parts[name], axis=axes[name]), axes[name], 0) for name in output_names}
