"""Per-layer noise analysis for the best few trials, once, at the end of a sweep (``diagnostics.layer_noise: best``).

The analysis explains a result; it does not change any metric the sampler sees. Running it in every trial cost more
than the trial itself on real models (16-61 s per trial), so by default it runs here, for the ``layer_noise_best``
best trials, and on demand with ``hailo-sweep diagnose --trial N``. The trial's settings are optimized again (the
optimization is deterministic for a given calibration set; its scratch was removed when the trial ended), the table,
the plot and the ``layer_noise.worst*_snr_db`` metrics go to the trial's MLflow run. Trials already analysed are listed
in the study's user attr ``layer_noise_done``, so a resumed sweep or a second worker does not analyse them again.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hailo_sweep.backends.base import Backend, LayerNoise
from hailo_sweep.data import feed
from hailo_sweep.diagnose import plots as diag_plots
from hailo_sweep.pipeline import Prepared
from hailo_sweep.sweep.recording import ArtifactUploader
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.tracking import RunRecord, Tracker

DONE_ATTR = "layer_noise_done"


def best_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best evaluated trials on the first objective, feasible ones first (reused duplicates excluded)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values and "duplicate_of" not in t.user_attrs]
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0

    def infeasible(t: FrozenTrial) -> bool:
        return any(v > 0 for v in (t.constraints or {}).values())

    return sorted(done, key=lambda t: (infeasible(t), sign * t.values[0], t.number))[:k]


def analyse_best(
    study: optuna.Study,
    prepared: Prepared,
    backend: Backend,
    space: SearchSpace,
    uploader: ArtifactUploader,
    *,
    k: int,
    samples: int,
    message: Callable[[str], None],
    lock: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> list[int]:
    """Run the per-layer noise analysis for the best ``k`` trials not analysed yet; returns their numbers.

    The trials are claimed under ``lock`` (the storage's lock) before the work starts, so workers that finish
    together do not analyse the same trial twice."""
    with lock():
        done = set(study.user_attrs.get(DONE_ATTR, []))
        todo = [t for t in best_trials(study, k) if t.number not in done and t.user_attrs.get("mlflow_run_id")]
        study.set_user_attr(DONE_ATTR, sorted(done | {t.number for t in todo}))
    analysed: list[int] = []
    cfg = prepared.config
    ds = prepared.dataset
    for t in todo:
        settings = space.settings_from_params(dict(t.params))
        calib = feed(ds.calibration[: settings.calibset_size], settings.normalization_placement, prepared.normalization, cfg.data.domain)
        evaluation = feed(ds.evaluation[:samples], settings.normalization_placement, prepared.normalization, cfg.data.domain)
        with tempfile.TemporaryDirectory(prefix="hailo-sweep-noise-") as tmp:
            try:
                optimized = backend.optimize(settings, calib, Path(tmp))
                noise = backend.layer_noise(optimized, evaluation)
            except NotImplementedError as exc:
                message(f"per-layer noise analysis: {exc}")
                return analysed
            except Exception as exc:  # an explanation, not a measurement: the sweep's results stand
                message(f"per-layer noise analysis of trial {t.number} failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
        run_id = str(t.user_attrs["mlflow_run_id"])
        staging = Path(tempfile.mkdtemp(prefix="hailo-sweep-noise-upload-"))
        uploader.submit(run_id, f"trial {t.number} layer noise", partial(_upload, run_id=run_id, noise=noise, staging=staging), staging)
        analysed.append(t.number)
    return analysed


def layer_noise_artifacts(layer_noise: Sequence[LayerNoise], work_dir: Path) -> list[tuple[Path, str]]:
    """The per-layer noise table (JSON) and plot of one trial, as (file, artifact dir) pairs."""
    table = work_dir / "layer_noise.json"
    table.write_text(json.dumps([asdict(n) for n in layer_noise], indent=1), encoding="utf-8")
    return [(diag_plots.layer_noise_plot(list(layer_noise), work_dir / "layer_noise.png"), "plots"), (table, "diagnosis")]


def _upload(tracker: Tracker, *, run_id: str, noise: list[LayerNoise], staging: Path) -> None:
    metrics = {f"layer_noise.worst{rank + 1}_snr_db": layer.snr_db for rank, layer in enumerate(noise[:3])}
    tracker.log_to(run_id, RunRecord(name="", metrics=metrics, tags={"hailo_sweep.layer_noise": "best"}))
    tracker.log_files(run_id, layer_noise_artifacts(noise, staging))
