"""The sampler setup: start-up sized to the budget and the space, TPE options, and re-proposals replaced by points
that no trial has taken."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from hailo_sweep.config import DiagnosticsConfig, SamplerConfig, SearchSpaceConfig, load_config
from hailo_sweep.sweep.sampling import make_sampler, next_unevaluated, point_key, startup_trials
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.sweep import Sweep, budget_used
from tests.test_sweep_api import open_stores


@pytest.mark.parametrize(("budget", "points", "expected"), [(30, 1000, 3), (5, 1000, 3), (48, 1000, 5), (100, 1000, 10), (300, 1000, 10), (30, 4, 2), (20, None, 3)])
def test_startup_phase_is_sized_to_the_budget_and_the_space(budget: int, points: int | None, expected: int) -> None:
    assert startup_trials(budget, points) == expected


def test_tpe_models_the_knobs_jointly_with_the_sized_start_up() -> None:
    sampler = make_sampler(SamplerConfig(), budget=30, points=500, choices={}, seed=3)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._n_startup_trials == 3 and sampler._multivariate and sampler._group  # noqa: SLF001 (no public getter)
    fixed = make_sampler(SamplerConfig(startup_trials=2, multivariate=False), budget=30, points=500, choices={}, seed=3)
    assert fixed._n_startup_trials == 2 and not fixed._multivariate  # noqa: SLF001
    assert isinstance(make_sampler(SamplerConfig(name="random"), budget=30, points=5, choices={}, seed=0), optuna.samplers.RandomSampler)


def test_startup_trials_must_be_positive_or_auto() -> None:
    with pytest.raises(ValueError, match="startup_trials"):
        SamplerConfig(startup_trials=0)


def test_layer_noise_keeps_the_booleans_of_earlier_configs() -> None:
    assert DiagnosticsConfig().layer_noise == "best"
    assert DiagnosticsConfig(layer_noise=True).layer_noise == "per_trial"
    assert DiagnosticsConfig(layer_noise=False).layer_noise == "off"


def _study_with(points: list[dict[str, object]], waiting: list[dict[str, object]] = ()) -> optuna.Study:  # type: ignore[assignment]
    study = optuna.create_study()
    for p in points:
        study.add_trial(optuna.trial.create_trial(params=p, distributions={k: optuna.distributions.CategoricalDistribution([p[k]]) for k in p}, value=0.0))
    for p in waiting:
        study.enqueue_trial(p)
    return study


def test_next_unevaluated_never_returns_a_taken_or_waiting_point() -> None:
    choices = {"a": [1, 2, 3], "b": ["x", "y"]}
    done = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "x"}]
    study = _study_with(done, waiting=[{"a": 1, "b": "y"}])
    seen = {point_key(next_unevaluated(study.get_trials(), choices, random.Random(seed))) for seed in range(20)}  # type: ignore[arg-type]
    assert seen <= {point_key({"a": 2, "b": "x"}), point_key({"a": 3, "b": "y"})} and len(seen) == 2
    full = _study_with(done + [{"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 3, "b": "y"}])
    assert next_unevaluated(full.get_trials(), choices, random.Random(0)) is None


def test_a_trial_stopped_while_being_suggested_takes_no_point() -> None:
    """An interrupted trial can hold part of a point (its first knobs only): it is not a point, and the canonical form
    (which needs every knob) is never asked for it."""
    space = SearchSpace(SearchSpaceConfig(optimization_level=[0, 1], calibset_size=[16]), ("featmap", "logits"))
    whole = space.params_of(space.all_settings()[0])
    study = _study_with([whole, {"optimization_level": 1}])
    left = next_unevaluated(study.get_trials(), space.choices(), random.Random(0), canonical=space.canonical_params)
    assert left is not None and left["optimization_level"] != whole["optimization_level"]


def test_next_unevaluated_treats_equivalent_params_as_one_point() -> None:
    space = SearchSpace(
        SearchSpaceConfig(optimization_level=[0], calibration_method=["minmax", "percentile"], clipping_percentile=[99.9, 99.99]),
        ("featmap", "logits"),
    )
    assert space.grid_size() == 4 and space.point_count() == 3  # the percentile has no effect under minmax
    taken = [space.params_of(s) for s in space.all_settings() if s.calibration_method != "percentile" or s.clipping_percentile == 99.9]
    study = _study_with(taken)
    left = next_unevaluated(study.get_trials(), space.choices(), random.Random(0), canonical=space.canonical_params)
    assert left is not None and space.settings_from_params(left).clipping_percentile == 99.99
    done = _study_with(taken + [left])
    assert next_unevaluated(done.get_trials(), space.choices(), random.Random(0), canonical=space.canonical_params) is None


def test_a_re_proposed_point_is_free_and_an_unevaluated_one_runs_instead(write_config) -> None:
    search = {"optimization_level": [0], "compression_level": [0], "calibset_size": [64, 128, 256], "normalization_placement": ["host"], "output_16bit": ["none"]}
    path = write_config(trials=1, search=search, diagnostics={"layer_noise": "off"})
    Sweep(load_config(path)).run()
    study, _ = open_stores(path)
    first = study.trials[0]
    study.enqueue_trial(dict(first.params))  # a sampler that re-proposes the finished point
    Sweep(load_config(path)).run(n_trials=3)
    study, _ = open_stores(path)
    trials = study.get_trials(deepcopy=False)
    repeat = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert repeat and repeat[0].user_attrs["duplicate_of"] == first.number  # TPE may repeat itself too: each is free
    replacements = [t for t in trials if t.user_attrs.get("replaces_repeat_of") == first.number]
    assert len(replacements) == 1 and replacements[0].state == TrialState.COMPLETE
    evaluated = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert sorted(t.params["calibset_size"] for t in evaluated) == [64, 128, 256]  # every point once, none twice
    assert budget_used(study, count_running=False) == 3
