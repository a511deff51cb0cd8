"""Emulation vs device, in units of the quantization step: how closely the chip reproduces the emulator.

Split from ``hailo_sweep.metrics`` (same conventions: axis 0 is the batch, keys ``"<output>.<metric>"`` and
``"total.<metric>"``, directions in ``metrics.METRIC_DIRECTIONS``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hailo_sweep.backends.base import QuantParams
from hailo_sweep.metrics import OutputSpec, block_rows, check_pair, get_output, weighted_mean, weighted_specs

def lsb_difference(emulated: np.ndarray, device_raw: np.ndarray, quant: QuantParams) -> np.ndarray:
    """Signed difference in quantization steps: device integers minus the emulated floats quantized the device's way.

    Quantizing the emulation (rather than dequantizing the device) compares on the device's own integer grid, so
    0 means bit-identical and 1 means one step apart, whatever the output's scale.
    """
    emu = np.asarray(emulated)
    raw = np.asarray(device_raw)
    if emu.shape != raw.shape:
        raise ValueError(f"shape mismatch: emulated {emu.shape} vs device_raw {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"device_raw must hold raw integers, got dtype {raw.dtype}")
    if not np.isfinite(emu).all():
        raise ValueError("emulated contains NaN/inf")
    return raw.astype(np.int64) - quant.quantize(emu).astype(np.int64)


# A block's signed differences are counted with ``np.bincount`` when they span fewer values than this (any 16-bit
# output); wider spreads (32-bit raw outputs, or a badly broken device) are counted with ``np.unique`` instead.
_MAX_HISTOGRAM_BINS = 1 << 17


def lsb_histogram(emulated: np.ndarray, device_raw: np.ndarray, quant: QuantParams) -> dict[int, int]:
    """How many elements differ by each signed number of steps (``lsb_difference``), counted block by block.

    Every agreement metric is read off these counts (``histogram_metrics``), so the differences are computed once per
    output, and counting integers is far cheaper than sorting them (``np.unique``, ``np.percentile``)."""
    emu2d, raw2d = check_pair(emulated, device_raw, ("emulated", "device_raw"))
    counts: dict[int, int] = {}
    for rows in block_rows(emu2d.shape[0], emu2d.shape[1]):
        diff = lsb_difference(emu2d[rows], raw2d[rows], quant).ravel()
        low, high = int(diff.min()), int(diff.max())
        if high - low < _MAX_HISTOGRAM_BINS:
            binned = np.bincount(diff - low)
            values = np.flatnonzero(binned)
            pairs = zip((values + low).tolist(), binned[values].tolist())
        else:
            unique, found = np.unique(diff, return_counts=True)
            pairs = zip(unique.tolist(), found.tolist())
        for value, count in pairs:
            counts[value] = counts.get(value, 0) + count
    return dict(sorted(counts.items()))


def histogram_metrics(histogram: Mapping[int, int]) -> dict[str, float]:
    """lsb_max, lsb_mean, lsb_p99 (linear interpolation, as ``np.percentile``) and identical_share of the absolute
    differences counted in ``histogram``."""
    absolute: dict[int, int] = {}
    for value, count in histogram.items():
        absolute[abs(value)] = absolute.get(abs(value), 0) + count
    values = np.array(sorted(absolute), dtype=np.float64)
    counts = np.array([absolute[int(v)] for v in values], dtype=np.int64)
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    position = (n - 1) * 0.99
    lower = int(np.floor(position))
    # the k-th smallest difference (0-based) is the first value whose cumulative count exceeds k
    v_lower, v_upper = values[np.searchsorted(cumulative, [lower, min(lower + 1, n - 1)], side="right")]
    return {
        "lsb_max": float(values[-1]),
        "lsb_mean": float((values * counts).sum() / n),
        "lsb_p99": float(v_lower + (position - lower) * (v_upper - v_lower)),
        "identical_share": float(absolute.get(0, 0) / n),
    }


def agreement_metrics(
    emulated: Mapping[str, np.ndarray],
    device_raw: Mapping[str, np.ndarray],
    quant: Mapping[str, QuantParams],
    outputs: Sequence[OutputSpec],
    histograms: dict[str, dict[int, int]] | None = None,
) -> dict[str, float]:
    """How closely the device reproduces the emulation, in LSB, per output and in total.

    Per output: lsb_max, lsb_mean, lsb_p99 (99th percentile, linear interpolation) of |difference| and
    identical_share (share of elements with difference 0). Totals over outputs with weight > 0: lsb_max (the maximum)
    and identical_share (weighted mean). With ``histograms``, each output's signed counts (``lsb_histogram``) are
    stored there too.
    """
    weighted = weighted_specs(outputs)
    per_output: dict[str, dict[str, float]] = {}
    out: dict[str, float] = {}
    for spec in outputs:
        histogram = lsb_histogram(
            get_output(emulated, spec.name, "emulated"),
            get_output(device_raw, spec.name, "device_raw"),
            get_output(quant, spec.name, "quant"),
        )
        if histograms is not None:
            histograms[spec.name] = histogram
        metrics = histogram_metrics(histogram)
        per_output[spec.name] = metrics
        out.update({f"{spec.name}.{k}": v for k, v in metrics.items()})
    out["total.lsb_max"] = max(per_output[o.name]["lsb_max"] for o in weighted)
    out["total.identical_share"] = weighted_mean(
        [per_output[o.name]["identical_share"] for o in weighted], [o.weight for o in weighted]
    )
    return out
