"""Block-wise statistics the checks share: no whole-array float64 copy of a large evaluation set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Output comparisons: an output is "far" from the reference when its nmae exceeds FAR, and a transformation
# "explains" the gap when it brings the nmae down by at least EXPLAINS_FACTOR.
FAR_NMAE = 0.5
EXPLAINS_FACTOR = 4.0


# Arrays are processed in blocks of samples of about this many elements, so a large evaluation set (hundreds of
# full-resolution frames) never gets a whole-array float64 copy.
BLOCK_ELEMENTS = 1 << 20


def blocks(arr: np.ndarray) -> list[slice]:
    """Slices along axis 0 covering ``arr`` in blocks of about ``BLOCK_ELEMENTS`` elements (a 0-d array: one)."""
    if arr.ndim == 0:
        return [slice(None)]
    rows = max(1, BLOCK_ELEMENTS // max(1, arr.size // max(1, arr.shape[0])))
    return [slice(i, i + rows) for i in range(0, arr.shape[0], rows)] or [slice(0, 0)]


def nmae(reference: np.ndarray, candidate: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """mean|ref - f(cand)| / mean|ref| in float64 (divisor 1 for an all-zero reference), like ``metrics.nmae``.

    ``transform`` (e.g. a dequantization) is applied to each block of the candidate.
    """
    ref, cand = np.asarray(reference), np.asarray(candidate)
    abs_err = abs_ref = 0.0
    for rows in blocks(ref):
        r = ref[rows].astype(np.float64)
        c = (transform(cand[rows]) if transform is not None else cand[rows]).astype(np.float64)
        abs_err += float(np.abs(r - c).sum())
        abs_ref += float(np.abs(r).sum())
    return abs_err / (abs_ref if abs_ref > 0 else float(ref.size or 1))


def integral(arr: np.ndarray) -> bool:
    """True when every value is a whole number (integer dtype, or finite floats without fractions)."""
    if np.issubdtype(arr.dtype, np.integer):
        return True
    if not np.issubdtype(arr.dtype, np.floating):
        return False
    for rows in blocks(arr):
        block = arr[rows]
        if not (np.isfinite(block).all() and np.all(block == np.rint(block))):
            return False
    return True


@dataclass(frozen=True)
class Moments:
    mean: float
    std: float
    min: float
    max: float
    finite: bool


def moments(arr: np.ndarray) -> Moments:
    """Mean, (population) std, min and max over all elements, accumulated block by block in float64."""
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, finite = float("inf"), float("-inf"), True
    for rows in blocks(arr):
        block = arr[rows].astype(np.float64).reshape(-1)
        if block.size == 0:
            continue
        finite = finite and bool(np.isfinite(block).all())
        b_mean = float(block.mean())
        b_m2 = float(((block - b_mean) ** 2).sum())
        total = count + block.size
        delta = b_mean - mean
        mean += delta * block.size / total  # Chan et al.'s parallel combination: no catastrophic cancellation
        m2 += b_m2 + delta * delta * count * block.size / total
        count = total
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    std = float(np.sqrt(m2 / count)) if count else 0.0
    return Moments(mean=mean, std=std, min=lo, max=hi, finite=finite)
