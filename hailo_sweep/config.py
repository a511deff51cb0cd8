"""Sweep configuration: the YAML file a user writes, validated by pydantic (unknown keys refused).

``load_config(path)`` returns a ``SweepConfig`` with every path made absolute (relative paths are relative to the
config file). Every problem becomes a ``UserInputError`` naming the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import errno
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from hailo_sweep.cluster.config import ClusterConfig
from hailo_sweep.config_sections import (
    TARGETS,
    BackendName,
    ConstraintConfig,
    DataConfig,
    DiagnosticsConfig,
    HailoConfig,
    IntKnob,
    IntRange,
    NormalizationConfig,
    ObjectiveConfig,
    OutputConfig,
    PruningConfig,
    SamplerConfig,
    SearchSpaceConfig,
    Stage,
    StoresConfig,
    Target,
    TaskMetricConfig,
    TimeoutsConfig,
    StrictModel,
    WorkersConfig,
    output_keys_as_text,
)
from hailo_sweep.errors import UserInputError

__all__ = [
    "TARGETS", "BackendName", "ClusterConfig", "ConstraintConfig", "DataConfig", "DiagnosticsConfig", "HailoConfig",
    "IntKnob", "IntRange", "NormalizationConfig", "ObjectiveConfig", "OutputConfig", "PruningConfig", "SamplerConfig",
    "SearchSpaceConfig", "Stage", "StoresConfig", "SweepConfig", "Target", "TaskMetricConfig", "TimeoutsConfig",
    "WorkersConfig", "check_file", "load_config",
]


class SweepConfig(StrictModel):
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

    _outputs_as_text = field_validator("outputs", mode="before")(output_keys_as_text)

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
            fix=f"write a starter config from the model first: hailo-sweep new {shlex.quote(str(path))} -o {shlex.quote(path.stem + '.yaml')} (add --calibration and --evaluation with your data), then pass the .yaml",
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


MODEL_FILE_FIX = "point 'model' at an existing .onnx file"
DATA_FILE_FIX = "point it at an existing .npy or .npz file"


def check_input_files(config: SweepConfig) -> None:
    """The model and the data files exist. The commands call this right after loading the config, before their heavy
    imports, so that a wrong path is refused at once; the contents are checked where the files are read."""
    check_file(config.model, what="model file", fix=MODEL_FILE_FIX, config_file=config.source, key="model")
    for role in ("calibration", "evaluation"):
        check_file(getattr(config.data, role), what="data file", fix=DATA_FILE_FIX, config_file=config.source, key=f"data.{role}")


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
