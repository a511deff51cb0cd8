"""Where a sweep's records live: the Optuna storage URL, the MLflow tracking URI and the working directory.

Kept free of Optuna and MLflow imports, so that light commands (``ui``) resolve stores without loading either.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hailo_sweep.config import SweepConfig


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URLs (for logs, params and reports)."""
    return re.sub(r"(?<=://)([^:/@]+):([^@/]*)@", r"\1:***@", url)


@dataclass(frozen=True)
class Stores:
    root: Path
    optuna_url: str
    mlflow_uri: str
    artifact_location: str | None  # set for local sqlite tracking; a tracking server decides its own
    work_dir: Path  # <root>/sweeps/<name>: caches and trial scratch space

    def describe(self) -> dict[str, str]:
        return {"optuna_storage": redact_url(self.optuna_url), "mlflow_tracking_uri": redact_url(self.mlflow_uri)}


def resolve_stores(config: SweepConfig) -> Stores:
    """Config first, then the standard environment variables, then ``sqlite`` files under the root directory."""
    root = (config.stores.root or Path.cwd()).resolve()
    optuna_url = config.stores.optuna or os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{root / 'sweeps' / 'optuna.db'}"
    mlflow_uri = config.stores.mlflow or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    artifact_location = None
    if mlflow_uri.startswith("sqlite:///"):
        db = Path(mlflow_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "artifacts" / config.name).resolve().as_uri()
    return Stores(root=root, optuna_url=optuna_url, mlflow_uri=mlflow_uri, artifact_location=artifact_location, work_dir=root / "sweeps" / config.name)


