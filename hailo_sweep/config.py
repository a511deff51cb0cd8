"""Sweep configuration: the YAML file a user writes, validated by pydantic (unknown keys refused).

``load_config(path)`` returns a ``SweepConfig`` with every path made absolute (relative paths are relative to the
config file). Every problem becomes a ``UserInputError`` naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import errno
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hailo_sweep.cluster.config import ClusterConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.settings import COMPRESSION_LEVELS, OPTIMIZATION_LEVELS

Target = Literal["hailo8", "hailo8l", "hailo10h"]
TARGETS: tuple[str, ...] = ("hailo8", "hailo8l", "hailo10h")
BackendName = Literal["auto", "hailo", "onnxruntime"]
Stage = Literal["device", "emulated"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntRange(_Strict):
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


class SearchSpaceConfig(_Strict):
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


class DataConfig(_Strict):
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


class NormalizationConfig(_Strict):
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


class OutputConfig(_Strict):
    weight: float = Field(default=1.0, ge=0.0)
    # logits: class scores (softmax applied for the probability error); probabilities: already softmax
    kind: Literal["tensor", "logits", "probabilities"] = "tensor"
    batch_axis: int = Field(default=0, ge=0)  # the axis holding the samples, e.g. 1 for a time-major (T, N, C) output


class TaskMetricConfig(_Strict):
    """A user metric: ``function: "file.py:name"`` (file relative to the config), and whether higher is better."""

    function: Annotated[str, Field(pattern=r"^[^:]+\.py:[A-Za-z_][A-Za-z0-9_]*$")]
    direction: Literal["minimize", "maximize"]


def _output_keys_as_text(value: Any) -> Any:
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


class ObjectiveConfig(_Strict):
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


class ConstraintConfig(_Strict):
    metric: str
    stage: Stage = "device"
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintConfig:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        return self


class SamplerConfig(_Strict):
    """Optuna's sampler (see ``hailo_sweep.sweep.sampling``): TPE by default, with a start-up phase sized to the budget."""

    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int | None = 0
    startup_trials: int | Literal["auto"] = "auto"  # TPE's random start-up trials; auto: a fifth of the budget, 3-10
    multivariate: bool = True  # TPE models the knobs jointly, by groups of knobs that occur together
    replace_repeats: bool = True  # a re-proposed evaluated point is free and an unevaluated one is enqueued instead

    @field_validator("startup_trials")
    @classmethod
    def _startup_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("startup_trials must be 1 or more, or 'auto'")
        return v


class StoresConfig(_Strict):
    """Where results go. Unset values come from the environment, then from defaults under ``root``."""

    root: Path | None = None  # holds sweeps/ and mlruns/; default: the current directory
    optuna: str | None = None  # Optuna storage URL; env OPTUNA_STORAGE; default sqlite:///<root>/sweeps/optuna.db
    mlflow: str | None = None  # MLflow tracking URI; env MLFLOW_TRACKING_URI; default sqlite:///<root>/mlruns/mlflow.db


class WorkersConfig(_Strict):
    """How workers share a study: Optuna heartbeats find trials whose worker died; each is retried ``max_retry`` times."""

    heartbeat_interval: int = Field(default=30, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(default=120, ge=2)  # a trial with no heartbeat for this long is stale: failed and retried
    max_retry: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> WorkersConfig:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError("grace_period must be longer than heartbeat_interval")
        return self


class TimeoutsConfig(_Strict):
    """Per-stage time limits in seconds (unset: no limit). A stage past its limit fails its trial, not the worker."""

    optimize: float | None = Field(default=None, gt=0)
    emulate: float | None = Field(default=None, gt=0)
    compile: float | None = Field(default=None, gt=0)
    device: float | None = Field(default=None, gt=0)


class PruningConfig(_Strict):
    """Stop hopeless trials after emulation, before the compile (Optuna's Wilcoxon pruner over per-sample errors)."""

    enabled: bool = False
    p_threshold: float = Field(default=0.1, gt=0, lt=1)  # prune when "worse than the best" is significant at this level
    groups: int = Field(default=30, ge=5)  # per-sample errors are reported as this many paired group means


class DiagnosticsConfig(_Strict):
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
    determinism_samples: int = Field(default=16, ge=0)  # run this many inputs twice on the device; 0: skip
    lsb_tolerance: float = Field(default=1.0, ge=0)  # device vs emulation, in LSB of an 8-bit output (x256 for 16-bit)
    identical_min: float = Field(default=0.99, ge=0, le=1)  # share of bit-identical values expected of 8-bit outputs


class HailoConfig(_Strict):
    """Options of the ``hailo`` backend only."""

    extra_model_script: list[str] = Field(default_factory=list)
    device_id: str | None = None
    start_node_names: list[str] | None = None
    end_node_names: list[str] | None = None
    net_name: str | None = None
    device_timeout_ms: int = Field(default=10000, gt=0)
    device_retries: int = Field(default=2, ge=0)  # further attempts of the device stage after a HailoRT timeout


class SweepConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")]
    model: Path
    target: Target
    backend: BackendName = "auto"
    data: DataConfig
    normalization: NormalizationConfig | None = None
    outputs: dict[str, OutputConfig] = Field(default_factory=dict)
    metrics: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], TaskMetricConfig] = Field(default_factory=dict)
    search: SearchSpaceConfig = Field(default_factory=SearchSpaceConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    constraints: list[ConstraintConfig] = Field(default_factory=list)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    trials: int = Field(default=20, ge=1)
    stores: StoresConfig = Field(default_factory=StoresConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    hailo: HailoConfig = Field(default_factory=HailoConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    # set by load_config, not by the user
    source: Path | None = Field(default=None, exclude=True)

    _outputs_as_text = field_validator("outputs", mode="before")(_output_keys_as_text)

    @model_validator(mode="after")
    def _placement_needs_normalization(self) -> SweepConfig:
        if "model" in self.search.normalization_placement and self.normalization is None:
            raise ValueError(
                "search.normalization_placement includes 'model' but no normalization (mean/std) is configured"
            )
        return self


# --------------------------------------------------------------------------------------------------------------
def load_config(path: str | Path) -> SweepConfig:
    """Read, validate and resolve a sweep config. Raises ``UserInputError`` on any problem."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".onnx":
        raise UserInputError(
            "this is an ONNX model, not a sweep config",
            file=path,
            fix=f"write a starter config from the model first: hailo-sweep new {path.name} -o {path.stem}.yaml, then pass the .yaml",
        )
    path = check_file(path, what="config file", fix="pass the path of an existing YAML sweep config")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # safe_load semantics, see the loader
    except DuplicateKey as exc:
        raise UserInputError(
            f"key {exc.key!r} appears twice in one mapping (line {exc.first_line} and line {exc.second_line}); YAML would silently keep the last",
            file=path, key=exc.key, fix=f"keep one '{exc.key}' (line {exc.first_line} or {exc.second_line}) and delete the other",
        ) from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"not valid YAML: {exc}", file=path, fix="fix the YAML syntax") from exc
    if not isinstance(raw, dict):
        raise UserInputError("the config must be a YAML mapping at the top level", file=path)
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise _validation_error(exc, path, raw) from None
    base = path.parent
    data = config.data.model_copy(
        update={"calibration": _abs(base, config.data.calibration), "evaluation": _abs(base, config.data.evaluation)}
    )
    stores = config.stores
    if stores.root is not None:
        stores = stores.model_copy(update={"root": _abs(base, stores.root)})
    return config.model_copy(update={"model": _abs(base, config.model), "data": data, "stores": stores, "source": path})


def _abs(base: Path, p: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute():
        return p
    try:
        return (base / p).resolve()
    except RuntimeError:  # a symlink loop: refused with the config key where the file is opened (check_file)
        return base / p


def _resolve(path: Path, shown: Path | str) -> Path:
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13: a symlink loop; never a file
        raise UserInputError(f"{shown} is a symlink loop (it points back to itself)", file=path, fix="point the symlink at a real file") from None


class DuplicateKey(yaml.MarkedYAMLError):
    def __init__(self, key: str, first_line: int, second_line: int, mark: yaml.Mark):
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=mark)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (so ``safe_load`` semantics: no Python tags) that refuses a key given twice in one mapping,
    where plain YAML keeps the last value silently (``trials: 50`` then ``trials: 1`` ran one trial)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise DuplicateKey(str(key), first + 1, key_node.start_mark.line + 1, key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def check_file(path: Path, *, what: str, fix: str, config_file: Path | None = None, key: str | None = None) -> Path:
    """The resolved path of an existing regular file; a missing file, a directory or a symlink loop is refused by name."""
    shown = path
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as exc:
            loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP
            problem = f"{what} {shown} is a symlink loop (it points back to itself)" if loop else f"{what} {shown} is a broken symlink"
            raise UserInputError(problem, file=config_file or shown, key=key, fix=fix) from None
    resolved = _resolve(path, shown)
    if resolved.is_dir():
        raise UserInputError(f"{what} {shown} is a directory, not a file", file=config_file or shown, key=key, fix=fix)
    if not resolved.is_file():
        raise UserInputError(f"{what} not found: {shown}", file=config_file or shown, key=key, fix=fix)
    return resolved


def _validation_error(exc: ValidationError, path: Path, raw: dict[str, Any]) -> UserInputError:
    lines: list[str] = []
    fixes: list[str] = []
    first_key = None
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        first_key = first_key or key
        if err["type"] == "extra_forbidden":
            known = _known_keys(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(sorted(known))}"
            lines.append(f"{key}: unknown key ({hint})")
            fixes.append(f"rename or remove '{key}'")
        elif err["type"] == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            given = err.get("input")
            options = [o.strip(" '") for o in str(expected).replace(" or ", ",").split(",") if o.strip()]
            close = difflib.get_close_matches(str(given), options, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{key}: {given!r} is not one of {expected}{hint}")
            fixes.append(f"set '{key}' to one of {expected}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing")
            fixes.append(f"add '{key}'")
        else:
            lines.append(f"{key}: {err['msg']}")
    fix = "; ".join(dict.fromkeys(fixes)) or "correct the values listed above"
    problem = "invalid config:\n  " + "\n  ".join(lines)
    return UserInputError(problem, file=path, key=first_key, fix=fix)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``loc`` (a pydantic error location without its last element)."""
    model: type[BaseModel] = SweepConfig
    in_mapping = False  # the next part is a user-chosen mapping key (e.g. an output name)
    for part in loc:
        if isinstance(part, int) or in_mapping:
            in_mapping = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        candidate = _model_in(field.annotation)
        if candidate is None:
            return []
        in_mapping = getattr(field.annotation, "__origin__", None) is dict
        model = candidate
    return [name for name in model.model_fields if name != "source"]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
