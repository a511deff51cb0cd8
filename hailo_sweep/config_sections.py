"""The sections of a sweep config, one pydantic model each (unknown keys refused); ``config.SweepConfig`` holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hailo_sweep.settings import COMPRESSION_LEVELS, OPTIMIZATION_LEVELS

Target = Literal["hailo8", "hailo8l", "hailo10h"]
TARGETS: tuple[str, ...] = ("hailo8", "hailo8l", "hailo10h")
BackendName = Literal["auto", "hailo", "onnxruntime"]
Stage = Literal["device", "emulated"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntRange(StrictModel):
    """A range knob: ``{low: 64, high: 1024, step: 64}`` or ``{low: 64, high: 1024, log: true}``."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.step != 1:
            raise ValueError("log ranges take no step")
        return self


IntKnob = list[int] | IntRange


class SearchSpaceConfig(StrictModel):
    """Each knob: a list of choices, or (for integers) a range. A knob with one choice is fixed."""

    optimization_level: IntKnob = Field(default_factory=lambda: [2])
    compression_level: IntKnob = Field(default_factory=lambda: [0])
    calibset_size: IntKnob = Field(default_factory=lambda: [64])
    normalization_placement: list[Literal["host", "model"]] = Field(default_factory=lambda: ["model"])
    # each choice: "none", "all", one output name, or a list of output names
    output_16bit: list[str | list[str]] = Field(default_factory=lambda: ["none"])
    # k: promote the k noisiest layers (lowest per-layer SNR, ranked once per sweep) to 16-bit
    noisy_layers_16bit: IntKnob = Field(default_factory=lambda: [0])
    # Algorithm knobs beside optimization_level; absent (None) = the level's default. Strings, never YAML booleans.
    equalization: list[Literal["enabled", "disabled"]] | None = None
    bias_correction: list[Literal["enabled", "disabled"]] | None = None
    finetune: list[Literal["enabled", "disabled"]] | None = None
    calibration_method: list[Literal["minmax", "percentile", "entropy"]] | None = None
    clipping_percentile: list[Annotated[float, Field(gt=50.0, lt=100.0)]] | None = None
    clipping_scope: list[Literal["all", "first", "outputs"]] | None = None
    weights_granularity: list[Literal["per_channel", "per_tensor"]] | None = None
    all_16bit: list[Literal["none", "all"]] | None = None

    @field_validator("equalization", "bias_correction", "finetune", "all_16bit", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(x, bool) for x in v):
            raise ValueError("YAML reads on/off/yes/no/true/false as booleans: write enabled/disabled (all_16bit: none/all)")
        return v

    @field_validator("output_16bit", mode="before")
    @classmethod
    def _numeric_names_as_text(cls, v: Any) -> Any:  # an unquoted numeric output name reads as an int in YAML
        def text(x: Any) -> Any:
            return str(x) if isinstance(x, int) and not isinstance(x, bool) else x

        return [[text(y) for y in x] if isinstance(x, list) else text(x) for x in v] if isinstance(v, list) else v

    @field_validator("optimization_level")
    @classmethod
    def _opt_range(cls, v: IntKnob) -> IntKnob:
        return _check_knob_range(v, OPTIMIZATION_LEVELS, "optimization_level")

    @field_validator("compression_level")
    @classmethod
    def _comp_range(cls, v: IntKnob) -> IntKnob:
        return _check_knob_range(v, COMPRESSION_LEVELS, "compression_level")

    @field_validator("calibset_size")
    @classmethod
    def _calib_positive(cls, v: IntKnob) -> IntKnob:
        return _check_knob_min(v, 1, "calibset_size")

    @field_validator("noisy_layers_16bit")
    @classmethod
    def _noisy_non_negative(cls, v: IntKnob) -> IntKnob:
        return _check_knob_min(v, 0, "noisy_layers_16bit")

    @field_validator(
        "optimization_level", "compression_level", "calibset_size", "normalization_placement", "output_16bit", "noisy_layers_16bit",
        "equalization", "bias_correction", "finetune", "calibration_method", "clipping_percentile", "clipping_scope",
        "weights_granularity", "all_16bit",
    )
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one choice")
        return v


def _check_knob_min(v: IntKnob, minimum: int, name: str) -> IntKnob:
    values = v if isinstance(v, list) else [v.low, v.high]
    if any(x < minimum for x in values):
        raise ValueError(f"{name} values must be >= {minimum}")
    return v


def _check_knob_range(v: IntKnob, allowed: range, name: str) -> IntKnob:
    values = v if isinstance(v, list) else [v.low, v.high]
    bad = [x for x in values if x not in allowed]
    if bad:
        raise ValueError(f"{name} must be within {allowed.start}-{allowed.stop - 1}; got {bad}")
    return v


class DataConfig(StrictModel):
    calibration: Path
    evaluation: Path
    inputs_key: str = "x"  # array name inside .npz files
    labels_key: str | None = None  # array name of the labels in the evaluation .npz; set it to require labels
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    domain: tuple[float, float] = (0.0, 255.0)

    @model_validator(mode="after")
    def _domain_ordered(self) -> DataConfig:
        if not self.domain[0] < self.domain[1]:
            raise ValueError(f"domain must be [low, high] with low < high, got {list(self.domain)}")
        return self


class NormalizationConfig(StrictModel):
    """``(x - mean) / std`` per channel, in the data's raw domain."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _shapes(self) -> NormalizationConfig:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std need the same, non-zero number of values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class OutputConfig(StrictModel):
    weight: float = Field(default=1.0, ge=0.0)
    # logits: class scores (softmax applied for the probability error); probabilities: already softmax
    kind: Literal["tensor", "logits", "probabilities"] = "tensor"
    batch_axis: int = Field(default=0, ge=0)  # the axis holding the samples, e.g. 1 for a time-major (T, N, C) output


class TaskMetricConfig(StrictModel):
    """A user metric: ``function: "file.py:name"`` (file relative to the config), and whether higher is better."""

    function: Annotated[str, Field(pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$")]
    direction: Literal["minimize", "maximize"]


def output_keys_as_text(value: Any) -> Any:
    """YAML reads ``123:`` as the integer 123: an integer output name is taken as its text; other non-text keys
    (``1.5:``, ``yes:``, ``null:``) could have been written several ways, so they are refused with a hint to quote."""
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        elif not isinstance(key, str):
            raise ValueError(f"output name {key!r} is not text (YAML read it as {type(key).__name__}); quote it: '{key}':")
        out[key] = item
    return out


class ObjectiveConfig(StrictModel):
    """``error``: minimize (or maximize) ``metric``. ``fastest_within``: the highest device throughput among trials whose
    ``metric`` stays within ``budget``. ``pareto``: ``metric`` and device throughput together (a Pareto front)."""

    mode: Literal["error", "fastest_within", "pareto"] = "error"
    metric: str = "total.nmae"
    stage: Stage = "device"
    direction: Literal["minimize", "maximize"] | None = None  # default: the metric's natural direction
    budget: float | None = None  # fastest_within: the largest acceptable value of `metric`

    @model_validator(mode="after")
    def _budget_for_fastest(self) -> ObjectiveConfig:
        if self.mode == "fastest_within" and self.budget is None:
            raise ValueError("mode fastest_within needs a budget: the largest acceptable value of the metric")
        if self.mode != "fastest_within" and self.budget is not None:
            raise ValueError("budget applies to mode fastest_within only")
        return self


class ConstraintConfig(StrictModel):
    metric: str
    stage: Stage = "device"
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintConfig:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        return self


class SamplerConfig(StrictModel):
    """Optuna's sampler (see ``hailo_sweep.sweep.sampling``): TPE by default, with a start-up phase sized to the budget."""

    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = 0
    startup_trials: int | Literal["auto"] = "auto"  # TPE's random start-up trials; auto: a tenth of the budget, 3-10 (at most half the points)
    multivariate: bool = True  # TPE models the knobs jointly, by groups of knobs that occur together
    replace_repeats: bool = True  # a re-proposed evaluated point is free and an unevaluated one is enqueued instead

    @field_validator("startup_trials")
    @classmethod
    def _startup_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("startup_trials must be 1 or more, or 'auto'")
        return v


class StoresConfig(StrictModel):
    """Where results go. Unset values come from the environment, then from defaults under ``root``."""

    root: Path | None = None  # holds sweeps/ and mlruns/; default: the current directory
    optuna: str | None = None  # Optuna storage URL; env OPTUNA_STORAGE; default sqlite:///<root>/sweeps/optuna.db
    mlflow: str | None = None  # MLflow tracking URI; env MLFLOW_TRACKING_URI; default sqlite:///<root>/mlruns/mlflow.db


class WorkersConfig(StrictModel):
    """How workers share a study: Optuna heartbeats find trials whose worker died; each is retried ``max_retry`` times."""

    heartbeat_interval: int = Field(default=30, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(default=120, ge=2)  # a trial with no heartbeat for this long is stale: failed and retried
    max_retry: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> WorkersConfig:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError("grace_period must be longer than heartbeat_interval")
        return self


class TimeoutsConfig(StrictModel):
    """Per-stage time limits in seconds (unset: no limit). A stage past its limit fails its trial, not the worker."""

    optimize: float | None = Field(default=None, gt=0)
    emulate: float | None = Field(default=None, gt=0)
    compile: float | None = Field(default=None, gt=0)
    device: float | None = Field(default=None, gt=0)


class PruningConfig(StrictModel):
    """Stop hopeless trials after emulation, before the compile (Optuna's Wilcoxon pruner over per-sample errors)."""

    enabled: bool = False
    p_threshold: float = Field(default=0.1, gt=0, lt=1)  # prune when "worse than the best" is significant at this level
    groups: int = Field(default=30, ge=5)  # per-sample errors are reported as this many paired group means


class DiagnosticsConfig(StrictModel):
    """What each trial measures beyond its metrics, to explain where the error comes from."""

    # per-layer SNR of the quantized model: per_trial (every trial), best (the best few trials at the end of the sweep,
    # and on demand with `hailo-sweep diagnose`), off; true/false of earlier configs mean per_trial/off
    layer_noise: Literal["per_trial", "best", "off"] = "best"
    layer_noise_best: int = Field(default=3, ge=0)  # how many of the best trials get the analysis at the end (best)

    @field_validator("layer_noise", mode="before")
    @classmethod
    def _layer_noise_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # earlier configs: true ran it in every trial, false never
            return "per_trial" if v else "off"
        return v
    layer_noise_samples: int = Field(default=32, ge=1)
    # a trial's error-ladder and LSB-histogram plots: per_trial (drawn as each trial is recorded), best (the plots_best
    # best trials, drawn at the end of the sweep), off; every trial's report.json has the data, `diagnose` draws them
    plots: Literal["per_trial", "best", "off"] = "best"
    plots_best: int = Field(default=3, ge=0)  # how many of the best trials get their plots at the end (plots: best)
    determinism_samples: int = Field(default=16, ge=0)  # run this many inputs twice on the device; 0: skip
    lsb_tolerance: float = Field(default=1.0, ge=0)  # device vs emulation, in LSB of an 8-bit output (x256 for 16-bit)
    identical_min: float = Field(default=0.99, ge=0, le=1)  # share of bit-identical values expected of 8-bit outputs


class HailoConfig(StrictModel):
    """Options of the ``hailo`` backend only."""

    extra_model_script: list[str] = Field(default_factory=list)
    device_id: str | None = None
    start_node_names: list[str] | None = None
    end_node_names: list[str] | None = None
    net_name: str | None = None
    device_timeout_ms: int = Field(default=10000, gt=0)
    device_retries: int = Field(default=2, ge=0)  # further attempts of the device stage after a HailoRT timeout
