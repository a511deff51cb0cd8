"""Layout conversions between the pipeline (ONNX layout, NCHW) and Hailo (NHWC everywhere).

Why: the HN is NHWC and so are the emulator's inputs/outputs and HailoRT's host buffers (hailo-api.md §1.2, §3.2:
"Host side: [N, H, W, C]"). Metrics compare outputs against the float ONNX reference, so every output goes back
to the ONNX layout before it leaves the backend.
"""

from __future__ import annotations

import numpy as np


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW batch -> contiguous NHWC batch; other ranks are returned as they are."""
    arr = np.asarray(x)
    if arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
    return np.ascontiguousarray(arr)


def to_onnx_layout(y: np.ndarray, onnx_rank: int | None, batch: int) -> np.ndarray:
    """A Hailo output batch (NHWC for feature maps; (N, C) or (N, 1, 1, C) for dense outputs) in the ONNX layout.

    ``onnx_rank`` is the rank of the ONNX output (None when the model does not declare it).
    """
    arr = np.asarray(y)
    if arr.shape[0] != batch:
        raise ValueError(f"output has {arr.shape[0]} samples, expected {batch}")
    if onnx_rank is None:
        onnx_rank = arr.ndim
    if onnx_rank == 4 and arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    if onnx_rank == 2:
        return np.ascontiguousarray(arr.reshape(batch, -1))
    if onnx_rank == arr.ndim:
        return np.ascontiguousarray(arr)
    raise ValueError(f"cannot map a Hailo output of shape {arr.shape} to an ONNX output of rank {onnx_rank}")
