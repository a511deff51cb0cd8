"""Float reference outputs: the original ONNX model on the evaluation set, run once per sweep and cached."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hailo_sweep.atomic import atomic_write
from hailo_sweep.model_io import external_data_files, file_sha256
from hailo_sweep.onnx_runner import run_chunked, session


def reference_outputs(
    model_path: Path,
    inputs: np.ndarray,
    output_names: tuple[str, ...],
    cache_dir: Path,
    batch_axes: Mapping[str, int] | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Outputs of the float model on ``inputs`` (already normalized as the float model expects); (outputs, cache_hit).

    Outputs are batch-first (``batch_axes`` names the outputs whose samples lie on another axis).
    """
    axes = dict(batch_axes or {})
    digest = hashlib.sha256(model_digest(model_path).encode())
    digest.update(f"{inputs.dtype.str}{inputs.shape}".encode())
    digest.update(np.ascontiguousarray(inputs).tobytes())
    digest.update("|".join(output_names).encode())
    digest.update(repr(sorted(axes.items())).encode())
    path = cache_dir / f"reference-{digest.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            return {name: cached[name] for name in output_names}, True
    sess = session(model_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    outputs = run_chunked(sess, inputs.astype(np.float32), output_names, axes)
    atomic_write(path, lambda tmp: _savez(tmp, outputs))
    return outputs, False


def _savez(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def model_digest(model_path: Path) -> str:
    """Content hash of a model with its external data files (weights stored beside the .onnx)."""
    parts = [file_sha256(model_path)] + [file_sha256(p) for p in external_data_files(model_path)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
