"""What the model was fed: normalization applied twice, missed, or never configured; floats for a uint8 input; the layout."""

from __future__ import annotations

from typing import Literal

import numpy as np

from hailo_sweep.backends.base import Normalization
from hailo_sweep.diagnose.finding import Finding
from hailo_sweep.diagnose.stats import integral, moments


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
    stats = moments(x)
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


# -- 1b. no normalization configured -----------------------------------------------------------------------------------

UNSET_MIN_SAMPLES = 32  # fewer labelled samples say too little
UNSET_MIN_ACCURACY = 0.5  # the float model must clearly work on the standardized data ...
UNSET_MIN_GAIN = 0.3  # ... and be that much more accurate there than on the data as configured


def check_normalization_unset(
    accuracy_as_fed: float, accuracy_standardized: float, samples: int, mean: tuple[float, ...], std: tuple[float, ...], output: str,
) -> Finding | None:
    """The config sets no normalization, yet the float model classifies the data far better once it is standardized.

    With no ``normalization`` the float model (the reference every trial is compared with) is fed the data as stored.
    ``accuracy_as_fed`` is its top-1 accuracy against the labels on those samples, ``accuracy_standardized`` its accuracy
    on the same samples standardized per channel with the calibration set's own ``mean`` and ``std``. A model trained on
    the stored domain loses accuracy when its input is rescaled, so standardizing helps only a model that expects
    normalized input: the finding is raised when the standardized accuracy is at least ``UNSET_MIN_ACCURACY`` and at
    least ``UNSET_MIN_GAIN`` above the accuracy as fed, on at least ``UNSET_MIN_SAMPLES`` samples; else it stays silent
    (as it does without labels: no other evidence tells what a model expects).
    """
    if samples < UNSET_MIN_SAMPLES or not (accuracy_standardized >= UNSET_MIN_ACCURACY and accuracy_standardized - accuracy_as_fed >= UNSET_MIN_GAIN):
        return None
    stats = ", ".join(f"{v:.4g}" for v in mean), ", ".join(f"{v:.4g}" for v in std)
    return Finding(
        code="normalization_unset",
        title="No normalization configured, but the model classifies far better on normalized input",
        message=(
            f"The config sets no normalization, so the float model is fed the data as stored; on {samples} labelled samples "
            f"its top-1 accuracy ({output}) is {accuracy_as_fed:.1%}, and {accuracy_standardized:.1%} once the same samples are "
            f"standardized with the calibration data's own per-channel mean [{stats[0]}] and std [{stats[1]}]. Every trial is "
            "compared with a reference that is itself wrong."
        ),
        fix=(
            f"Set the normalization the model was trained with, e.g. normalization: {{mean: [{stats[0]}], std: [{stats[1]}]}} "
            "(the data's own statistics; prefer the training values if you know them)."
        ),
        severity="warning",
        output=output,
        evidence={"accuracy_as_fed": accuracy_as_fed, "accuracy_standardized": accuracy_standardized, "samples": float(samples)},
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
    unit_scaled = xmin >= 0.0 and xmax <= 1.0 and (hi - lo) > 2.0 and not integral(x)
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
