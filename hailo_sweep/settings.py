"""The settings of one trial: a typed value object, produced by the search space and read by backends."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Placement = Literal["host", "model"]

OPTIMIZATION_LEVELS = range(0, 5)
COMPRESSION_LEVELS = range(0, 6)


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

    def as_params(self) -> dict[str, str | int]:
        """Flat, string-friendly form for logging (MLflow params, manifests)."""
        flat: dict[str, str | int] = asdict(self)
        flat["output_16bit"] = ",".join(self.output_16bit) if self.output_16bit else "none"
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
        )
