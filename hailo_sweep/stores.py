"""Where a sweep's records live: the Optuna storage URL, the MLflow tracking URI and the working directory.

Kept free of Optuna and MLflow imports, so that light commands (``ui``) resolve stores without loading either.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hailo_sweep.config import SweepConfig
from hailo_sweep.errors import UserInputError
from hailo_sweep.sqlite_journal import sqlite_path


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URLs (for logs, params and reports)."""
    return re.sub(r"(?<=://)([^:/@]+):([^@/]*)@", r"\1:***@", url)



def sqlite_store_missing(url: str) -> bool:
    """Whether ``url`` names a local sqlite database whose file does not exist: a command that only reads a store
    refuses it, since opening it would create an empty database where no sweep ran."""
    path = sqlite_path(url)
    return path is not None and not Path(path).is_file()

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




_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_stores_writable(stores: Stores, config_file: Path | None = None) -> None:
    """Refuse local stores that cannot be written (a read-only ``sweeps/`` or ``mlruns/``), naming the path and the fix,
    before either store is opened: sqlite's own message is "unable to open database file"."""
    places: list[tuple[Path, str]] = []
    for url, key in ((stores.optuna_url, "stores.optuna"), (stores.mlflow_uri, "stores.mlflow")):
        if url.startswith("sqlite:///"):
            places.append((Path(url.removeprefix("sqlite:///")), key))
    if stores.artifact_location and stores.artifact_location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        places.append((Path(unquote(urlparse(stores.artifact_location).path)) / "x", "stores.mlflow"))
    places.append((stores.work_dir / "x", "stores.root"))
    for target, key in places:
        existing = target.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        problem = _unwritable(existing) or (_unwritable_file(target) if target.is_file() else None)
        if problem:
            raise UserInputError(
                f"{problem}: the store {target} cannot be written there", file=config_file, key=key,
                fix=f"make {existing} writable (e.g. chmod u+w, or remount it read-write), or point {key} "
                "(or stores.root, OPTUNA_STORAGE, MLFLOW_TRACKING_URI) at a writable place",
            )


def _unwritable(directory: Path) -> str | None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        if exc.errno in _READ_ONLY:
            return f"{directory} is read-only ({os.strerror(exc.errno)})"
        raise


def _unwritable_file(path: Path) -> str | None:
    try:
        os.close(os.open(path, os.O_RDWR))
        return None
    except OSError as exc:
        if exc.errno in _READ_ONLY:
            return f"{path} is read-only ({os.strerror(exc.errno)})"
        raise
