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


# Histogram bins for |LSB difference|: covers any 16-bit output (differences up to 65535); wider spreads (32-bit raw
# outputs, or a badly broken device) fall back to computing on the values directly.
_MAX_HISTOGRAM_BINS = 1 << 17


def _percentile_from_counts(counts: np.ndarray, q: float) -> float:
    """Same value as ``np.percentile(values, q)`` (linear interpolation), read off the counts of each integer value."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    position = (n - 1) * q / 100.0
    lower = int(np.floor(position))
    upper = min(lower + 1, n - 1)
    # the k-th smallest value (0-based) is the first bin whose cumulative count exceeds k
    v_lower, v_upper = np.searchsorted(cumulative, [lower, upper], side="right")
    return float(v_lower + (position - lower) * (v_upper - v_lower))


def _lsb_metrics(emulated: np.ndarray, device_raw: np.ndarray, quant: QuantParams) -> dict[str, float]:
    """lsb_max, lsb_mean, lsb_p99 and identical_share of |lsb_difference|, from a histogram built block by block.

    Small integer differences make a histogram far cheaper than the partial sort of ``np.percentile``, and blocks keep
    large temporaries from piling up.
    """
    emu2d, raw2d = check_pair(emulated, device_raw, ("emulated", "device_raw"))
    n = emu2d.shape[0]
    blocks = [np.abs(lsb_difference(emu2d[rows], raw2d[rows], quant)).ravel() for rows in block_rows(n, emu2d.shape[1])]
    top = max(int(b.max()) for b in blocks)
    if top >= _MAX_HISTOGRAM_BINS:
        values = np.concatenate(blocks)
        return {
            "lsb_max": float(top),
            "lsb_mean": float(values.mean()),
            "lsb_p99": float(np.percentile(values, 99.0)),
            "identical_share": float(np.count_nonzero(values == 0) / values.size),
        }
    counts = sum(np.bincount(b, minlength=top + 1) for b in blocks)
    total = int(counts.sum())
    return {
        "lsb_max": float(top),
        "lsb_mean": float((np.arange(top + 1, dtype=np.float64) * counts).sum() / total),
        "lsb_p99": _percentile_from_counts(counts, 99.0),
        "identical_share": float(counts[0] / total),
    }


def agreement_metrics(
    emulated: Mapping[str, np.ndarray],
    device_raw: Mapping[str, np.ndarray],
    quant: Mapping[str, QuantParams],
    outputs: Sequence[OutputSpec],
) -> dict[str, float]:
    """How closely the device reproduces the emulation, in LSB, per output and in total.

    Per output: lsb_max, lsb_mean, lsb_p99 (99th percentile, linear interpolation) of |difference| and
    identical_share (share of elements with difference 0). Totals over outputs with weight > 0: lsb_max (the maximum)
    and identical_share (weighted mean).
    """
    weighted = weighted_specs(outputs)
    per_output: dict[str, dict[str, float]] = {}
    out: dict[str, float] = {}
    for spec in outputs:
        metrics = _lsb_metrics(
            get_output(emulated, spec.name, "emulated"),
            get_output(device_raw, spec.name, "device_raw"),
            get_output(quant, spec.name, "quant"),
        )
        per_output[spec.name] = metrics
        out.update({f"{spec.name}.{k}": v for k, v in metrics.items()})
    out["total.lsb_max"] = max(per_output[o.name]["lsb_max"] for o in weighted)
    out["total.identical_share"] = weighted_mean(
        [per_output[o.name]["identical_share"] for o in weighted], [o.weight for o in weighted]
    )
    return out
