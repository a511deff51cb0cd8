"""Task metrics: functions the user writes (exact match of a decoded sequence, IoU of a detection map, ...).

The config names them, ``metrics: {seq_match: {function: "metrics.py:exact_match", direction: maximize}}``, the file
relative to the config. Each is called once per stage as ``fn(reference, outputs, labels)``: the float model's
outputs and the stage's outputs (dicts of batch-first arrays keyed by output name) and the evaluation set's labels
array (any shape, or None). It returns a number, or one number per sample (its mean is the metric; the per-sample
values pair up across trials for pruning). Results are keyed ``<stage>.task.<name>``; in the config's objective and
constraints a task metric is written ``task.<name>``.

Loading the file runs the user's code, as the user asked. A missing file or function is refused up front
(``UserInputError``); an exception inside the function fails the trial, with the function's traceback on record.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError

PREFIX = "task."

MetricFunction = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], "np.ndarray | None"], Any]


class TaskMetricError(RuntimeError):
    """A task metric raised or returned something that is not a number or one number per sample."""


@dataclass(frozen=True)
class TaskMetric:
    name: str
    direction: str  # "minimize" | "maximize"
    source: str  # "metrics.py:exact_match", as written in the config
    function: MetricFunction

    @property
    def key(self) -> str:
        return PREFIX + self.name

    def values(
        self, reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None
    ) -> np.ndarray:
        """The function's result as a float64 array: shape () for a number, (N,) for per-sample values."""
        n = len(next(iter(reference.values())))
        try:
            result = self.function(reference, outputs, labels)
        except Exception as exc:
            # chained, so the trial's recorded traceback runs through the user's function
            raise TaskMetricError(f"task metric {self.name!r} ({self.source}) raised {type(exc).__name__}: {exc}") from exc
        try:
            arr = np.asarray(result, dtype=np.float64)
        except (TypeError, ValueError):
            raise TaskMetricError(f"task metric {self.name!r} ({self.source}) returned {type(result).__name__}, not a number") from None
        if arr.ndim > 1 or (arr.ndim == 1 and len(arr) != n):
            raise TaskMetricError(
                f"task metric {self.name!r} ({self.source}) returned shape {arr.shape}; return a number or one value "
                f"per evaluation sample ({n},)"
            )
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise TaskMetricError(f"task metric {self.name!r} ({self.source}) returned a non-finite or empty value")
        return arr

    def value(self, reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> float:
        return float(self.values(reference, outputs, labels).mean())

    def per_sample(self, reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> np.ndarray:
        arr = self.values(reference, outputs, labels)
        if arr.ndim == 0:
            raise TaskMetricError(
                f"pruning on task metric {self.name!r} needs one value per sample, but {self.source} returned one number"
            )
        return arr


def load_task_metrics(config: SweepConfig) -> tuple[TaskMetric, ...]:
    """Import every configured function; refuse a missing file, a missing or non-callable function, a broken file."""
    base = config.source.parent if config.source is not None else Path.cwd()
    found = []
    for name, spec in config.metrics.items():
        file_part, _, func_name = spec.function.rpartition(":")
        key = f"metrics.{name}.function"
        path = Path(file_part).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if not path.is_file():
            raise UserInputError(
                f"task metric {name!r}: file {path} not found", file=config.source, key=key,
                fix="put the Python file next to the config (or give its path relative to the config) as 'file.py:function'",
            )
        module = _import(path, config.source, key)
        function = getattr(module, func_name, None)
        if not callable(function):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
            raise UserInputError(
                f"task metric {name!r}: {path.name} has no function {func_name!r}"
                + (f" (it defines: {', '.join(defined)})" if defined else ""),
                file=config.source, key=key, fix="name a function defined in the file: 'file.py:function'",
            )
        found.append(TaskMetric(name=name, direction=spec.direction, source=spec.function, function=function))
    return tuple(found)


def _import(path: Path, config_file: Path | None, key: str) -> Any:
    module_name = "hailo_sweep_task_metrics_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot import {path} as Python", file=config_file, key=key, fix="name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        last = traceback.format_exception(exc)[-1].strip()
        raise UserInputError(
            f"importing {path} failed: {last}", file=config_file, key=key, fix="fix the error in the metrics file"
        ) from None
    return module


def stage_task_metrics(
    metrics: tuple[TaskMetric, ...], reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None
) -> dict[str, float]:
    """``{"task.<name>": value}`` for one stage's outputs."""
    return {metric.key: metric.value(reference, outputs, labels) for metric in metrics}


def find(metrics: tuple[TaskMetric, ...], metric: str) -> TaskMetric | None:
    """The task metric a config metric name (``task.<name>``) refers to, if any."""
    if not metric.startswith(PREFIX):
        return None
    return next((t for t in metrics if t.key == metric), None)
