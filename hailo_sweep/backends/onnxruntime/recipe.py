"""The embedded backend's quantization recipe: what each knob value means in ONNX Runtime terms.

Optimization levels are cumulative, like the Dataflow Compiler's:

=====  =======================================================================================================
level  recipe
=====  =======================================================================================================
0      MinMax calibration, per-channel int8 weights, uint8 activations (QDQ), activations kept (no ReLU folding)
1      level 0 + cross-layer equalization of Conv -> (Relu|MaxPool)* -> Conv chains
2      level 1 + empirical bias correction (quantize, measure the weight error's mean effect, correct, re-quantize)
3      level 2 + activation clipping: Percentile calibration (99.999th percentile) instead of MinMax
4      refused: Hailo's level 4 is full AdaRound, which ONNX Runtime has no equivalent for
=====  =======================================================================================================

Compression level k puts a share of 0.2 * k of the weight elements at 4 bit (QInt4, largest layers first).
16-bit outputs: the output activation becomes QUInt16 and the producing layer's weights QInt16 (a16_w16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.settings import Settings

MAX_LEVEL = 3
PERCENTILE = 99.999
SHARE_PER_COMPRESSION_LEVEL = 0.2

LEVEL_STEPS: dict[int, str] = {
    0: "MinMax calibration, per-channel int8 weights, uint8 activations",
    1: "+ cross-layer equalization",
    2: "+ empirical bias correction",
    3: f"+ activation clipping (Percentile {PERCENTILE} calibration)",
}


@dataclass(frozen=True)
class Recipe:
    """The concrete steps for one ``Settings``; rendered as text and logged as the trial's 'model script'."""

    settings: Settings
    equalize: bool
    bias_correction: bool
    calibrate_method: str  # "MinMax" | "Percentile"
    share_4bit: float
    lines: list[str] = field(default_factory=list)

    @classmethod
    def for_settings(cls, settings: Settings) -> Recipe:
        check(settings)
        level = settings.optimization_level
        return cls(
            settings=settings,
            equalize=level >= 1,
            bias_correction=level >= 2,
            calibrate_method="Percentile" if level >= 3 else "MinMax",
            share_4bit=round(SHARE_PER_COMPRESSION_LEVEL * settings.compression_level, 6),
        )

    def render(self, details: list[str]) -> str:
        s = self.settings
        head = [
            "# hailo-sweep onnxruntime quantization recipe",
            f"optimization_level = {s.optimization_level}   # " + "; ".join(LEVEL_STEPS[i] for i in range(s.optimization_level + 1)),
            f"compression_level = {s.compression_level}   # target share of weights at 4 bit: {self.share_4bit:.0%}",
            f"calibset_size = {s.calibset_size}",
            f"normalization_placement = {s.normalization_placement}",
            f"output_16bit = {', '.join(s.output_16bit) or 'none'}",
            "quantize_static: QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8, "
            f"calibrate_method={self.calibrate_method}, QDQKeepRemovableActivations=True",
        ]
        return "\n".join(head + details) + "\n"


def check(settings: Settings) -> None:
    if settings.optimization_level > MAX_LEVEL:
        raise UnsupportedSetting(
            f"optimization_level {settings.optimization_level} (AdaRound) has no ONNX Runtime equivalent; "
            f"the onnxruntime backend supports 0-{MAX_LEVEL}",
            fix=f"limit search.optimization_level to 0-{MAX_LEVEL}, or use the hailo backend",
        )
