"""The search space: the config's knob declarations, turned into Optuna suggestions and typed ``Settings``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from hailo_sweep.config import IntKnob, IntRange, SearchSpaceConfig
from hailo_sweep.errors import UnsupportedSetting, UserInputError
from hailo_sweep.settings import ALGORITHM_KNOBS, Settings

BASE_KNOBS = ("optimization_level", "compression_level", "calibset_size", "normalization_placement", "output_16bit", "noisy_layers_16bit")
#: every knob a config may declare; the algorithm knobs are optional (absent = the optimization level's default)
KNOBS = BASE_KNOBS + tuple(ALGORITHM_KNOBS)
INT_KNOBS = ("optimization_level", "compression_level", "calibset_size", "noisy_layers_16bit")
MAX_GRID = 5000


def encode_16bit(outputs: tuple[str, ...], all_outputs: tuple[str, ...]) -> str:
    """Optuna-friendly categorical value for a set of 16-bit outputs."""
    if not outputs:
        return "none"
    if set(outputs) == set(all_outputs):
        return "all"
    return "+".join(sorted(outputs))


@dataclass(frozen=True)
class SearchSpace:
    config: SearchSpaceConfig
    output_names: tuple[str, ...]
    config_file: Path | None = None

    def __post_init__(self) -> None:
        for knob in INT_KNOBS:
            spec = getattr(self.config, knob)
            if isinstance(spec, IntRange) and spec.log and spec.low < 1:  # 0 * 2 never grows: choices() would hang
                raise UserInputError(
                    f"a log range needs low >= 1, got low={spec.low}", file=self.config_file, key=f"search.{knob}",
                    fix="start the range at 1 or more, or drop 'log: true'",
                )
        for choice in self.config.output_16bit:
            self.decode_16bit(self._encode_choice(choice))  # validates names early

    # -- output_16bit encoding -----------------------------------------------------------------------------
    def _encode_choice(self, choice: str | list[str]) -> str:
        if isinstance(choice, list):
            self._check_names(choice)
            return encode_16bit(tuple(choice), self.output_names)
        if choice in ("none", "all"):
            return choice
        self._check_names([choice])
        return encode_16bit((choice,), self.output_names)

    def _check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UserInputError(
                f"16-bit output {unknown[0]!r} is not an output of the model (outputs: {', '.join(self.output_names)})",
                file=self.config_file,
                key="search.output_16bit",
                fix="list 'none', 'all', an output name, or a list of output names",
            )

    def decode_16bit(self, value: str) -> tuple[str, ...]:
        if value == "none":
            return ()
        if value == "all":
            return tuple(sorted(self.output_names))
        names = value.split("+")
        self._check_names(names)
        return tuple(sorted(names))

    # -- choices -------------------------------------------------------------------------------------------
    def choices(self) -> dict[str, list[Any]]:
        """Every knob's values as a finite list (ranges expanded), for grids, baselines and pre-flight checks."""
        out: dict[str, list[Any]] = {}
        for knob in INT_KNOBS:
            out[knob] = _expand(getattr(self.config, knob))
        out["normalization_placement"] = list(dict.fromkeys(self.config.normalization_placement))
        out["output_16bit"] = list(dict.fromkeys(self._encode_choice(c) for c in self.config.output_16bit))
        for knob in self.algorithm_knobs():
            out[knob] = list(dict.fromkeys(getattr(self.config, knob)))
        return out

    def algorithm_knobs(self) -> tuple[str, ...]:
        """The algorithm knobs this config declares (the others stay at the optimization level's default)."""
        return tuple(k for k in ALGORITHM_KNOBS if getattr(self.config, k) is not None)

    def grid_size(self) -> int:
        size = 1
        for values in self.choices().values():
            size *= len(values)
        return size

    def all_settings(self) -> list[Settings]:
        choices = self.choices()
        if self.grid_size() > MAX_GRID:
            raise UserInputError(
                f"the search space has {self.grid_size()} points, too many for a grid", file=self.config_file, key="search",
                fix="use sampler tpe or random, or declare fewer choices",
            )
        knobs = list(choices)
        points = (self.settings_from_params(dict(zip(knobs, combo))) for combo in itertools.product(*(choices[k] for k in knobs)))
        # equivalent points (e.g. a clipping_percentile under minmax calibration) are one Settings: listed once
        return list(dict.fromkeys(points))

    def point_count(self) -> int:
        """Distinct points (canonical settings) of the space; for a space too large to enumerate, its grid size."""
        return len(self.all_settings()) if self.grid_size() <= MAX_GRID else self.grid_size()

    def canonical_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The params of the canonical point equal to ``params`` (points that differ only in a knob without effect
        under the others, such as ``clipping_percentile`` with ``calibration_method: minmax``, map to one)."""
        return self.params_of(self.settings_from_params(params))

    def max_calibset_size(self) -> int:
        return max(self.choices()["calibset_size"])

    # -- optuna --------------------------------------------------------------------------------------------
    def suggest(self, trial: optuna.Trial) -> Settings:
        params: dict[str, Any] = {}
        for knob in INT_KNOBS:
            spec: IntKnob = getattr(self.config, knob)
            if isinstance(spec, IntRange):
                params[knob] = trial.suggest_int(knob, spec.low, spec.high, step=spec.step, log=spec.log)
            else:
                params[knob] = trial.suggest_categorical(knob, list(dict.fromkeys(spec)))
        params["normalization_placement"] = trial.suggest_categorical(
            "normalization_placement", list(dict.fromkeys(self.config.normalization_placement))
        )
        params["output_16bit"] = trial.suggest_categorical("output_16bit", self.choices()["output_16bit"])
        for knob in self.algorithm_knobs():  # flat: every declared knob is suggested; Settings canonicalizes
            params[knob] = trial.suggest_categorical(knob, list(dict.fromkeys(getattr(self.config, knob))))
        return self.settings_from_params(params)

    def settings_from_params(self, params: dict[str, Any]) -> Settings:
        return Settings(
            optimization_level=int(params["optimization_level"]),
            compression_level=int(params["compression_level"]),
            calibset_size=int(params["calibset_size"]),
            normalization_placement=params["normalization_placement"],
            output_16bit=self.decode_16bit(str(params["output_16bit"])),
            noisy_layers_16bit=int(params.get("noisy_layers_16bit", 0)),
            **{k: params[k] for k in self.algorithm_knobs() if params.get(k) is not None},
        )

    def params_of(self, settings: Settings) -> dict[str, Any]:
        """Optuna params for ``settings`` (for enqueueing the baseline). A declared algorithm knob that the
        canonical ``settings`` leave unset (it has no effect there) takes its first choice: one value, always."""
        params: dict[str, Any] = {
            "optimization_level": settings.optimization_level,
            "compression_level": settings.compression_level,
            "calibset_size": settings.calibset_size,
            "normalization_placement": settings.normalization_placement,
            "output_16bit": encode_16bit(settings.output_16bit, self.output_names),
            "noisy_layers_16bit": settings.noisy_layers_16bit,
        }
        for knob in self.algorithm_knobs():
            value = getattr(settings, knob)
            params[knob] = value if value is not None else getattr(self.config, knob)[0]
        return params

    def project(self, settings: Settings) -> Settings:
        """The point of the space closest to ``settings`` (a backend's defaults may lie outside the user's choices)."""
        choices = self.choices()

        def nearest(knob: str, value: int) -> int:
            return min(choices[knob], key=lambda c: (abs(c - value), c))

        placement = settings.normalization_placement
        if placement not in choices["normalization_placement"]:
            placement = choices["normalization_placement"][0]
        out16 = encode_16bit(settings.output_16bit, self.output_names)
        if out16 not in choices["output_16bit"]:
            out16 = choices["output_16bit"][0]
        declared = self.algorithm_knobs()
        algorithm = {  # an undeclared knob stays at the level's default, as in every trial the sampler proposes
            knob: (None if knob not in declared else getattr(settings, knob) if getattr(settings, knob) in choices[knob] else choices[knob][0])
            for knob in ALGORITHM_KNOBS
        }
        return replace(
            settings,
            **algorithm,
            optimization_level=nearest("optimization_level", settings.optimization_level),
            compression_level=nearest("compression_level", settings.compression_level),
            calibset_size=nearest("calibset_size", settings.calibset_size),
            normalization_placement=placement,
            output_16bit=self.decode_16bit(out16),
            noisy_layers_16bit=nearest("noisy_layers_16bit", settings.noisy_layers_16bit),
        )

    def check_supported(self, baseline: Settings, validate: Any) -> None:
        """Refuse, before any trial runs, every declared knob value that the backend cannot honour."""
        for knob, values in self.choices().items():
            for value in values:
                params = self.params_of(baseline)
                params[knob] = value
                try:
                    validate(self.settings_from_params(params))
                except UnsupportedSetting as exc:
                    raise UnsupportedSetting(
                        f"{knob}={value!r}: {exc.problem}", file=self.config_file, key=f"search.{knob}", fix=exc.fix
                    ) from None


def _expand(spec: IntKnob) -> list[int]:
    if isinstance(spec, list):
        return list(dict.fromkeys(int(v) for v in spec))
    if spec.log:
        values, v = [], spec.low
        while v <= spec.high:
            values.append(v)
            v *= 2
        return values
    return list(range(spec.low, spec.high + 1, spec.step))
