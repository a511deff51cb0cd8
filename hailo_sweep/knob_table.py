"""Which knobs a table of trials shows: those whose value differs between the listed trials, each under a short
header; the knobs that are the same in every listed trial are said once, beside the table.

Pure and light (no Optuna, no Rich): the console table and the sweep summary on MLflow both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from hailo_sweep.settings import Settings, inert_knobs

#: every knob, in the order of the Settings fields (the base knobs first, then the algorithm knobs)
KNOB_ORDER: tuple[str, ...] = tuple(f.name for f in fields(Settings))

#: short column headers (the config key is said in the legend under the table)
HEADERS: dict[str, str] = {
    "optimization_level": "opt",
    "compression_level": "comp",
    "calibset_size": "calib",
    "normalization_placement": "norm",
    "output_16bit": "16-bit",
    "noisy_layers_16bit": "noisy16",
    "equalization": "equal",
    "bias_correction": "bias",
    "finetune": "finetune",
    "calibration_method": "method",
    "clipping_percentile": "clip%",
    "clipping_scope": "scope",
    "weights_granularity": "weights",
    "all_16bit": "all16",
}

#: right-aligned columns
NUMERIC_KNOBS = frozenset({"optimization_level", "compression_level", "calibset_size", "noisy_layers_16bit", "clipping_percentile"})

#: shown for a knob a trial did not set, or that has no effect under its other knobs
NO_EFFECT = "-"


@dataclass(frozen=True)
class KnobColumns:
    varying: tuple[str, ...]  # knobs shown as columns, in KNOB_ORDER
    constant: dict[str, str]  # knob -> the value every listed trial has

    def cell(self, knob: str, params: Mapping[str, Any]) -> str:
        return effective(params).get(knob, NO_EFFECT)

    def legend(self) -> str:
        """``opt = optimization_level, ...`` for the columns whose header is not the config key."""
        return ", ".join(f"{HEADERS[k]} {k}" for k in self.varying if HEADERS.get(k, k) != k)

    def constants_line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.constant.items())


def effective(params: Mapping[str, Any]) -> dict[str, str]:
    """A trial's knobs as displayed: every known knob it set, as text, minus those without effect (a percentile
    under minmax calibration is the same point as any other percentile)."""
    inert = set(inert_knobs(params.get("calibration_method")))
    return {k: str(params[k]) for k in KNOB_ORDER if k in params and params[k] is not None and k not in inert}


def knob_columns(rows: Sequence[Mapping[str, Any]]) -> KnobColumns:
    """Split the knobs the listed trials set into those that differ between them and those that do not."""
    shown = [effective(p) for p in rows]
    varying: list[str] = []
    constant: dict[str, str] = {}
    for knob in KNOB_ORDER:
        values = {s.get(knob, NO_EFFECT) for s in shown}
        if values == {NO_EFFECT}:
            continue  # no listed trial sets it
        if len(values) == 1:
            constant[knob] = values.pop()
        else:
            varying.append(knob)
    return KnobColumns(tuple(varying), constant)

