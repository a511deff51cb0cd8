"""Tests for the search space: choice expansion, 16-bit output encoding, Optuna suggestions, projection of a
backend's defaults, pre-flight support checks, and validation of the ``search`` block of the config.

Expected values are written out by hand from the declared knobs; nothing here is copied from the code's output.
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna
import pytest
from optuna.samplers import GridSampler, RandomSampler
from pydantic import ValidationError

from hailo_sweep.config import IntRange, SearchSpaceConfig
from hailo_sweep.errors import UnsupportedSetting, UserInputError
from hailo_sweep.search_space import SearchSpace, encode_16bit
from hailo_sweep.settings import Settings

OUTPUTS = ("logits", "featmap")  # deliberately not sorted: "all" must come back sorted
THREE = ("c", "a", "b")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space(outputs: tuple[str, ...] = OUTPUTS, **knobs: Any) -> SearchSpace:
    return SearchSpace(config=SearchSpaceConfig(**knobs), output_names=outputs)


# -------------------------------------------------------------------------------------------------------------
# choices, grid
# -------------------------------------------------------------------------------------------------------------


def test_choices_expand_lists_and_ranges_without_duplicates() -> None:
    s = space(
        optimization_level=[2, 0, 2, 1, 0],
        compression_level=IntRange(low=0, high=4, step=2),
        calibset_size=IntRange(low=64, high=1000, log=True),
        normalization_placement=["model", "host", "model"],
        output_16bit=["none", "logits", "none", ["logits"]],
    )
    choices = s.choices()
    assert choices["optimization_level"] == [2, 0, 1]  # declared order kept, repeats dropped
    assert choices["compression_level"] == [0, 2, 4]
    assert choices["calibset_size"] == [64, 128, 256, 512]  # doubling from low, never above high
    assert choices["normalization_placement"] == ["model", "host"]
    assert choices["output_16bit"] == ["none", "logits"]  # "logits" and ["logits"] are the same choice
    assert s.grid_size() == 3 * 3 * 4 * 2 * 2
    assert s.max_calibset_size() == 512


def test_step_range_stops_at_the_last_step_not_above_high() -> None:
    s = space(calibset_size=IntRange(low=100, high=350, step=100))
    assert s.choices()["calibset_size"] == [100, 200, 300]


def test_single_value_range_has_one_choice() -> None:
    s = space(optimization_level=IntRange(low=3, high=3))
    assert s.choices()["optimization_level"] == [3]


def test_log_range_starting_at_zero_is_refused_instead_of_hanging() -> None:
    # 0 * 2 == 0: expanding such a range by doubling would never end (and Optuna refuses log ranges with low < 1)
    with pytest.raises(UserInputError) as info:
        space(optimization_level=IntRange(low=0, high=4, log=True))
    assert info.value.key == "search.optimization_level"
    assert "low=0" in info.value.problem


def test_all_settings_is_the_full_product() -> None:
    s = space(
        optimization_level=[0, 1],
        compression_level=[0],
        calibset_size=IntRange(low=64, high=128, step=64),
        normalization_placement=["host", "model"],
        output_16bit=["none", "all"],
    )
    got = s.all_settings()
    expected = {
        Settings(opt, 0, calib, placement, out16)
        for opt, calib, placement, out16 in itertools.product(
            [0, 1], [64, 128], ["host", "model"], [(), ("featmap", "logits")]
        )
    }
    assert len(got) == s.grid_size() == 16
    assert all(isinstance(x, Settings) for x in got)
    assert set(got) == expected


# -------------------------------------------------------------------------------------------------------------
# output_16bit encoding
# -------------------------------------------------------------------------------------------------------------


def test_output_16bit_keywords_and_names() -> None:
    s = space(output_16bit=["none", "all", "logits"])
    assert s.choices()["output_16bit"] == ["none", "all", "logits"]
    assert s.decode_16bit("none") == ()
    assert s.decode_16bit("all") == ("featmap", "logits")
    assert s.decode_16bit("logits") == ("logits",)


def test_output_16bit_list_round_trips_through_plus_encoding() -> None:
    s = space(outputs=THREE, output_16bit=[["c", "a"], ["b"], ["a", "b", "c"]])
    assert s.choices()["output_16bit"] == ["a+c", "b", "all"]  # the full list is the same choice as "all"
    assert s.decode_16bit("a+c") == ("a", "c")
    assert encode_16bit(s.decode_16bit("a+c"), THREE) == "a+c"
    assert encode_16bit(("c", "a"), THREE) == "a+c"  # order does not matter
    assert encode_16bit((), THREE) == "none"
    assert encode_16bit(("b", "c", "a"), THREE) == "all"


@pytest.mark.parametrize("choice", ["logit", ["featmap", "nope"]])
def test_unknown_16bit_output_is_a_user_input_error(choice: Any) -> None:
    with pytest.raises(UserInputError) as info:
        space(output_16bit=["none", choice])
    assert info.value.key == "search.output_16bit"
    assert "featmap" in info.value.problem and "logits" in info.value.problem  # names the real outputs


def test_decoding_an_unknown_name_is_refused() -> None:
    with pytest.raises(UserInputError) as info:
        space().decode_16bit("featmap+bogus")
    assert info.value.key == "search.output_16bit"
    assert "bogus" in info.value.problem


# -------------------------------------------------------------------------------------------------------------
# Optuna
# -------------------------------------------------------------------------------------------------------------


def test_suggest_with_random_sampler_stays_within_the_declared_choices() -> None:
    s = space(
        optimization_level=[0, 2, 3],
        compression_level=IntRange(low=0, high=4, step=2),
        calibset_size=IntRange(low=64, high=1024, log=True),
        normalization_placement=["host", "model"],
        output_16bit=["none", "logits", "all"],
    )
    study = optuna.create_study(sampler=RandomSampler(seed=7))
    seen: dict[str, set[Any]] = {k: set() for k in ("opt", "comp", "placement", "out16")}
    for _ in range(60):
        trial = study.ask()
        settings = s.suggest(trial)
        assert isinstance(settings, Settings)
        assert settings.optimization_level in (0, 2, 3)
        assert settings.compression_level in (0, 2, 4)
        assert 64 <= settings.calibset_size <= 1024
        assert settings.normalization_placement in ("host", "model")
        assert settings.output_16bit in ((), ("logits",), ("featmap", "logits"))
        # what Optuna recorded decodes to the same settings
        assert s.settings_from_params(trial.params) == settings
        seen["opt"].add(settings.optimization_level)
        seen["comp"].add(settings.compression_level)
        seen["placement"].add(settings.normalization_placement)
        seen["out16"].add(settings.output_16bit)
        study.tell(trial, 0.0)
    # 60 random draws over at most 3 values each cover every value (a constant suggestion would fail)
    assert {k: len(v) for k, v in seen.items()} == {"opt": 3, "comp": 3, "placement": 2, "out16": 3}


def test_grid_sampler_visits_every_point_exactly_once() -> None:
    s = space(
        optimization_level=[0, 1, 1],
        compression_level=IntRange(low=0, high=2, step=2),
        calibset_size=IntRange(low=64, high=256, log=True),
        normalization_placement=["host", "model"],
        output_16bit=["none", "logits"],
    )
    assert s.grid_size() == 2 * 2 * 3 * 2 * 2
    visited: list[Settings] = []

    def objective(trial: optuna.Trial) -> float:
        visited.append(s.suggest(trial))
        return 0.0

    study = optuna.create_study(sampler=GridSampler(s.choices(), seed=0))
    study.optimize(objective, n_trials=s.grid_size())
    assert len(visited) == s.grid_size()
    assert len(set(visited)) == len(visited)
    assert set(visited) == set(s.all_settings())


def test_params_of_round_trips_through_settings_from_params() -> None:
    s = space(outputs=THREE, output_16bit=["none", ["a", "b"], "all"])
    for settings in (Settings(1, 2, 64, "model", ("a", "b")), Settings(0, 0, 8, "host", ("a", "b", "c"))):
        params = s.params_of(settings)
        assert s.settings_from_params(params) == settings
    assert s.params_of(Settings(1, 2, 64, "model", ("b", "a")))["output_16bit"] == "a+b"


# -------------------------------------------------------------------------------------------------------------
# project, check_supported
# -------------------------------------------------------------------------------------------------------------


def test_project_maps_to_the_nearest_declared_value_ties_to_the_smaller() -> None:
    s = space(
        optimization_level=[1, 3],
        compression_level=[1, 4],
        calibset_size=IntRange(low=64, high=256, step=64),
        normalization_placement=["model"],
        output_16bit=["logits", "all"],
    )
    default = Settings(optimization_level=2, compression_level=0, calibset_size=100, normalization_placement="host")
    projected = s.project(default)
    assert projected.optimization_level == 1  # 2 is equally far from 1 and 3: the smaller wins
    assert projected.compression_level == 1
    assert projected.calibset_size == 128  # |100-128| = 28 < |100-64| = 36
    assert projected.normalization_placement == "model"  # "host" not declared: first declared choice
    assert projected.output_16bit == ("logits",)  # none not declared: first declared choice


def test_project_keeps_a_point_that_is_already_in_the_space() -> None:
    s = space(optimization_level=[0, 2], calibset_size=[64, 256], normalization_placement=["host", "model"])
    inside = Settings(2, 0, 256, "model", ())
    assert s.project(inside) == inside


def _refuse_level_4(settings: Settings) -> None:
    if settings.optimization_level == 4:
        raise UnsupportedSetting("level 4 needs AdaRound", fix="drop 4")


def test_check_supported_names_the_knob_and_value() -> None:
    baseline = Settings(0, 0, 64, "host")
    with pytest.raises(UnsupportedSetting) as info:
        space(optimization_level=IntRange(low=2, high=4)).check_supported(baseline, _refuse_level_4)
    assert info.value.key == "search.optimization_level"
    assert "optimization_level=4" in info.value.problem
    assert info.value.fix == "drop 4"


def test_check_supported_passes_and_tries_every_declared_value() -> None:
    tried: list[Settings] = []

    def record(settings: Settings) -> None:
        tried.append(settings)
        _refuse_level_4(settings)

    s = space(optimization_level=[0, 3], compression_level=[0, 1], normalization_placement=["host", "model"])
    s.check_supported(Settings(0, 0, 64, "host"), record)
    assert {t.optimization_level for t in tried} == {0, 3}
    assert {t.compression_level for t in tried} == {0, 1}
    assert {t.normalization_placement for t in tried} == {"host", "model"}


# -------------------------------------------------------------------------------------------------------------
# config validation
# -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"optimization_level": [0, 5]}, "optimization_level must be within 0-4"),
        ({"optimization_level": {"low": 0, "high": 5}}, "optimization_level must be within 0-4"),
        ({"compression_level": [6]}, "compression_level must be within 0-5"),
        ({"calibset_size": {"low": 256, "high": 64}}, "low \\(256\\) must be <= high \\(64\\)"),
        ({"calibset_size": {"low": 64, "high": 256, "step": 64, "log": True}}, "log ranges take no step"),
        ({"calibset_size": [0, 64]}, "calibset_size values must be >= 1"),
        ({"optimization_level": []}, "needs at least one choice"),
        ({"output_16bit": []}, "needs at least one choice"),
        ({"normalization_placement": []}, "needs at least one choice"),
        ({"normalization_placement": ["device"]}, "host"),
        ({"optimisation_level": [1]}, "Extra inputs are not permitted"),
    ],
)
def test_search_config_rejects_bad_knobs(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SearchSpaceConfig.model_validate(knobs)


def test_search_config_accepts_the_edges() -> None:
    cfg = SearchSpaceConfig.model_validate(
        {"optimization_level": {"low": 0, "high": 4}, "compression_level": [0, 5], "calibset_size": [1]}
    )
    assert SearchSpace(cfg, OUTPUTS).choices()["optimization_level"] == [0, 1, 2, 3, 4]
