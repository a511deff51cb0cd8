"""The algorithm knobs (KNOBS.md) in Settings, the config's search block and the search space.

Expected values are written out by hand from the declared knobs.
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import yaml
from pydantic import ValidationError

from hailo_sweep.config import SearchSpaceConfig
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.settings import Settings

optuna.logging.set_verbosity(optuna.logging.WARNING)
OUTPUTS = ("logits",)


def space(**knobs: Any) -> SearchSpace:
    return SearchSpace(config=SearchSpaceConfig(**knobs), output_names=OUTPUTS)


def test_absent_knobs_are_the_levels_default_and_stay_out_of_the_params() -> None:
    s = space(optimization_level=[0, 3])
    assert s.algorithm_knobs() == ()
    assert set(s.choices()) == {"optimization_level", "compression_level", "calibset_size", "normalization_placement", "output_16bit", "noisy_layers_16bit"}
    settings = s.all_settings()
    assert [p.optimization_level for p in settings] == [0, 3]
    assert all(p.calibration_method is None and p.equalization is None for p in settings)
    assert "calibration_method" not in settings[0].as_params()


def test_equivalent_points_are_one_canonical_point() -> None:
    s = space(calibration_method=["minmax", "percentile", "entropy"], clipping_percentile=[99.9, 99.99], clipping_scope=["all", "first"])
    assert s.grid_size() == 12  # the flat product, as Optuna's grid sees it
    points = s.all_settings()
    # minmax: percentile and scope have no effect (1 point); entropy: scope matters, percentile not (2); percentile: 4
    assert len(points) == 1 + 2 + 4
    minmax = [p for p in points if p.calibration_method == "minmax"]
    assert minmax == [Settings(2, 0, 64, "model", calibration_method="minmax")]
    a = s.settings_from_params({**s.params_of(points[0]), "calibration_method": "minmax", "clipping_percentile": 99.9})
    b = s.settings_from_params({**s.params_of(points[0]), "calibration_method": "minmax", "clipping_percentile": 99.99, "clipping_scope": "first"})
    assert a == b and hash(a) == hash(b)
    assert s.canonical_params(s.params_of(b)) == s.params_of(a)
    entropy = Settings(2, 0, 64, "model", calibration_method="entropy", clipping_percentile=99.9, clipping_scope="first")
    assert entropy.clipping_percentile is None and entropy.clipping_scope == "first"


def test_suggest_is_flat_and_round_trips_through_params() -> None:
    s = space(equalization=["enabled", "disabled"], bias_correction=["disabled"], calibration_method=["percentile"],
              clipping_percentile=[99.99], weights_granularity=["per_tensor"], all_16bit=["all"], finetune=["disabled"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    settings = s.suggest(trial)
    assert set(trial.params) >= {"equalization", "bias_correction", "calibration_method", "clipping_percentile", "weights_granularity", "all_16bit", "finetune"}
    assert settings.bias_correction == "disabled"
    assert settings.clipping_percentile == 99.99
    assert settings.weights_granularity == "per_tensor"
    assert s.settings_from_params(s.params_of(settings)) == settings
    assert Settings.from_params({k: str(v) for k, v in settings.as_params().items()}) == settings  # MLflow params are strings


def test_projection_puts_the_baseline_on_a_declared_choice() -> None:
    s = space(calibration_method=["percentile", "entropy"], clipping_percentile=[99.9])
    projected = s.project(Settings(0, 0, 64, "model"))
    assert projected.calibration_method == "percentile"
    assert projected.clipping_percentile == 99.9


@pytest.mark.parametrize("word", ["on", "off", "yes", "true"])
def test_yaml_booleans_are_refused_with_the_fix(word: str) -> None:
    raw = yaml.safe_load(f"equalization: [{word}]")
    with pytest.raises(ValidationError, match="write enabled/disabled"):
        SearchSpaceConfig(**raw)


@pytest.mark.parametrize(("knob", "value"), [("calibration_method", "kl"), ("clipping_percentile", 100.0), ("clipping_percentile", 40), ("clipping_scope", "last")])
def test_out_of_range_knob_values_are_refused(knob: str, value: object) -> None:
    with pytest.raises(ValidationError):
        SearchSpaceConfig(**{knob: [value]})
    with pytest.raises(ValueError):
        Settings(0, 0, 64, "host", **{knob: value})  # type: ignore[arg-type]


def test_check_supported_names_the_refused_knob_value() -> None:
    s = space(finetune=["disabled", "enabled"])

    def validate(settings: Settings) -> None:
        if settings.finetune == "enabled":
            raise UnsupportedSetting("no fine-tuning here")

    with pytest.raises(UnsupportedSetting) as info:
        s.check_supported(Settings(0, 0, 64, "model"), validate)
    assert info.value.key == "search.finetune"
    assert "finetune='enabled'" in str(info.value)


def test_the_embedded_baseline_stays_plain_minmax_when_the_search_declares_other_statistics_first(tmp_path) -> None:
    from hailo_sweep.backends.base import BackendContext
    from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
    from hailo_sweep.model_io import read_model_io
    from tests.test_layer_noise import DOMAIN, MODEL, NORM

    backend = OnnxRuntimeBackend(BackendContext(MODEL, "hailo8l", tmp_path, read_model_io(MODEL), NORM, DOMAIN))
    s = space(calibration_method=["percentile", "entropy", "minmax"], equalization=["enabled", "disabled"],
              bias_correction=["enabled", "disabled"], weights_granularity=["per_tensor", "per_channel"])
    baseline = s.project(backend.default_settings(s.max_calibset_size(), ()))
    # quantize_static's defaults, not each knob's first declared choice
    assert (baseline.calibration_method, baseline.equalization, baseline.bias_correction, baseline.weights_granularity) == (
        "minmax", "disabled", "disabled", "per_channel")
    assert baseline.all_16bit is None, "a knob the search leaves alone stays at the level's default, as in every proposed trial"
    backend.validate(baseline)
