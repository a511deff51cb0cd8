"""A named observation with the numbers behind it and the action that fixes it; the codes every check may raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    "normalization_unset",
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
