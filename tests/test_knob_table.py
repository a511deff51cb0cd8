"""The sweep summary on MLflow (top_trials.md, trials.csv) shows the algorithm knobs, like the console table."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution

from hailo_sweep.study_report import _trials_csv, summary_markdown, top_trials

BASE = {"optimization_level": 0, "compression_level": 0, "calibset_size": 64, "normalization_placement": "host", "output_16bit": "none", "noisy_layers_16bit": 0}


def _study(*points: tuple[dict, float]) -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    for params, value in points:
        dists = {k: CategoricalDistribution([v]) for k, v in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study


def test_the_summary_table_has_a_column_for_a_differing_algorithm_knob_and_says_the_constants(tmp_path: Path) -> None:
    study = _study(({**BASE, "equalization": "disabled", "bias_correction": "enabled"}, 0.1), ({**BASE, "equalization": "enabled", "bias_correction": "enabled"}, 0.2))
    note = summary_markdown(study, "1", top_trials(study), None)
    header = next(ln for ln in note.splitlines() if ln.startswith("| trial |"))
    assert "equalization" in header and "calibset_size" not in header
    rows = [ln for ln in note.splitlines() if ln.startswith("| 0 |") or ln.startswith("| 1 |")]
    assert "disabled" in rows[0] and "enabled" in rows[1]
    assert "`bias_correction` enabled" in note and "`calibset_size` 64" in note
    _trials_csv(study, tmp_path / "trials.csv")
    with (tmp_path / "trials.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["equalization"] for r in table] == ["disabled", "enabled"] and table[0]["bias_correction"] == "enabled"
