"""The embedded backend's quantization recipe: what each knob value means in ONNX Runtime terms.

Optimization levels are cumulative, like the Dataflow Compiler's:

=====  =======================================================================================================
level  recipe
=====  =======================================================================================================
0      plain quantize_static: MinMax calibration, per-channel int8 weights, uint8 activations (QDQ)
1      level 0 + cross-layer equalization of Conv -> (Relu|MaxPool)* -> Conv chains
2      level 1 + empirical bias correction (quantize, measure the weight error's mean effect, correct, re-quantize)
3      level 2 + activation clipping: Percentile calibration (99.999th percentile) instead of MinMax
4      refused: Hailo's level 4 is full AdaRound, which ONNX Runtime has no equivalent for
=====  =======================================================================================================

Each algorithm knob, when set, overrides what the level does by default: ``equalization`` (level >= 1),
``bias_correction`` (level >= 2), ``calibration_method`` (percentile at level 3, else minmax) with
``clipping_percentile`` (99.999) and ``clipping_scope`` (all: every activation; first: the first weight layer's
outputs; outputs: the output layers' activations; the others keep MinMax ranges), ``weights_granularity``
(per_channel), ``all_16bit`` (none; all = QUInt16 activations and QInt16 weights everywhere). ``finetune: enabled``
is refused (ONNX Runtime has no quantization-aware fine-tuning); ``disabled`` is what this backend always does.
Bias correction re-quantizes with the ranges calibrated before it (as the DFC's post-quantization step does), so it
costs no second calibration.

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


METHOD_NAMES = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Recipe:
    """The concrete steps for one ``Settings``; rendered as text and logged as the trial's 'model script'."""

    settings: Settings
    equalize: bool
    bias_correction: bool
    calibrate_method: str  # "MinMax" | "Percentile" | "Entropy": the statistic of the clipped tensors
    share_4bit: float
    percentile: float = PERCENTILE
    clipping_scope: str = "all"  # all | first | outputs
    per_channel: bool = True
    all_16bit: bool = False
    #: QDQKeepRemovableActivations: keep Relu/Clip as their own quantized ops (a guard against pitfall P2 with
    #: symmetric ranges). Off by default: quantize_static's default folds them into the preceding layer's range.
    keep_activations: bool = False
    lines: list[str] = field(default_factory=list)

    @classmethod
    def for_settings(cls, settings: Settings) -> Recipe:
        check(settings)
        level = settings.optimization_level
        method = settings.calibration_method or ("percentile" if level >= 3 else "minmax")
        return cls(
            settings=settings,
            equalize=_policy(settings.equalization, level >= 1),
            bias_correction=_policy(settings.bias_correction, level >= 2),
            calibrate_method=METHOD_NAMES[method],
            share_4bit=round(SHARE_PER_COMPRESSION_LEVEL * settings.compression_level, 6),
            percentile=settings.clipping_percentile or PERCENTILE,
            clipping_scope=settings.clipping_scope or "all",
            per_channel=(settings.weights_granularity or "per_channel") == "per_channel",
            all_16bit=settings.all_16bit == "all",
        )

    @property
    def clipping(self) -> str:
        """How the clipped tensors are calibrated, in words (``MinMax`` when nothing is clipped)."""
        if self.calibrate_method == "MinMax":
            return "MinMax"
        what = f"Percentile {self.percentile:g}" if self.calibrate_method == "Percentile" else "Entropy"
        return f"{what} on {self.clipping_scope} tensors" + ("" if self.clipping_scope == "all" else ", MinMax elsewhere")

    def render(self, details: list[str]) -> str:
        s = self.settings
        head = [
            "# hailo-sweep onnxruntime quantization recipe",
            f"optimization_level = {s.optimization_level}   # " + "; ".join(LEVEL_STEPS[i] for i in range(s.optimization_level + 1)),
            f"compression_level = {s.compression_level}   # target share of weights at 4 bit: {self.share_4bit:.0%}",
            f"calibset_size = {s.calibset_size}",
            f"normalization_placement = {s.normalization_placement}",
            f"output_16bit = {', '.join(s.output_16bit) or 'none'}",
            *(f"{knob} = {value}   # set (overrides the level's default)" for knob, value in s.algorithm_knobs().items()),
            f"quantize_static: QDQ, per_channel={self.per_channel}, "
            f"activation_type={'QUInt16' if self.all_16bit else 'QUInt8'}, weight_type={'QInt16' if self.all_16bit else 'QInt8'}, "
            f"calibrate_method={self.calibrate_method}, clipping: {self.clipping}",
        ]
        return "\n".join(head + details) + "\n"


def _policy(value: str | None, default: bool) -> bool:
    return default if value is None else value == "enabled"


def check(settings: Settings) -> None:
    if settings.finetune == "enabled":
        raise UnsupportedSetting(
            "finetune enabled (the DFC's quantization-aware fine-tuning) has no ONNX Runtime equivalent",
            key="search.finetune",
            fix="drop 'enabled' from search.finetune (or the knob), or use the hailo backend",
        )
    if settings.optimization_level > MAX_LEVEL:
        raise UnsupportedSetting(
            f"optimization_level {settings.optimization_level} (AdaRound) has no ONNX Runtime equivalent; "
            f"the onnxruntime backend supports 0-{MAX_LEVEL}",
            fix=f"limit search.optimization_level to 0-{MAX_LEVEL}, or use the hailo backend",
        )
