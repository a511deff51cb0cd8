"""Checks for the mistakes that make a device look worse than its emulator, each returning a named ``Finding``.

Every check is pure numpy on evidence the pipeline (or a user's own data) already holds, and each one names exactly
one mistake from hailo-api.md section 4 (emulator vs hardware mismatch causes) with the action that fixes it. The
thresholds are chosen so that a correct run produces no finding at all: a check that cannot decide stays silent.
``run_all`` runs every check whose evidence is present.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from hailo_sweep.backends.base import Normalization, QuantParams

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One named observation with the numbers behind it and the action to take."""

    code: str  # stable id, e.g. "normalization_twice"
    title: str  # one line
    message: str  # what was observed, with the numbers
    fix: str  # the action to take
    severity: Severity
    output: str | None = None
    evidence: dict[str, float | str] = field(default_factory=dict)


FINDING_CODES: tuple[str, ...] = (
    "normalization_twice",
    "normalization_missed",
    "float_for_uint8",
    "layout_mixup",
    "input_shape_mismatch",
    "not_dequantized",
    "16bit_read_as_8bit",
    "optimization_level_lowered",
    "calibration_range",
    "device_disagrees",
    "nondeterministic",
    "softmax_as_logits",
)

# Output comparisons: an output is "far" from the reference when its nmae exceeds FAR, and a transformation
# "explains" the gap when it brings the nmae down by at least EXPLAINS_FACTOR.
FAR_NMAE = 0.5
EXPLAINS_FACTOR = 4.0


# Arrays are processed in blocks of samples of about this many elements, so a large evaluation set (hundreds of
# full-resolution frames) never gets a whole-array float64 copy.
_BLOCK_ELEMENTS = 1 << 20


def _blocks(arr: np.ndarray) -> list[slice]:
    """Slices along axis 0 covering ``arr`` in blocks of about ``_BLOCK_ELEMENTS`` elements (a 0-d array: one)."""
    if arr.ndim == 0:
        return [slice(None)]
    rows = max(1, _BLOCK_ELEMENTS // max(1, arr.size // max(1, arr.shape[0])))
    return [slice(i, i + rows) for i in range(0, arr.shape[0], rows)] or [slice(0, 0)]


def _nmae(reference: np.ndarray, candidate: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """mean|ref - f(cand)| / mean|ref| in float64 (divisor 1 for an all-zero reference), like ``metrics.nmae``.

    ``transform`` (e.g. a dequantization) is applied to each block of the candidate.
    """
    ref, cand = np.asarray(reference), np.asarray(candidate)
    abs_err = abs_ref = 0.0
    for rows in _blocks(ref):
        r = ref[rows].astype(np.float64)
        c = (transform(cand[rows]) if transform is not None else cand[rows]).astype(np.float64)
        abs_err += float(np.abs(r - c).sum())
        abs_ref += float(np.abs(r).sum())
    return abs_err / (abs_ref if abs_ref > 0 else float(ref.size or 1))


def _integral(arr: np.ndarray) -> bool:
    """True when every value is a whole number (integer dtype, or finite floats without fractions)."""
    if np.issubdtype(arr.dtype, np.integer):
        return True
    if not np.issubdtype(arr.dtype, np.floating):
        return False
    for rows in _blocks(arr):
        block = arr[rows]
        if not (np.isfinite(block).all() and np.all(block == np.rint(block))):
            return False
    return True


@dataclass(frozen=True)
class _Moments:
    mean: float
    std: float
    min: float
    max: float
    finite: bool


def _moments(arr: np.ndarray) -> _Moments:
    """Mean, (population) std, min and max over all elements, accumulated block by block in float64."""
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, finite = float("inf"), float("-inf"), True
    for rows in _blocks(arr):
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
    return _Moments(mean=mean, std=std, min=lo, max=hi, finite=finite)


# -- 1. normalization -------------------------------------------------------------------------------------------------

NORM_FIT = 1.0  # a hypothesis fits when its score is at most this
NORM_MARGIN = 1.0  # ... and every other hypothesis scores at least this much more


def _hypothesis_score(mean: float, std: float, mu: float, sigma: float) -> float:
    """Distance of the fed statistics from a hypothesis N(mu, sigma): mean offset in sigmas plus |ln std ratio|."""
    return abs(mean - mu) / sigma + abs(float(np.log(std / sigma)))


def check_normalization(
    fed: np.ndarray,
    placement: Literal["host", "model"],
    normalization: Normalization | None,
    domain: tuple[float, float],
) -> Finding | None:
    """Input normalization applied twice, or missed, between the host code and the model (Hailo's #1 suspect).

    ``placement="model"``: the model normalizes, so it must be fed raw data. ``"host"``: the model expects
    ``(x - mean) / std``. With ``m, s`` the channel-averaged normalization mean and std, the fed data's overall mean
    and std are scored against three hypotheses with ``score = |mean - mu| / sigma + |ln(std / sigma)|``:

    - raw: ``mu = m, sigma = s``, and every value lies inside ``domain`` (else the hypothesis is ruled out);
    - normalized once: ``mu = 0, sigma = 1``;
    - normalized twice: ``mu = -m / s, sigma = 1 / s`` (what normalizing already-normalized data gives).

    The data "looks like" a hypothesis when its score is <= ``NORM_FIT`` (1.0) and every other score is at least
    ``NORM_MARGIN`` (1.0) higher; otherwise the check cannot tell and stays silent (e.g. mean 0 / std 1, where all
    hypotheses coincide, or data whose statistics match none). Findings: placement model and the data looks
    normalized (once or twice) -> "normalization_twice"; placement host and it looks raw -> "normalization_missed";
    placement host and it looks normalized twice -> "normalization_twice".
    """
    if normalization is None:
        return None
    x = np.asarray(fed)
    if x.size == 0:
        return None
    stats = _moments(x)
    mean, std = stats.mean, stats.std
    if not stats.finite or std == 0.0:
        return None
    m = float(np.mean(normalization.mean))
    s = float(np.mean(normalization.std))
    if not s > 0:
        return None
    lo, hi = float(domain[0]), float(domain[1])
    slack = 1e-6 * max(hi - lo, 1.0)
    within = stats.min >= lo - slack and stats.max <= hi + slack
    scores = {
        "raw": _hypothesis_score(mean, std, m, s) if within else float("inf"),
        "normalized": _hypothesis_score(mean, std, 0.0, 1.0),
        "normalized_twice": _hypothesis_score(mean, std, -m / s, 1.0 / s),
    }
    best = min(scores, key=lambda k: scores[k])
    if scores[best] > NORM_FIT or any(v < scores[best] + NORM_MARGIN for k, v in scores.items() if k != best):
        return None
    expected = "raw" if placement == "model" else "normalized"
    if best == expected:
        return None
    evidence: dict[str, float | str] = {
        "fed_mean": mean,
        "fed_std": std,
        "fed_min": stats.min,
        "fed_max": stats.max,
        "normalization_mean": m,
        "normalization_std": s,
        "looks": best,
        **{f"score_{k}": v for k, v in scores.items() if np.isfinite(v)},
    }
    observed = f"mean {mean:.4g}, std {std:.4g}, range [{stats.min:.4g}, {stats.max:.4g}]"
    if best == "raw":
        return Finding(
            code="normalization_missed",
            title="Input normalization missed: raw data fed to a model that expects normalized input",
            message=(
                f"The model expects (x - {m:.4g}) / {s:.4g} (normalization on the host), but the fed data looks raw: "
                f"{observed}, as the raw domain [{lo:g}, {hi:g}] predicts (mean ~{m:.4g}, std ~{s:.4g}), not ~0 / ~1."
            ),
            fix=f"Normalize on the host before feeding: x = (x - {m:.4g}) / {s:.4g}, or put the normalization into the model.",
            severity="error",
            evidence=evidence,
        )
    where = "inside the model" if placement == "model" else "on the host, and the data was already normalized"
    return Finding(
        code="normalization_twice",
        title="Input normalization applied twice",
        message=(
            f"Normalization runs {where}, but the fed data already looks "
            f"{'normalized' if best == 'normalized' else 'normalized twice'}: {observed} "
            f"(raw data would have mean ~{m:.4g}, std ~{s:.4g} within [{lo:g}, {hi:g}])."
        ),
        fix=(
            "Feed raw frames (the data domain the calibration used) and let the model normalize, or remove the "
            "normalization from the model (model script `normalization`) and keep it in the host code; never both."
        ),
        severity="error",
        evidence=evidence,
    )


# -- 2. input dtype -----------------------------------------------------------------------------------------------------


def check_input_type(
    fed: np.ndarray, expected_dtype: str, domain: tuple[float, float], *, raw_input: bool = True
) -> Finding | None:
    """Float data fed where the compiled model expects raw uint8 frames (hailo-api.md 4.2).

    Two forms, one code ("float_for_uint8"):

    - the compiled model's input is an integer type (``expected_dtype``, e.g. "uint8") but the buffer is float: HailoRT
      rejects it ("Input buffer size ... is different than expected") or, converted blindly, misreads it;
    - the model takes the raw data domain (``raw_input``: normalization inside the model or none at all), the domain
      is wider than [0, 2] (e.g. [0, 255]), and the fed floats lie in [0, 1] with fractional values: frames scaled to
      [0, 1] where 0-255 is expected. With FLOAT32 input HailoRT quantizes with the input QP and clips, so the whole
      image collapses onto one or two levels.
    """
    x = np.asarray(fed)
    if not np.issubdtype(x.dtype, np.floating) or x.size == 0:
        return None
    lo, hi = float(domain[0]), float(domain[1])
    xmin, xmax = float(np.nanmin(x)), float(np.nanmax(x))
    unit_scaled = xmin >= 0.0 and xmax <= 1.0 and (hi - lo) > 2.0 and not _integral(x)
    evidence: dict[str, float | str] = {"fed_dtype": str(x.dtype), "expected_dtype": expected_dtype, "fed_min": xmin, "fed_max": xmax}
    expected = np.dtype(expected_dtype)
    scaled_note = (
        f" The values lie in [{xmin:.4g}, {xmax:.4g}]: frames scaled to [0, 1], while the data domain is [{lo:g}, {hi:g}]."
        if unit_scaled
        else ""
    )
    if np.issubdtype(expected, np.integer):
        return Finding(
            code="float_for_uint8",
            title=f"Float data fed where the compiled model expects raw {expected.name} frames",
            message=f"The compiled model's input is {expected.name}, but {x.dtype} data was fed.{scaled_note}",
            fix=(
                f"Feed the raw {expected.name} frames in the calibration domain [{lo:g}, {hi:g}] "
                f"(e.g. np.asarray(frames, np.{expected.name}) without scaling), or request a FLOAT32 input format "
                "and feed floats in that same domain."
            ),
            severity="error",
            evidence=evidence,
        )
    if raw_input and unit_scaled:
        return Finding(
            code="float_for_uint8",
            title=f"Frames scaled to [0, 1] fed where the model expects the raw domain [{lo:g}, {hi:g}]",
            message=f"The model takes raw data (normalization inside it), but the fed {x.dtype} data is not in that domain.{scaled_note}",
            fix=f"Feed the raw frames (domain [{lo:g}, {hi:g}], uint8 for 0-255 pixels); do not divide by 255 on the host.",
            severity="error",
            evidence=evidence,
        )
    return None


# -- 3. layout --------------------------------------------------------------------------------------------------------


def check_layout(shape: tuple[int, ...], model_input_shape: tuple[int | str, ...], declared_layout: str) -> Finding | None:
    """NCHW/NHWC mix-up: the data's sample shape fits the model input only in the other layout.

    ``shape`` is the data array's shape (batch first) as stored, ``declared_layout`` what the config (or the user)
    says it is, ``model_input_shape`` the ONNX model's declared NCHW input (batch may be symbolic). Silent when the
    declared layout fits, or when both layouts give the same sample shape (C == H == W). A sample shape that fits
    neither layout is "input_shape_mismatch".
    """
    if len(model_input_shape) != 4 or not all(isinstance(d, (int, np.integer)) for d in model_input_shape[1:]):
        return None
    c, h, w = (int(d) for d in model_input_shape[1:])
    layouts = {"NCHW": (c, h, w), "NHWC": (h, w, c)}
    declared = declared_layout.upper()
    if declared not in layouts:
        raise ValueError(f"declared_layout must be NCHW or NHWC, got {declared_layout!r}")
    other = "NHWC" if declared == "NCHW" else "NCHW"
    sample = tuple(int(d) for d in shape[1:])
    evidence: dict[str, float | str] = {"data_shape": str(tuple(shape)), "model_input_shape": str(tuple(model_input_shape)), "declared_layout": declared}
    if len(shape) == 4 and sample == layouts[declared]:
        return None
    if len(shape) == 4 and sample == layouts[other]:
        return Finding(
            code="layout_mixup",
            title=f"NCHW/NHWC mix-up: the data is {other} but declared {declared}",
            message=(
                f"The data has samples of shape {sample}, which is {other} for the model input "
                f"{list(model_input_shape)} (NCHW); read as {declared} the channels and spatial axes get mixed."
            ),
            fix=f"Declare the layout as {other} (data.layout: {other}) or transpose the data to {declared}.",
            severity="error",
            evidence=evidence,
        )
    return Finding(
        code="input_shape_mismatch",
        title="The data's sample shape fits the model input in no layout",
        message=(
            f"The data has shape {tuple(shape)}; the model input {list(model_input_shape)} needs samples of "
            f"{layouts['NCHW']} (NCHW) or {layouts['NHWC']} (NHWC)."
        ),
        fix="Resize or crop the data to the model's input size, or point the config at the right data.",
        severity="error",
        evidence=evidence,
    )


# -- 4. dequantization ------------------------------------------------------------------------------------------------


def check_dequantized(
    candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], quant: Mapping[str, QuantParams]
) -> list[Finding]:
    """Raw device outputs compared with float references without dequantization (hailo-api.md 4.3, forum t/6719).

    Per output present in all three mappings (same shape): flagged when the compared values are whole numbers
    inside the raw dtype's range (e.g. 0..255 for uint8), their nmae against the reference exceeds ``FAR_NMAE``
    (0.5), and ``quant[name].dequantize(candidate)`` brings the nmae down by at least ``EXPLAINS_FACTOR`` (4x).
    Correctly dequantized outputs are not whole numbers (unless the scale is 1, when dequantizing again only moves
    them away), so they are never flagged.
    """
    found: list[Finding] = []
    for name, values in candidate.items():
        if name not in reference or name not in quant:
            continue
        cand = np.asarray(values)
        ref = np.asarray(reference[name])
        q = quant[name]
        if cand.shape != ref.shape or cand.size == 0 or not _integral(cand):
            continue
        info = np.iinfo(np.dtype(q.dtype))
        if float(cand.min()) < info.min or float(cand.max()) > info.max:
            continue
        err_raw = _nmae(ref, cand)
        err_deq = _nmae(ref, cand, q.dequantize)
        if err_raw <= FAR_NMAE or err_deq * EXPLAINS_FACTOR > err_raw:
            continue
        found.append(
            Finding(
                code="not_dequantized",
                title=f"'{name}': raw device outputs compared without dequantization",
                message=(
                    f"The compared '{name}' values are integers in [{cand.min():.0f}, {cand.max():.0f}] ({q.dtype} range) "
                    f"and differ from the float reference by nmae {err_raw:.4g}; dequantized with scale {q.scale:.6g} and "
                    f"zero point {q.zero_point:g} they match it with nmae {err_deq:.4g}."
                ),
                fix=(
                    f"Dequantize before comparing: x = (q - {q.zero_point:g}) * {q.scale:.6g} (HailoRT: the output vstream's "
                    "quant_info qp_zp / qp_scale), or request FLOAT32 output so HailoRT dequantizes."
                ),
                severity="error",
                output=name,
                evidence={"nmae_as_compared": err_raw, "nmae_dequantized": err_deq, "scale": q.scale, "zero_point": q.zero_point, "raw_dtype": q.dtype},
            )
        )
    return found


# -- 5. 16-bit outputs ------------------------------------------------------------------------------------------------


def _as_uint16_pairs(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """A byte buffer of twice the elements reinterpreted as little-endian 16-bit values of ``shape``, if it fits."""
    if raw.itemsize != 1 or raw.size != 2 * int(np.prod(shape)):
        return None
    return np.ascontiguousarray(raw).view(np.dtype(dtype).newbyteorder("<")).reshape(shape)


def check_output_bits(
    raw: Mapping[str, np.ndarray], quant: Mapping[str, QuantParams], reference: Mapping[str, np.ndarray] | None = None
) -> list[Finding]:
    """A 16-bit output read as 8-bit (hailo-api.md 4.4: 16-bit outputs are UINT16 with their own scale/zero point).

    Per output whose quantization is 16-bit:

    - the raw buffer has 1-byte elements: read with an 8-bit format or truncated; with a reference of half the
      element count, the buffer is also re-read as little-endian 16-bit pairs and the resulting nmae reported;
    - the raw buffer is 16-bit but every value fits in 0..255 while dequantizing it is far from the reference
      (nmae > ``FAR_NMAE``): 8-bit values widened to 16 bits. Needs ``reference``; a 16-bit output that really lies
      in 0..255 and matches the reference is not flagged.
    """
    found: list[Finding] = []
    for name, values in raw.items():
        q = quant.get(name)
        if q is None or q.bits != 16:
            continue
        arr = np.asarray(values)
        ref = None if reference is None or name not in reference else np.asarray(reference[name])
        evidence: dict[str, float | str] = {"raw_dtype": str(arr.dtype), "quant_dtype": q.dtype, "raw_elements": float(arr.size)}
        if arr.itemsize == 1:
            detail = f"The raw '{name}' buffer holds {arr.dtype} values ({arr.size} elements), but the output is quantized to {q.dtype}"
            if ref is not None:
                evidence["reference_elements"] = float(ref.size)
                pairs = _as_uint16_pairs(arr, ref.shape, q.dtype)
                if pairs is not None:
                    err = _nmae(ref, pairs, q.dequantize)
                    evidence["nmae_as_16bit_pairs"] = err
                    detail += (
                        f"; it has twice the reference's {ref.size} elements, and read as {q.dtype} byte pairs it "
                        f"matches the reference with nmae {err:.4g}"
                    )
                elif arr.shape == ref.shape:
                    detail += "; the element count matches, so the 16-bit values were truncated to 8 bits"
        elif arr.itemsize == 2 and ref is not None and arr.shape == ref.shape and _integral(arr) and float(arr.max()) <= 255:
            err = _nmae(ref, arr, q.dequantize)
            if err <= FAR_NMAE:
                continue
            evidence["nmae_dequantized"] = err
            detail = (
                f"The raw '{name}' values are 16-bit but all lie in [{arr.min():.0f}, {arr.max():.0f}], and dequantized "
                f"with the 16-bit scale {q.scale:.6g} / zero point {q.zero_point:g} they are far from the reference "
                f"(nmae {err:.4g}): 8-bit reads widened to 16 bits"
            )
        else:
            continue
        found.append(
            Finding(
                code="16bit_read_as_8bit",
                title=f"'{name}': 16-bit output read as 8-bit",
                message=detail + ".",
                fix=(
                    f"Read '{name}' as {q.dtype} (HailoRT: format type UINT16 or FLOAT32 for this output; UINT8 is "
                    f"refused for 16-bit outputs) and dequantize with scale {q.scale:.6g} and zero point {q.zero_point:g}."
                ),
                severity="error",
                output=name,
                evidence=evidence,
            )
        )
    return found


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
    for rows in _blocks(ev):
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


# -- all checks --------------------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """Optional inputs of every check; a check runs only when all of its (non-defaulted) evidence is present."""

    # what the model was fed (feed domain, the model's layout) and what it expects
    fed: np.ndarray | None = None
    placement: Literal["host", "model"] | None = None
    normalization: Normalization | None = None
    domain: tuple[float, float] | None = None
    expected_input_dtype: str | None = None
    # the data as stored, against the model input
    data_shape: tuple[int, ...] | None = None
    model_input_shape: tuple[int | str, ...] | None = None
    declared_layout: str | None = None
    # outputs: as the user's code compared them, the float reference, the device's raw integers and their quantization
    candidate: Mapping[str, np.ndarray] | None = None
    reference: Mapping[str, np.ndarray] | None = None
    raw: Mapping[str, np.ndarray] | None = None
    quant: Mapping[str, QuantParams] | None = None
    # what the optimizer did
    requested_optimization_level: int | None = None
    params: Mapping[str, object] | None = None
    flags: Sequence[str] | None = None
    # calibration coverage (same layout and domain for both)
    calibration: np.ndarray | None = None
    evaluation: np.ndarray | None = None
    max_outside_share: float = 0.001
    # emulator vs device
    metrics: Mapping[str, float] | None = None
    outputs: Sequence[str] | None = None
    lsb_tolerance: float = 1.0
    identical_min: float = 0.99
    # two device runs of the same inputs (raw outputs)
    repeat: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None


def run_all(evidence: Evidence) -> list[Finding]:
    """Every check whose evidence is present, in the order of ``FINDING_CODES``."""
    e = evidence
    found: list[Finding | None] = []
    if e.fed is not None and e.placement is not None and e.domain is not None:
        found.append(check_normalization(e.fed, e.placement, e.normalization, e.domain))
    if e.fed is not None and e.expected_input_dtype is not None and e.domain is not None:
        raw_input = e.placement != "host" or e.normalization is None
        found.append(check_input_type(e.fed, e.expected_input_dtype, e.domain, raw_input=raw_input))
    if e.data_shape is not None and e.model_input_shape is not None and e.declared_layout is not None:
        found.append(check_layout(e.data_shape, e.model_input_shape, e.declared_layout))
    if e.candidate is not None and e.reference is not None and e.quant is not None:
        found.extend(check_dequantized(e.candidate, e.reference, e.quant))
    if e.raw is not None and e.quant is not None:
        found.extend(check_output_bits(e.raw, e.quant, e.reference))
    if e.requested_optimization_level is not None and (e.params is not None or e.flags is not None):
        found.append(check_optimization_level(e.requested_optimization_level, e.params or {}, e.flags or ()))
    if e.calibration is not None and e.evaluation is not None:
        found.append(check_calibration_coverage(e.calibration, e.evaluation, e.max_outside_share))
    if e.metrics is not None and e.outputs is not None:
        found.extend(check_agreement(e.metrics, e.outputs, e.lsb_tolerance, e.identical_min))
    if e.repeat is not None:
        found.append(check_determinism(*e.repeat))
    return [f for f in found if f is not None]
