"""The settings of one trial: a typed value object, produced by the search space and read by backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Placement = Literal["host", "model"]
Policy = Literal["enabled", "disabled"]
CalibrationStatistic = Literal["minmax", "percentile", "entropy"]
ClippingScope = Literal["all", "first", "outputs"]
WeightsGranularity = Literal["per_channel", "per_tensor"]
All16Bit = Literal["none", "all"]

OPTIMIZATION_LEVELS = range(0, 5)
COMPRESSION_LEVELS = range(0, 6)

#: The algorithm knobs beside optimization_level (KNOBS.md). ``None`` = the optimization level's default.
ALGORITHM_KNOBS: dict[str, tuple[str, ...] | None] = {
    "equalization": ("enabled", "disabled"),
    "bias_correction": ("enabled", "disabled"),
    "finetune": ("enabled", "disabled"),
    "calibration_method": ("minmax", "percentile", "entropy"),
    "clipping_percentile": None,  # a float in (50, 100)
    "clipping_scope": ("all", "first", "outputs"),
    "weights_granularity": ("per_channel", "per_tensor"),
    "all_16bit": ("none", "all"),
}


def inert_knobs(calibration_method: str | None) -> tuple[str, ...]:
    """The algorithm knobs that cannot change anything under this calibration method (the canonical form drops them):
    a percentile means nothing to minmax or entropy, and minmax applies to every tensor whatever the scope."""
    if calibration_method == "minmax":
        return ("clipping_percentile", "clipping_scope")
    if calibration_method == "entropy":
        return ("clipping_percentile",)
    return ()


@dataclass(frozen=True)
class Settings:
    """Every knob a trial sets, with the values a backend must honour or refuse.

    ``output_16bit`` holds ONNX output names (sorted), never the keywords ``none``/``all``:
    the search space resolves those before a ``Settings`` is built.
    """

    optimization_level: int
    compression_level: int
    calibset_size: int
    normalization_placement: Placement
    output_16bit: tuple[str, ...] = field(default_factory=tuple)
    #: promote the k layers with the lowest per-layer SNR (ranked once per sweep) to 16-bit
    noisy_layers_16bit: int = 0
    # -- algorithm knobs: None = what the optimization level does by default (backend-specific, see its recipe) --
    equalization: Policy | None = None
    bias_correction: Policy | None = None
    finetune: Policy | None = None
    #: the activation statistic of the clipped tensors (``clipping_scope``); the others use min/max
    calibration_method: CalibrationStatistic | None = None
    #: upper percentile of a ``percentile`` calibration (the lower one is 100 - p)
    clipping_percentile: float | None = None
    clipping_scope: ClippingScope | None = None
    weights_granularity: WeightsGranularity | None = None
    all_16bit: All16Bit | None = None

    def __post_init__(self) -> None:
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization_level must be 0-4, got {self.optimization_level}")
        if self.compression_level not in COMPRESSION_LEVELS:
            raise ValueError(f"compression_level must be 0-5, got {self.compression_level}")
        if self.calibset_size < 1:
            raise ValueError(f"calibset_size must be >= 1, got {self.calibset_size}")
        if self.normalization_placement not in ("host", "model"):
            raise ValueError(f"normalization_placement must be host or model, got {self.normalization_placement!r}")
        if self.noisy_layers_16bit < 0:
            raise ValueError(f"noisy_layers_16bit must be >= 0, got {self.noisy_layers_16bit}")
        object.__setattr__(self, "output_16bit", tuple(sorted(self.output_16bit)))
        for knob, allowed in ALGORITHM_KNOBS.items():
            value = getattr(self, knob)
            if value is not None and allowed is not None and value not in allowed:
                raise ValueError(f"{knob} must be one of {', '.join(allowed)}, got {value!r}")
        if self.clipping_percentile is not None:
            object.__setattr__(self, "clipping_percentile", float(self.clipping_percentile))
            if not 50.0 < self.clipping_percentile < 100.0:
                raise ValueError(f"clipping_percentile must be in (50, 100), got {self.clipping_percentile}")
        # Canonical form: a knob that cannot change anything under an explicit calibration method is dropped, so
        # points that differ only there are one point (equal and hashable alike: the sweep dedupes on them).
        for knob in inert_knobs(self.calibration_method):
            object.__setattr__(self, knob, None)

    def algorithm_knobs(self) -> dict[str, str | float]:
        """The algorithm knobs that are set (not left to the level's default)."""
        return {k: getattr(self, k) for k in ALGORITHM_KNOBS if getattr(self, k) is not None}

    def as_params(self) -> dict[str, str | int | float]:
        """Flat, string-friendly form for logging (MLflow params, manifests); unset algorithm knobs are left out."""
        flat: dict[str, str | int | float] = {k: v for k, v in asdict(self).items() if k not in ALGORITHM_KNOBS}
        flat["output_16bit"] = ",".join(self.output_16bit) if self.output_16bit else "none"
        flat.update(self.algorithm_knobs())
        return flat

    @classmethod
    def from_params(cls, params: dict[str, str | int]) -> Settings:
        """Inverse of ``as_params`` (e.g. from a lock file or an MLflow run)."""
        out16 = str(params.get("output_16bit", "none"))
        return cls(
            optimization_level=int(params["optimization_level"]),
            compression_level=int(params["compression_level"]),
            calibset_size=int(params["calibset_size"]),
            normalization_placement=str(params["normalization_placement"]),  # type: ignore[arg-type]
            output_16bit=() if out16 == "none" else tuple(out16.split(",")),
            noisy_layers_16bit=int(params.get("noisy_layers_16bit", 0)),
            **_algorithm_params(params),  # type: ignore[arg-type]
        )


def _algorithm_params(params: dict[str, str | int | float]) -> dict[str, str | float]:
    out: dict[str, str | float] = {}
    for knob in ALGORITHM_KNOBS:
        value = params.get(knob)
        if value is None or value == "default":
            continue
        out[knob] = float(value) if knob == "clipping_percentile" else str(value)
    return out
