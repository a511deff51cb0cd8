"""Per-layer noise on the hailo backend: Hailo's layer noise analysis read back, named, and ranked for 16-bit promotion.

Why a module of its own: the DFC runs the analysis (``runner.analyze_noise``) but hands nothing back; its per-layer
SNRs land in ``runner.get_params_statistics()`` under internal keys, and the sweep needs them twice: as the trial's
per-layer noise table (``Backend.layer_noise``) and, once per sweep, as the ranking that ``noisy_layers_16bit``
promotes from. Pure work on what the SDK returned: no SDK import here.

Facts (hailo-api.md §1.8, §2, §4):

- keys ``layer_noise_analysis/snr`` (advanced analysis) and ``layer_noise_analysis/partial_snr`` (simple analysis),
  read per layer as ``stats[layer.name].get(key)`` with scoped layer names (ACE diag ``high_precision_inspector.py``,
  which prefers ``snr`` and falls back to ``partial_snr``); a flat ``stats.get(f"{layer}/{key}")`` form appears in a
  commented-out call in ACE's PointPillars example, so both are tried;
- the values are arrays (the inspector concatenates them and calls ``float()`` on each), in dB (its threshold is
  ``SQNR_THRESHOLD = 10``). **UNVERIFIED**: that an array never holds more than one value; if it does, the lowest
  (noisiest) is taken;
- the inspector skips input and output layers when listing layers to promote ("Output SNR will exist also in the
  real output"), and nms/argmax layers ("SNR is bad metric for them");
- feature_splitter, concat and shortcut layers "can only output the format they get as input" (ACE 16-bit notebook),
  so they are never promoted on their own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hailo_sweep.backends.base import LayerNoise
from hailo_sweep.backends.hailo.naming import HnGraph
from hailo_sweep.metrics import SNR_CAP_DB

SNR_KEY = "layer_noise_analysis/snr"
PARTIAL_SNR_KEY = "layer_noise_analysis/partial_snr"
SNR_KEYS = (SNR_KEY, PARTIAL_SNR_KEY)  # preference order, as the ACE inspector reads them
#: HN layer types never promoted by ``noisy_layers_16bit`` (see the module docstring)
NOT_PROMOTABLE = frozenset({"input_layer", "output_layer", "concat", "feature_splitter", "shortcut", "nms", "argmax"})


class LayerNoiseError(RuntimeError):
    """The layer noise analysis ran but gave nothing usable; the message says what was found instead."""


@dataclass(frozen=True)
class LayerSnr:
    layer: str  # scoped HN name
    snr_db: float
    key: str  # the statistics key it was read from


def _as_db(value: Any) -> float | None:
    """A statistics value (array, list or number) as one dB figure: the lowest finite-or-infinite entry, capped."""
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return None
    return float(np.clip(arr.min(), -SNR_CAP_DB, SNR_CAP_DB))


def _per_layer(stats: Any, layer: str) -> Mapping[str, Any] | None:
    try:
        found = stats[layer]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return found if hasattr(found, "get") else None


def _lookup(stats: Any, layer: str) -> LayerSnr | None:
    per_layer = _per_layer(stats, layer)
    for key in SNR_KEYS:
        value = per_layer.get(key) if per_layer is not None else None
        if value is None and hasattr(stats, "get"):
            value = stats.get(f"{layer}/{key}")
        db = _as_db(value) if value is not None else None
        if db is not None:
            return LayerSnr(layer, db, key)
    return None


def read_layer_snr(stats: Any, layers: Iterable[str]) -> list[LayerSnr]:
    """The SNR of every layer that has one in ``get_params_statistics()``'s result, in the order of ``layers``."""
    found = [_lookup(stats, layer) for layer in layers]
    return [f for f in found if f is not None]


def require_snr(stats: Any, layers: Iterable[str]) -> list[LayerSnr]:
    """``read_layer_snr`` over ``layers``, or ``LayerNoiseError`` naming what the statistics did contain."""
    snrs = read_layer_snr(stats, layers)
    if snrs:
        return snrs
    try:
        seen = sorted(str(k) for k in list(stats)[:8])
    except TypeError:
        seen = []
    raise LayerNoiseError(
        f"analyze_noise ran, but get_params_statistics() holds no {SNR_KEY!r} or {PARTIAL_SNR_KEY!r} for any layer of "
        f"the HN (first keys: {', '.join(seen) or 'none'}); the installed Dataflow Compiler may store the analysis "
        f"elsewhere: check the profiler's Accuracy tab (`hailo profiler <har>`)"
    )


def to_layer_noise(snrs: Iterable[LayerSnr], graph: HnGraph) -> list[LayerNoise]:
    """``LayerNoise`` rows, noisiest first: HN layer names, except that an output's pseudo-layer and its producing layer
    become one row named after the ONNX output (``kind="output"``, the lower of the two SNRs)."""
    outputs = graph.output_names()
    rows: dict[str, LayerNoise] = {}
    for snr in snrs:
        name, kind = (outputs[snr.layer], "output") if snr.layer in outputs else (snr.layer, "activation")
        if name not in rows or snr.snr_db < rows[name].snr_db:
            rows[name] = LayerNoise(layer=name, snr_db=snr.snr_db, kind=kind)
    return sorted(rows.values(), key=lambda n: (n.snr_db, n.layer))


def promotable(layer: str, graph: HnGraph) -> bool:
    """A layer ``noisy_layers_16bit`` may set to a16_w16: a layer of the translated HN (layers the model script adds,
    such as normalization, cannot be named before they exist), not an input/output (outputs are ``output_16bit``'s,
    their producing layers included), and not a layer that only passes its input's precision on."""
    return layer in graph.layers and layer not in graph.output_names() and graph.types.get(layer, "") not in NOT_PROMOTABLE


@dataclass(frozen=True)
class NoiseRanking:
    """The once-per-sweep ranking ``noisy_layers_16bit`` promotes from (cached as JSON under the sweep's work dir)."""

    layers: tuple[str, ...]  # promotable scoped HN layers, noisiest first
    snr_db: dict[str, float]  # every layer's SNR in the level-0 analysis, for the record
    samples: int  # calibration samples analysed
    key: str  # statistics key the SNRs came from

    @classmethod
    def from_snrs(cls, snrs: list[LayerSnr], graph: HnGraph, samples: int) -> NoiseRanking:
        ranked = sorted((s for s in snrs if promotable(s.layer, graph)), key=lambda s: (s.snr_db, s.layer))
        keys = sorted({s.key for s in snrs})
        return cls(
            layers=tuple(s.layer for s in ranked),
            snr_db={s.layer: s.snr_db for s in snrs},
            samples=samples,
            key=",".join(keys),
        )

    def noisiest(self, k: int) -> list[str]:
        return list(self.layers[: max(k, 0)])

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "layers": list(self.layers)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NoiseRanking:
        data = json.loads(text)
        return cls(layers=tuple(data["layers"]), snr_db=dict(data["snr_db"]), samples=int(data["samples"]), key=str(data["key"]))


__all__ = [
    "LayerNoiseError",
    "LayerSnr",
    "NoiseRanking",
    "PARTIAL_SNR_KEY",
    "SNR_KEY",
    "promotable",
    "read_layer_snr",
    "require_snr",
    "to_layer_noise",
]
