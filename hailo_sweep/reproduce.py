"""``hailo-sweep verify DIR``: rebuild an exported model from its lock file and check that it reproduces.

The lock file (written by ``best --export``) holds the model, data and settings hashes, the resolved config, the seed
and the tool versions. Verification refuses to run on inputs whose hashes differ, rebuilds the model through the same
stages, and compares (a) the compiled bytes, where the toolchain is deterministic, and (b) the outputs of the exported
and the rebuilt model on the evaluation set, and (c) the recorded device metrics.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hailo_sweep import __version__
from hailo_sweep.backends import backend_class
from hailo_sweep.backends.base import CompiledModel
from hailo_sweep.config import DiagnosticsConfig, SweepConfig
from hailo_sweep.data import feed
from hailo_sweep.errors import RunFailed, UserInputError
from hailo_sweep.model_io import file_sha256
from hailo_sweep.pipeline import prepare_sweep, run_trial
from hailo_sweep.selection import LOCK_FILE
from hailo_sweep.settings import Settings

METRIC_RTOL = 1e-6
#: metrics of the run rather than of the model: timings (they vary from run to run on any machine) and how many
#: attempts the device stage needed; none of them takes part in the reproduction verdict
_TIMING_PREFIXES = ("time.",)
_TIMING_SUFFIXES = ("_ms", "_s", "_fps")
_TIMING_WORDS = ("latency", "throughput")
_RUN_FACTS = ("device.retries",)


def is_reproducible(metric: str) -> bool:
    """False for timing metrics (``time.*``, ``*_ms``, ``*_s``, ``*_fps``, anything about latency or throughput) and
    for facts of the run (``device.retries``): a rebuild is not expected to reproduce them."""
    if metric in _RUN_FACTS or metric.startswith(_TIMING_PREFIXES) or metric.endswith(_TIMING_SUFFIXES):
        return False
    return not any(word in part for part in metric.split(".") for word in _TIMING_WORDS)


@dataclass
class Verification:
    bytes_identical: bool
    outputs_max_abs_diff: dict[str, float]
    metric_diffs: dict[str, tuple[float, float]]  # key -> (recorded, rebuilt)
    version_changes: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def outputs_match(self) -> bool:
        return all(v == 0.0 for v in self.outputs_max_abs_diff.values())

    @property
    def metrics_match(self) -> bool:
        return all(abs(a - b) <= METRIC_RTOL * max(1.0, abs(a)) for a, b in self.metric_diffs.values())

    @property
    def ok(self) -> bool:
        return self.outputs_match and self.metrics_match


def read_lock(export_dir: Path) -> dict[str, Any]:
    path = export_dir / LOCK_FILE
    if not path.is_file():
        raise UserInputError(f"no {LOCK_FILE} in {export_dir}", fix="point verify at a directory written by `hailo-sweep best CONFIG --export DIR`")
    return json.loads(path.read_text())


def check_inputs(lock: dict[str, Any]) -> None:
    """Refuse to verify against a model or data that are not the ones the export was built from."""
    entries = [("model", lock["model"])] + [(f"data.{k}", lock["data"][k]) for k in ("calibration", "evaluation")]
    for what, entry in entries:
        path = Path(entry["path"])
        if not path.is_file():
            raise UserInputError(f"{what} file {path} is missing", key=what, fix="restore the file the export was built from")
        if file_sha256(path) != entry["sha256"]:
            raise UserInputError(
                f"{what} file {path} has changed since the export (sha256 differs)", key=what,
                fix="verify needs the exact model and data of the sweep; restore them or export again",
            )


def verify(export_dir: Path) -> Verification:
    lock = read_lock(export_dir)
    check_inputs(lock)
    config = SweepConfig.model_validate(lock["config"])
    settings = Settings.from_params(lock["settings"])
    compiled_file = export_dir / lock["files"]["compiled"]["name"]
    if file_sha256(compiled_file) != lock["files"]["compiled"]["sha256"]:
        raise UserInputError(f"{compiled_file.name} does not match its recorded sha256", fix="export again")
    cls = backend_class(lock["backend"])
    with tempfile.TemporaryDirectory(prefix="hailo-sweep-verify-") as tmp:
        work = Path(tmp)
        prepared = prepare_sweep(config, work)
        backend = cls(prepared.backend_context())
        with backend:
            prepared.facts.update(backend.prepare())
            result = run_trial(prepared, backend, settings, work / "trial", diagnostics=DiagnosticsConfig(layer_noise=False, determinism_samples=0))
            if not result.ok or result.compiled is None:
                raise RunFailed(f"the rebuild failed at run time, in stage {result.failed_stage}: {result.error}")
            rebuilt_bytes = result.compiled.path.read_bytes()
            fed = feed(prepared.dataset.evaluation, settings.normalization_placement, prepared.normalization, config.data.domain)
            exported = CompiledModel(path=compiled_file, size_bytes=compiled_file.stat().st_size, kind=cls.compiled_kind)
            with backend.device(exported) as runner:
                original = runner.run(fed).outputs
            with backend.device(result.compiled) as runner:
                rebuilt = runner.run(fed).outputs
    diffs = {name: float(np.max(np.abs(original[name] - rebuilt[name]))) for name in original}
    recorded = lock["recorded_metrics"]
    compared = {k: (float(recorded[k]), float(result.metrics[k])) for k in recorded if k in result.metrics and is_reproducible(k)}
    versions = {"hailo_sweep": __version__, **backend.versions()}
    changes = {k: (str(lock["versions"].get(k)), v) for k, v in versions.items() if k in lock["versions"] and str(lock["versions"][k]) != v}
    return Verification(
        bytes_identical=hashlib.sha256(rebuilt_bytes).hexdigest() == lock["files"]["compiled"]["sha256"],
        outputs_max_abs_diff=diffs,
        metric_diffs=compared,
        version_changes=changes,
    )
