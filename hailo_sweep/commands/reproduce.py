"""``hailo-sweep verify DIR``: rebuild an exported model from its lock file and check that it reproduces.

The lock file (written by ``best --export``) holds the model, data and settings hashes, the resolved config, the seed
and the tool versions. Verification refuses to run on inputs whose hashes differ, rebuilds the model through the same
stages, and compares (a) the compiled bytes, where the toolchain is deterministic, and (b) the outputs of the exported
and the rebuilt model on the evaluation set, and (c) the recorded device metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hailo_sweep import __version__
from hailo_sweep.backends import backend_class
from hailo_sweep.backends.base import CompiledModel
from hailo_sweep.config import DiagnosticsConfig, SweepConfig, check_file
from hailo_sweep.data import feed
from hailo_sweep.errors import RunFailed, UserInputError
from hailo_sweep.model_io import file_sha256
from hailo_sweep.pipeline import prepare_sweep
from hailo_sweep.trial import run_trial
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


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _LockPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class InputFile(_LockPart):
    path: str
    sha256: Sha256


class LockData(_LockPart):
    calibration: InputFile
    evaluation: InputFile


class ExportedFile(_LockPart):
    name: str
    sha256: Sha256


class Lock(_LockPart):
    """What ``verify`` reads from ``lock.json``, nothing else: every value is checked before it is used."""

    format: Literal[1]
    sweep: str
    trial: int
    backend: Literal["onnxruntime", "hailo"]
    target: str
    seed: int | None = None
    settings: dict[str, Any]
    settings_sha256: str | None = None  # of the settings as exported: an edited lock is refused, not rebuilt
    model: InputFile
    data: LockData
    config: dict[str, Any]
    files: dict[str, ExportedFile]
    recorded_metrics: dict[str, float]
    versions: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_compiled(self) -> Lock:
        if "compiled" not in self.files:
            raise ValueError("files has no 'compiled' entry")
        return self


_FIX = "export again with `hailo-sweep best CONFIG --export DIR`; verify reads only what that command writes"


def read_lock(export_dir: Path) -> Lock:
    """``lock.json`` parsed and validated against ``Lock``; anything else is refused (exit 2) with the reason."""
    path = export_dir / LOCK_FILE
    if not path.is_file():
        raise UserInputError(f"no {LOCK_FILE} in {export_dir}", fix="point verify at a directory written by `hailo-sweep best CONFIG --export DIR`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"not valid JSON: {exc}", file=path, fix=_FIX) from None
    try:
        return Lock.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()[:5])
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise UserInputError(f"not a valid lock file: {problems}", file=path, key=first, fix=_FIX) from None


def confined(export_dir: Path, name: str, *, key: str) -> Path:
    """The export's file ``name``, refused unless it resolves to a regular file inside ``export_dir``."""
    root = export_dir.resolve()
    try:
        path = (root / name).resolve()
    except (RuntimeError, OSError):
        path = None
    if path is None or not path.is_relative_to(root) or path == root:
        raise UserInputError(f"file name {name!r} points outside the export directory {root}", file=export_dir / LOCK_FILE, key=key, fix=_FIX)
    if not path.is_file():
        raise UserInputError(f"{name} is missing from the export directory (or is not a file)", file=export_dir / LOCK_FILE, key=key, fix=_FIX)
    return path


def checked_copy(source: Path, sha256: str, dst: Path, *, what: str, fix: str) -> Path:
    """Copy ``source`` to ``dst`` and check the copy's hash: what is rebuilt is exactly what was checked (a file
    swapped after its check is never read again)."""
    source = check_file(source, what=f"{what} file", fix=fix, key=what)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dst)
    if file_sha256(dst) != sha256:
        raise UserInputError(f"{what} file {source} has changed since the export (sha256 differs)", key=what, fix=fix)
    return dst


def checked_inputs(export_dir: Path, lock: Lock, into: Path) -> tuple[SweepConfig, Settings, Path]:
    """The config to rebuild with, pointing at checked copies of the model and data, the settings, and a checked copy
    of the exported compiled model. ``config.model`` and ``config.data`` in the lock must name the files whose hashes
    are recorded (a lock whose config points elsewhere is refused, never rebuilt from)."""
    lock_path = export_dir / LOCK_FILE
    fix = "verify needs the exact model and data of the sweep; restore them or export again"
    if lock.settings_sha256 is not None and hashlib.sha256(json.dumps(lock.settings, sort_keys=True).encode()).hexdigest() != lock.settings_sha256:
        raise UserInputError("the settings in the lock file differ from the ones exported (settings_sha256 does not match)",
                             file=lock_path, key="settings", fix=_FIX)
    try:
        config = SweepConfig.model_validate(lock.config)
        settings = Settings.from_params(lock.settings)
    except (ValidationError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"config or settings in the lock file are not valid: {str(exc).splitlines()[0][:300]}", file=lock_path, key="config", fix=_FIX) from None
    entries = (("model", config.model, lock.model), ("data.calibration", config.data.calibration, lock.data.calibration),
               ("data.evaluation", config.data.evaluation, lock.data.evaluation))
    copies: dict[str, Path] = {}
    for what, _, entry in entries:  # first: the recorded files are there and unchanged
        copies[what] = checked_copy(Path(entry.path), entry.sha256, into / "inputs" / what / Path(entry.path).name, what=what, fix=fix)
    for what, named, entry in entries:  # then: the config names those files, not others
        if Path(named) != Path(entry.path):
            raise UserInputError(
                f"config.{what} names {named}, but the file whose hash is recorded is {entry.path}", file=lock_path, key=f"config.{what}", fix=_FIX,
            )
    compiled_entry = lock.files["compiled"]
    compiled_src = confined(export_dir, compiled_entry.name, key="files.compiled.name")
    compiled = checked_copy(compiled_src, compiled_entry.sha256, into / "exported" / compiled_src.name, what="files.compiled", fix="export again")
    data = config.data.model_copy(update={"calibration": copies["data.calibration"], "evaluation": copies["data.evaluation"]})
    return config.model_copy(update={"model": copies["model"], "data": data}), settings, compiled


def verify(export_dir: Path) -> Verification:
    checked = read_lock(export_dir)
    lock = checked.model_dump()
    cls = backend_class(lock["backend"])
    with tempfile.TemporaryDirectory(prefix="hailo-sweep-verify-") as tmp:
        work = Path(tmp)
        config, settings, compiled_file = checked_inputs(export_dir, checked, work / "checked")
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
