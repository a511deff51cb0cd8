"""What the toolchain and the device did: the optimization level lowered, calibration range, emulator vs device
agreement, determinism."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hailo_sweep.diagnose.finding import Finding
from hailo_sweep.diagnose.stats import blocks


# -- 6. optimization level ---------------------------------------------------------------------------------------------


def check_optimization_level(requested: int, params: Mapping[str, object], flags: Sequence[str]) -> Finding | None:
    """The compiler lowered the optimization level on its own (hailo-api.md 4.6: "Reducing optimization level").

    The Dataflow Compiler does this silently with fewer than 1024 calibration images or without a GPU; the HEF is
    then worse than the trial's settings say. Flagged when ``flags`` contains "optimization_level_lowered" or
    ``params["effective_optimization_level"]`` is below ``requested``.
    """
    try:
        effective: int | None = int(params["effective_optimization_level"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        effective = None
    lowered = "optimization_level_lowered" in flags or (effective is not None and effective < requested)
    if not lowered:
        return None
    evidence: dict[str, float | str] = {"requested": float(requested)}
    used = "a lower level"
    if effective is not None:
        evidence["effective"] = float(effective)
        used = f"level {effective}"
    extra = ""
    given = params.get("calibration_entries_given")
    if isinstance(given, (int, float)):
        evidence["calibration_entries_given"] = float(given)
        extra += f" The optimizer was given {int(given)} calibration entries."
    entries = params.get("calibration_entries_used")
    if isinstance(entries, (int, float)):
        evidence["calibration_entries_used"] = float(entries)
        extra += f" It used {int(entries)} calibration images."
    reason = params.get("optimization_level_reason")
    if isinstance(reason, str) and reason:
        evidence["compiler_message"] = reason
        extra += f' The compiler said: "{reason}".'
    return Finding(
        code="optimization_level_lowered",
        title=f"The compiler lowered the optimization level (requested {requested}, ran {used})",
        message=f"Optimization level {requested} was requested, but the optimizer ran {used}.{extra}",
        fix=(
            "Optimization levels 2-4 need a calibration file of at least 1024 entries (the whole file is given to the "
            "optimizer; calibset_size only sets how many it calibrates on) and a machine with a GPU; the compiler's "
            "message above says which one was missing. Otherwise request the level the compiler can honour, so the "
            "trial records what actually ran."
        ),
        severity="warning",
        evidence=evidence,
    )


# -- 7. calibration coverage ------------------------------------------------------------------------------------------


def check_calibration_coverage(
    calibration: np.ndarray, evaluation: np.ndarray, max_outside_share: float = 0.001, channel_axis: int = 1
) -> Finding | None:
    """Calibration data that doesn't cover the evaluation data's range.

    Both arrays are batches in the same layout and domain (the pipeline's: NCHW, channel axis 1). The share of
    evaluation values outside the calibration range of their channel is compared with ``max_outside_share``
    (default 0.1 %); the global range is reported too. Values outside the calibrated range saturate after
    quantization, so the device error on those samples says nothing about the settings being swept.
    """
    cal = np.asarray(calibration)
    ev = np.asarray(evaluation)
    if cal.size == 0 or ev.size == 0:
        return None
    gmin, gmax = float(cal.min()), float(cal.max())
    per_channel = cal.ndim >= 2 and ev.ndim == cal.ndim and 0 < channel_axis < cal.ndim and cal.shape[channel_axis] == ev.shape[channel_axis]
    if per_channel:
        others = tuple(a for a in range(cal.ndim) if a != channel_axis)
        shape = [1] * cal.ndim
        shape[channel_axis] = -1
        cmin, cmax = cal.min(axis=others).reshape(shape), cal.max(axis=others).reshape(shape)
        outside_per_channel = np.zeros(cal.shape[channel_axis], np.int64)
        emin = np.full(cal.shape[channel_axis], np.inf)
        emax = np.full(cal.shape[channel_axis], -np.inf)
    outside_global = 0
    for rows in blocks(ev):
        block = ev[rows]
        outside_global += int(np.count_nonzero((block < gmin) | (block > gmax)))
        if per_channel:
            reduce = tuple(a for a in range(block.ndim) if a != channel_axis)
            outside_per_channel += np.count_nonzero((block < cmin) | (block > cmax), axis=reduce)
            emin = np.minimum(emin, block.min(axis=reduce))
            emax = np.maximum(emax, block.max(axis=reduce))
    global_share = outside_global / ev.size
    worst: tuple[int, float, float, float, float, float] | None = None  # channel, share, cal min/max, eval min/max
    if per_channel:
        per_channel_elements = ev.size // ev.shape[channel_axis]
        ch = int(np.argmax(outside_per_channel))  # every channel has the same element count
        c_lo, c_hi = float(cmin.reshape(-1)[ch]), float(cmax.reshape(-1)[ch])
        worst = (ch, float(outside_per_channel[ch]) / per_channel_elements, c_lo, c_hi, float(emin[ch]), float(emax[ch]))
        share_all = float(outside_per_channel.sum()) / ev.size
    else:
        share_all = global_share
    if share_all <= max_outside_share:
        return None
    evidence: dict[str, float | str] = {
        "outside_share": share_all,
        "outside_share_global": global_share,
        "max_outside_share": max_outside_share,
        "calibration_min": gmin,
        "calibration_max": gmax,
        "evaluation_min": float(ev.min()),
        "evaluation_max": float(ev.max()),
    }
    channel_note = ""
    if worst is not None:
        ch, share, c_lo, c_hi, e_lo, e_hi = worst
        evidence.update(worst_channel=float(ch), worst_channel_share=share)
        channel_note = f" Worst channel {ch}: {share:.2%} outside, calibration [{c_lo:.4g}, {c_hi:.4g}] vs evaluation [{e_lo:.4g}, {e_hi:.4g}]."
    return Finding(
        code="calibration_range",
        title="Calibration data does not cover the evaluation data's range",
        message=(
            f"{share_all:.2%} of the evaluation values lie outside the calibration range of their channel "
            f"(limit {max_outside_share:.2%}); globally calibration [{gmin:.4g}, {gmax:.4g}] vs evaluation "
            f"[{float(ev.min()):.4g}, {float(ev.max()):.4g}] ({global_share:.2%} outside).{channel_note}"
        ),
        fix=(
            "Calibrate with data representative of deployment (same sensor, exposure and preprocessing as the "
            "evaluation set), or more of it; a larger calibset_size in the search space helps when the set is a subset."
        ),
        severity="warning",
        evidence=evidence,
    )


# -- 8. emulator vs device agreement -----------------------------------------------------------------------------------


def check_agreement(
    metrics: Mapping[str, float],
    outputs: Sequence[str],
    lsb_tolerance: float = 1.0,
    identical_min: float = 0.99,
    reference: str = "quantized emulation",
) -> list[Finding]:
    """The device disagrees with the emulation it is compared with by more than the configured tolerances, per output.

    ``reference`` names that emulation: the pipeline compares the device with the most hardware-faithful one the
    backend offers (bit-exact where present; the quantized emulation differs from the hardware by normal rounding,
    which ``emulation_drift.*`` reports apart and no finding flags).

    Reads ``agreement.<output>.lsb_max`` / ``lsb_mean`` / ``lsb_p99`` / ``identical_share`` (differences in units
    of the output's quantization step). Flagged when lsb_max > ``lsb_tolerance`` or identical_share <
    ``identical_min``; severity "error" when even the 99th percentile exceeds the tolerance (widespread), else
    "warning" (a few elements).
    """
    found: list[Finding] = []
    for name in outputs:
        lsb_max = metrics.get(f"agreement.{name}.lsb_max")
        identical = metrics.get(f"agreement.{name}.identical_share")
        if lsb_max is None and identical is None:
            continue
        too_far = lsb_max is not None and lsb_max > lsb_tolerance
        too_few = identical is not None and identical < identical_min
        if not (too_far or too_few):
            continue
        p99 = metrics.get(f"agreement.{name}.lsb_p99")
        mean = metrics.get(f"agreement.{name}.lsb_mean")
        evidence: dict[str, float | str] = {"lsb_tolerance": lsb_tolerance, "identical_min": identical_min}
        parts = []
        for key, value, fmt in (("lsb_max", lsb_max, "{:.4g}"), ("lsb_p99", p99, "{:.4g}"), ("lsb_mean", mean, "{:.4g}"), ("identical_share", identical, "{:.2%}")):
            if value is not None:
                evidence[key] = float(value)
                parts.append(f"{key} {fmt.format(value)}")
        widespread = p99 is not None and p99 > lsb_tolerance
        found.append(
            Finding(
                code="device_disagrees",
                title=f"'{name}': the device disagrees with the {reference}",
                message=(
                    f"Device vs {reference} in LSB of '{name}': {', '.join(parts)} (tolerance: max {lsb_tolerance:g} LSB, "
                    f"at least {identical_min:.2%} bit-identical)."
                ),
                fix=(
                    "Rule out the input/output findings first. Then read the LSB histogram: +-1 LSB spread everywhere "
                    "is rounding in the hardware arithmetic (compare with bit-exact emulation where available); a few "
                    "large outliers point at saturation; large differences everywhere at a pre/post-processing "
                    "mismatch. Promoting the noisiest layers feeding this output to 16-bit narrows the gap."
                ),
                severity="error" if widespread else "warning",
                output=name,
                evidence=evidence,
            )
        )
    return found


# -- 9. determinism ---------------------------------------------------------------------------------------------------


def _differing_elements(a: np.ndarray, b: np.ndarray) -> int | None:
    """Elements whose bytes differ, or None when dtype/shape already differ (every element counts)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return None
    if a.itemsize in (1, 2, 4, 8):
        view = np.dtype(f"u{a.itemsize}")
        return int(np.count_nonzero(np.ascontiguousarray(a).view(view) != np.ascontiguousarray(b).view(view)))
    return int(np.count_nonzero(a != b))


def check_determinism(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> Finding | None:
    """The same inputs twice on the device gave different bytes (forum reports of non-deterministic HEFs).

    Compares the raw outputs of two runs byte by byte; an output missing from one run, or with another dtype or
    shape, counts as entirely different.
    """
    differing: dict[str, tuple[int, int]] = {}
    for name in sorted(set(first) | set(second)):
        if name not in first or name not in second:
            size = np.asarray(first.get(name, second.get(name))).size
            differing[name] = (size, size)
            continue
        a, b = np.asarray(first[name]), np.asarray(second[name])
        count = _differing_elements(a, b)
        if count is None:
            differing[name] = (max(a.size, b.size), max(a.size, b.size))
        elif count:
            differing[name] = (count, a.size)
    if not differing:
        return None
    parts = [f"'{n}' {c} of {t} elements ({c / t:.2%})" if t else f"'{n}'" for n, (c, t) in differing.items()]
    evidence: dict[str, float | str] = {f"{n}.differing": float(c) for n, (c, _) in differing.items()}
    return Finding(
        code="nondeterministic",
        title=f"The device is not deterministic: the same inputs gave different {', '.join(repr(n) for n in differing)}",
        message=f"Running the same inputs twice changed the raw bytes of {', '.join(parts)}.",
        fix=(
            "Check for uninitialized buffers or reused output buffers in the host code, run with batch size 1 and "
            "one stream, and re-run the comparison; if the HEF itself varies, report it to Hailo with the HEF and "
            "inputs. Until then compare against the mean of several runs."
        ),
        severity="error",
        output=next(iter(differing)) if len(differing) == 1 else None,
        evidence=evidence,
    )
