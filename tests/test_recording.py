"""Recording off the critical path: the background uploader runs jobs in order, flushes before a sweep ends, and records
a failed upload on its run instead of raising into the sweep."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from hailo_sweep.sweep.recording import ArtifactUploader
from hailo_sweep.tracking import RunRecord, Tracker


def _tracker(tmp_path: Path) -> tuple[Tracker, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "rec", (tmp_path / "artifacts").as_uri())
    parent = tracker.create_parent_run(RunRecord(name="sweep"))
    return tracker, uri, parent


def test_jobs_run_in_order_in_the_background_and_flush_waits_for_them(tmp_path: Path) -> None:
    tracker, uri, parent = _tracker(tmp_path)
    runs = [tracker.start_child(parent, RunRecord(name=f"trial-{i}")) for i in range(3)]
    uploader = ArtifactUploader(uri, "rec", (tmp_path / "artifacts").as_uri())
    order: list[int] = []
    stagings = []
    for i, run_id in enumerate(runs):
        staging = tmp_path / f"staging-{i}"
        staging.mkdir()
        (staging / "report.json").write_text(f'{{"trial": {i}}}')
        stagings.append(staging)

        def job(t: Tracker, run_id: str = run_id, staging: Path = staging, i: int = i) -> None:
            t.client.log_artifact(run_id, str(staging / "report.json"))
            t.finish(run_id)
            order.append(i)

        uploader.submit(run_id, f"trial {i}", job, staging)
    stats = uploader.close()
    assert order == [0, 1, 2] and stats.jobs == 3 and not stats.failures
    client = MlflowClient(uri)
    for run_id in runs:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run_id)] == ["report.json"]
    assert not any(s.exists() for s in stagings)  # the staged files are removed once uploaded


def test_a_failed_upload_is_recorded_on_its_run_and_the_next_job_still_runs(tmp_path: Path) -> None:
    tracker, uri, parent = _tracker(tmp_path)
    bad, good = (tracker.start_child(parent, RunRecord(name=n)) for n in ("bad", "good"))
    uploader = ArtifactUploader(uri, "rec", (tmp_path / "artifacts").as_uri())
    staging = tmp_path / "staging"
    staging.mkdir()

    def failing(t: Tracker) -> None:
        t.client.log_artifact(bad, str(staging / "missing.onnx"))  # the file is not there

    uploader.submit(bad, "trial 0 artifacts", failing, staging)
    uploader.submit(good, "trial 1 artifacts", lambda t: t.finish(good))
    stats = uploader.close()
    assert [f.run_id for f in stats.failures] == [bad] and stats.jobs == 2
    client = MlflowClient(uri)
    run = client.get_run(bad)
    # the run's measurements are on record: it ends as its trial did, the tag says which files are missing
    assert run.info.status == "FINISHED" and run.data.tags["hailo_sweep.upload_error"].startswith("trial 0 artifacts: ")
    assert client.get_run(good).info.status == "FINISHED"
    assert not staging.exists()


def test_workers_that_each_draw_their_own_best_at_their_end_cover_the_final_best_once() -> None:
    """diagnostics.plots: best with several workers: each draws, when it ends, those of its own trials among the best k
    of the study at that moment; over random values, finish orders and infeasible trials, the final best k trials are
    each drawn exactly once."""
    import random

    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from hailo_sweep.sweep.best_noise import best_trials
    from hailo_sweep.sweep.recorder import own_best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(40):
        rng = random.Random(seed)
        study = optuna.create_study(direction="minimize")
        owner: dict[int, int] = {}  # trial -> the worker that ran it
        ends = sorted(rng.sample(range(4, 40), 2)) + [40]  # three workers end after these many trials
        drawn: list[int] = []
        for number in range(40):
            study.add_trial(create_trial(value=rng.random(), params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
                                         constraints={"c": rng.choice([-1.0, -1.0, 1.0])}))
            owner[number] = rng.choice([w for w, end in enumerate(ends) if end > number])  # a worker still running
            for worker, end in enumerate(ends):
                if number + 1 == end:
                    drawn += own_best(study, 3, {n for n, w in owner.items() if w == worker})
        final = {t.number for t in best_trials(study, 3)}
        assert final <= set(drawn), (seed, final, drawn)
        assert len(drawn) == len(set(drawn)), seed
