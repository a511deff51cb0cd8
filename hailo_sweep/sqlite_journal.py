"""Local sqlite stores in write-ahead-log mode: a trial's few dozen small commits without an fsync each.

A sweep writes both of its default stores (Optuna's ``sweeps/optuna.db`` and MLflow's ``mlruns/mlflow.db``) in many
small transactions: every suggested parameter, user attribute, metric batch and run state is one commit. In sqlite's
default rollback-journal mode each commit syncs the disk, which costs most where something else keeps the disk busy
(the compiler writing its outputs, another sweep). ``benchmarks/bench_store_writes.py`` measures one trial's writes
in both modes side by side: 0.092 s per trial in rollback mode vs 0.058 s in WAL mode (``PRAGMA journal_mode=WAL`` with
``synchronous=NORMAL``), median of 3 rounds on this 2-core machine while benchmarks kept it busy. WAL with ``synchronous=NORMAL`` keeps the
database consistent after a crash or power loss (the last commits may be lost, the file is never corrupted); it needs
the database on a local disk, where several processes of one host may share it (``--jobs``). Several hosts share a
PostgreSQL store instead (the README's "Several machines").

Only the sqlite files the sweep itself opens are switched (``use_wal``), by a SQLAlchemy ``connect`` listener: the
journal mode is stored in the file, so MLflow's UI and Optuna's own tools keep reading it as before. Where the mode
cannot be changed (the file is locked by another process at that moment), the connection stays as sqlite opened it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

_paths: set[str] = set()
_lock = threading.Lock()
_installed = False


def sqlite_path(url: str) -> str | None:
    """The real path of a local ``sqlite:///`` URL's database file (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return os.path.realpath(path) if path and path != ":memory:" else None


def use_wal(url: str) -> None:
    """Open the sqlite database of ``url`` in WAL mode with ``synchronous=NORMAL`` from now on in this process."""
    global _installed
    path = sqlite_path(url)
    if path is None:
        return
    with _lock:
        _paths.add(path)
        if not _installed:
            from sqlalchemy import event
            from sqlalchemy.engine import Engine

            event.listen(Engine, "connect", _on_connect)
            _installed = True


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        main = next((row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main"), "")
        if main and os.path.realpath(main) in _paths:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:
        pass  # locked by another process right now: this connection keeps sqlite's defaults, nothing else changes
    finally:
        cursor.close()
