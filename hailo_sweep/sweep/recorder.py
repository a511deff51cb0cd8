"""The record of one trial in both stores: params, metrics, tags and Optuna attrs now; files through the uploader.

Knows Optuna and MLflow, nothing about any toolchain: it reads a ``TrialResult`` and writes what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna

from hailo_sweep.config import SweepConfig
from hailo_sweep.diagnose import plots as diag_plots
from hailo_sweep.diagnose.ladder import explain
from hailo_sweep.sweep.best_noise import best_trials, layer_noise_artifacts
from hailo_sweep.pipeline import Prepared
from hailo_sweep.trial import TrialResult
from hailo_sweep.search_space import SearchSpace
from hailo_sweep.settings import Settings
from hailo_sweep.sweep.objective import HEADLINE_METRICS, Objective, constraint_metric_names, constraint_values, headline_metrics
from hailo_sweep.sweep.recording import ArtifactUploader
from hailo_sweep.tracking import LoggedModelRecord, RunRecord, Tracker


@dataclass
class TrialRecorder:
    """Writes trials of one sweep: the same for the local loop, the ``worker`` loop and the cluster driver."""

    config: SweepConfig
    space: SearchSpace
    objective: Objective
    prepared: Prepared
    tracker: Tracker
    uploader: ArtifactUploader
    parent_run_id: str
    backend_name: str
    baseline: Settings
    versions: dict[str, str]
    staging_root: Path  # where a trial's scratch directory moves for the uploader
    #: diagnostics.plots: best: what the plots of each trial recorded here are drawn from, until the end of the sweep
    plot_data: dict[int, PlotData] = field(default_factory=dict)

    def start(self, trial: optuna.Trial, settings: Settings) -> str:
        """The trial's MLflow run (RUNNING), before anything is computed."""
        run_id = self.tracker.start_child(
            self.parent_run_id, RunRecord(name=f"trial-{trial.number:04d}", params=self.params(settings), tags=self.tags(trial, settings))
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        return run_id

    def pruned(self, trial: optuna.Trial, run_id: str, result: TrialResult, work_dir: Path, reason: str) -> None:
        """A pruned trial keeps the emulated metrics it reached, and its stage and reason, in both stores."""
        metrics = dict(result.metrics)
        trial.set_user_attr("pruned_at", "emulate")
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if k.startswith("emulated.total.") or k.startswith("time.")})
        artifacts: list[tuple[Path, str]] = []
        if result.script:
            script = work_dir / result.script_name
            script.write_text(result.script, encoding="utf-8")
            artifacts.append((script, ""))
        artifacts.extend((log, "logs") for log in result.logs if log.is_file())
        self.tracker.end_child(
            run_id,
            RunRecord(name="", params=result.params, metrics=metrics, artifacts=artifacts,
                      tags={"hailo_sweep.state": "PRUNED", "hailo_sweep.pruned_at": "emulate", "hailo_sweep.reason": reason}),
        )

    def record(self, trial: optuna.Trial, run_id: str, result: TrialResult, work_dir: Path, start: float,
               record_s: float) -> tuple[list[float] | None, bool, tuple[str, ...]]:
        """Write what the sweep and queries read now (params, metrics, tags, attrs); hand the files to the uploader.
        Returns the objective values (None for a failed trial), whether they are feasible, and the violated constraints."""
        t0 = time.perf_counter()
        metrics = dict(result.metrics)
        tags: dict[str, str] = {"hailo_sweep.flags": ",".join(result.flags)} if result.flags else {}
        value: list[float] | None = None
        feasible = False
        constraints: dict[str, float] = {}
        if result.ok:
            missing = [k for k in self.objective.keys if k not in metrics]
            if missing:
                result.failed_stage, result.error = "record", f"objective metric {', '.join(missing)} was not produced"
            else:
                value = [metrics[k] for k in self.objective.keys]
        if result.ok and value is not None:
            constraints = constraint_values(self.config, metrics, self.objective)
            if "optimization_level_lowered" in result.flags:
                # the toolchain measured another level than the one asked for: never count it as that level
                constraints["optimization_level_honoured"] = 1.0
            metric_names = constraint_metric_names(self.config, self.objective)
            for name, v in constraints.items():
                trial.set_constraint(name, v)
                metrics[metric_names.get(name, f"constraint.{name}")] = v
            feasible = all(v <= 0 for v in constraints.values())
            metrics.update(headline_metrics(self.config, metrics, value[0], feasible))
            tags.update({"hailo_sweep.state": "COMPLETE", "hailo_sweep.feasible": str(feasible)})
            if result.findings:
                tags["hailo_sweep.findings"] = ",".join(sorted({f.code for f in result.findings}))
        else:
            tags.update({"hailo_sweep.state": "FAIL", "hailo_sweep.failed_stage": str(result.failed_stage), "hailo_sweep.error": str(result.error)})
            trial.set_user_attr("failed_stage", result.failed_stage)
            trial.set_user_attr("error", (result.error or "")[:2000])
        mode = self.config.diagnostics.plots
        plots = value is not None and mode == "per_trial"
        if value is not None:
            later = f"drawn at the end of the sweep if among the {self.config.diagnostics.plots_best} best; " if mode == "best" else ""
            tags["hailo_sweep.plots"] = "drawn" if plots else (
                f"not drawn (diagnostics.plots: {mode}; {later}report.json has the data): "
                f"hailo-sweep diagnose {self.config.source or 'CONFIG'} --trial {trial.number}")
        staging = self.stage_files(work_dir)
        logs = [staging / log.relative_to(work_dir) if log.is_relative_to(work_dir) else log for log in result.logs]  # the toolchain's own words
        compiled = None
        model_id = None
        if value is not None and result.compiled is not None:
            compiled = staging / result.compiled.path.relative_to(work_dir) if result.compiled.path.is_relative_to(work_dir) else result.compiled.path
            # the id is needed now (trial attrs are read-only once the trial ends); the file is uploaded later
            model_id = self.tracker.create_model(
                run_id,
                LoggedModelRecord(
                    name=f"{self.config.name}-trial-{trial.number:04d}", path=compiled, model_type=result.compiled.kind,
                    params=self.space.params_of(result.settings),
                    tags={"optuna.trial_number": str(trial.number), "hailo_sweep.feasible": str(feasible)},
                ),
            )
            trial.set_user_attr("mlflow_model_id", model_id)
            trial.set_user_attr("compiled_name", result.compiled.path.name)
            # the compiled model is what `best --export` delivers: uploaded now, so a trial told COMPLETE always has it
            # (a write error here fails the trial, see _record_write_error); plots and reports follow in the background
            self.tracker.upload_model(model_id, compiled)
        report = self.report(trial, result, metrics, value, feasible)
        metrics["time.trial_s"] = time.perf_counter() - start
        metrics["time.record_s"] = record_s + (time.perf_counter() - t0)  # the synchronous part; uploads: time.upload_s
        report["metrics"] = metrics
        linked = [k for k in metrics if k in HEADLINE_METRICS or k in self.objective.keys or k.endswith(".over_limit")
                  or k in ("compile.size_bytes", "device.latency_ms")] if model_id else []  # the Models tab's columns
        self.tracker.log_to(run_id, RunRecord(name="", params=result.params, metrics=metrics, tags=tags, model_id=model_id, model_metrics=tuple(linked)))
        trial.set_user_attr("metrics", {k: metrics[k] for k in _summary_keys(metrics, self.objective.keys)})
        outputs = [o.name for o in self.prepared.outputs]
        if value is not None and compiled is not None and mode == "best":
            self.plot_data[trial.number] = PlotData(run_id, metrics, result.lsb_histograms)
        self.uploader.submit(
            run_id, f"trial {trial.number} artifacts",
            partial(_upload_trial, run_id=run_id, staging=staging, result=result, metrics=metrics, report=report,
                    outputs=outputs, compiled=compiled, failed=value is None, logs=logs, plots=plots),
            staging, run_failed=value is None,
        )
        return value, feasible, tuple(k for k, v in constraints.items() if v > 0)

    def draw_best_plots(self, study: optuna.Study) -> list[int]:
        """``diagnostics.plots: best``, at the end of the sweep: the plots of the ``plots_best`` best trials that this
        recorder wrote, drawn and uploaded by the uploader; returns their numbers.

        Each process draws only its own trials, from the data it kept: a trial among the best k of the whole study is
        among the best k of the trials that existed when its own process ended (more trials only push it down), so the
        best k trials of a study run by several workers all get their plots, each exactly once."""
        if self.config.diagnostics.plots != "best":
            return []
        outputs = [o.name for o in self.prepared.outputs]
        drawn = own_best(study, self.config.diagnostics.plots_best, set(self.plot_data))
        for number in drawn:
            data = self.plot_data[number]
            staging = self.staging_root / f"plots{number:04d}-{socket.gethostname()}-{os.getpid()}"  # as remove_dead_scratch reads it
            staging.mkdir(parents=True, exist_ok=True)
            self.uploader.submit(data.run_id, f"trial {number} plots", partial(_upload_plots, data=data, outputs=outputs, staging=staging), staging)
        self.plot_data.clear()
        return drawn

    def stage_files(self, work_dir: Path) -> Path:
        """Move the trial's scratch directory where the uploader picks it up (the trial's scratch is then free)."""
        staging = self.staging_root / work_dir.name
        staging.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            work_dir.rename(staging)
        except OSError:  # another file system: copy
            shutil.copytree(work_dir, staging)
        return staging

    def report(self, trial: optuna.Trial, result: TrialResult, metrics: dict[str, float], value: float | None, feasible: bool) -> dict[str, Any]:
        return {
            "trial": trial.number,
            "settings": result.settings.as_params(),
            "objective": {"keys": list(self.objective.keys), "directions": list(self.objective.directions),
                          "values": value, "value": value[0] if value else None},
            "feasible": feasible,
            "metrics": metrics,
            "backend_params": result.params,
            "flags": result.flags,
            "notes": result.notes,
            "stages": [{"name": t.name, "seconds": t.seconds, "ok": t.ok} for t in result.timings],
            "failed_stage": result.failed_stage,
            "error": result.error,
            "traceback": result.traceback,
            "lsb_histograms": result.lsb_histograms,
            "findings": [asdict(f) for f in result.findings],
            "explanation": explain(metrics, [o.name for o in self.prepared.outputs]) if result.ok else [],
            "versions": self.versions,
            "model_sha256": self.prepared.model_sha256,
            "calibration_sha256": self.prepared.dataset.calibration_sha256,
            "evaluation_sha256": self.prepared.dataset.evaluation_sha256,
        }

    def params(self, settings: Settings) -> dict[str, Any]:
        return {
            **self.space.params_of(settings),  # spelled as in the config and in Optuna: output_16bit=all, not featmap,logits
            "target": self.config.target,
            "backend": self.backend_name,
            "calib.n": settings.calibset_size,
            "calib.sha256": self.prepared.dataset.calibration_sha256,
            "eval.n": len(self.prepared.dataset.evaluation),
            "eval.sha256": self.prepared.dataset.evaluation_sha256,
            "model.sha256": self.prepared.model_sha256,
        }

    def tags(self, trial: optuna.Trial, settings: Settings) -> dict[str, str]:
        baseline = bool(trial.user_attrs.get("baseline")) or (self.config.sampler.name == "grid" and settings == self.baseline)
        return {
            "optuna.study_name": self.config.name,
            "optuna.trial_number": str(trial.number),
            "hailo_sweep.state": "RUNNING",
            "hailo_sweep.backend": self.backend_name,
            "hailo_sweep.target": self.config.target,
            "hailo_sweep.baseline": str(baseline),
            "hailo_sweep.worker": f"{socket.gethostname()}:{os.getpid()}",
            **{f"version.{k}": v for k, v in self.versions.items()},
        }



def _upload_trial(
    tracker: Tracker, *, run_id: str, staging: Path, result: TrialResult, metrics: dict[str, float], report: dict[str, Any],
    outputs: list[str], compiled: Path | None, failed: bool, logs: Sequence[Path] = (), plots: bool = True,
) -> None:
    """The background half of recording a trial: plots, tables, the report and a copy of the compiled model as run
    artifacts; then the run ends. (The LoggedModel's file is uploaded synchronously by ``_record``.)"""
    start = time.perf_counter()
    artifacts: list[tuple[Path, str]] = []
    if result.script:
        script = staging / result.script_name
        script.write_text(result.script, encoding="utf-8")
        artifacts.append((script, ""))
    artifacts.extend((log, "logs") for log in logs if log.is_file())
    if compiled is not None:
        artifacts.append((compiled, "compiled"))
        artifacts.extend(_diagnosis_artifacts(result, metrics, outputs, staging, plots))
    report_path = staging / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    artifacts.append((report_path, ""))
    tracker.log_files(run_id, artifacts)
    tracker.log_to(run_id, RunRecord(name="", metrics={"time.upload_s": time.perf_counter() - start}))
    tracker.finish(run_id, failed=failed)


def own_best(study: optuna.Study, k: int, mine: set[int]) -> list[int]:
    """The trials among ``mine`` (those one process ran) that are among the ``k`` best of the study now."""
    return [t.number for t in best_trials(study, k) if t.number in mine]


@dataclass
class PlotData:
    """What a trial's error-ladder and LSB-histogram plots are drawn from."""

    run_id: str
    metrics: dict[str, float]
    lsb_histograms: dict[str, dict[int, int]]


def _upload_plots(tracker: Tracker, *, data: PlotData, outputs: list[str], staging: Path) -> None:
    tracker.log_files(data.run_id, [(path, "plots") for path in _plots(data.metrics, data.lsb_histograms, outputs, staging)])
    tracker.set_tags(data.run_id, {"hailo_sweep.plots": "drawn (at the end of the sweep: one of the best trials)"})


def _plots(metrics: dict[str, float], lsb_histograms: dict[str, dict[int, int]], outputs: list[str], work_dir: Path) -> list[Path]:
    """The error-ladder plot, and the LSB-histogram plot when the trial has histograms. Drawing both costs more than
    the rest of a small model's trial (about 0.15 s each with matplotlib); drawn in the background as the next trial
    ran, they slowed it (they share the cores and the GIL), hence ``diagnostics.plots: best``."""
    paths = [diag_plots.ladder_plot(metrics, outputs, work_dir / "error_ladder.png")]
    if lsb_histograms:
        paths.append(diag_plots.lsb_histogram_plot(lsb_histograms, work_dir / "lsb_histogram.png"))
    return paths


def _diagnosis_artifacts(result: TrialResult, metrics: dict[str, float], outputs: list[str], work_dir: Path, plots: bool = True) -> list[tuple[Path, str]]:
    """Plots and tables that explain where this trial's error comes from (see ``hailo-sweep diagnose``); the plots
    only with ``plots`` (see ``_plots``), report.json has their data."""
    out: list[tuple[Path, str]] = [(path, "plots") for path in _plots(metrics, result.lsb_histograms, outputs, work_dir)] if plots else []
    if result.layer_noise:
        out.extend(layer_noise_artifacts(result.layer_noise, work_dir))
    findings = work_dir / "findings.json"
    findings.write_text(json.dumps([asdict(f) for f in result.findings], indent=1, default=str), encoding="utf-8")
    out.append((findings, "diagnosis"))
    return out


def _summary_keys(metrics: dict[str, float], objective_keys: Sequence[str]) -> list[str]:
    """The metrics kept in Optuna's user attrs (the full set lives in MLflow)."""
    keep = set(objective_keys)
    for k in metrics:
        if k.startswith(("device.total.", "emulated.total.", "agreement.total.", "constraint.", "findings.", "_")) or k.endswith(".over_limit") \
                or k in ("device.throughput_fps", "device.latency_ms", "compile.size_bytes"):
            keep.add(k)
        if k.startswith(("device.", "emulated.")) and (k.endswith((".accuracy", ".accuracy_drop", ".softmax_mae", ".prob_mae")) or ".task." in k):
            keep.add(k)
    return sorted(k for k in keep if k in metrics)


def lib_versions() -> dict[str, str]:
    """Versions of the libraries every trial depends on, for its report and tags."""
    import mlflow
    import numpy

    return {"mlflow": mlflow.__version__, "numpy": numpy.__version__}

