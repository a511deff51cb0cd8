"""Checks for the mistakes that make a device look worse than its emulator, each returning a named ``Finding``.

Every check is pure numpy on evidence the pipeline (or a user's own data) already holds, and each one names exactly
one mistake from hailo-api.md section 4 (emulator vs hardware mismatch causes) with the action that fixes it. The
thresholds are chosen so that a correct run produces no finding at all: a check that cannot decide stays silent.
``run_all`` runs every check whose evidence is present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hailo_sweep.backends.base import Normalization, QuantParams
from hailo_sweep.diagnose.finding import FINDING_CODES, Finding, Severity
from hailo_sweep.diagnose.input_checks import check_input_type, check_layout, check_normalization, check_normalization_unset
from hailo_sweep.diagnose.output_checks import check_dequantized, check_output_bits
from hailo_sweep.diagnose.run_checks import check_agreement, check_calibration_coverage, check_determinism, check_optimization_level

__all__ = [
    "FINDING_CODES", "Evidence", "Finding", "Severity", "check_agreement", "check_calibration_coverage", "check_dequantized",
    "check_determinism", "check_input_type", "check_layout", "check_normalization", "check_normalization_unset", "check_optimization_level",
    "check_output_bits", "run_all",
]


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
