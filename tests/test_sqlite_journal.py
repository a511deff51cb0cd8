"""The sweep's own sqlite stores are opened in WAL mode; other sqlite files in the process are left as they are."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy

from hailo_sweep import sqlite_journal


def _mode(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def test_only_the_registered_store_switches_to_wal(tmp_path: Path) -> None:
    ours, other = tmp_path / "ours.db", tmp_path / "other.db"
    sqlite_journal.use_wal(f"sqlite:///{ours}")
    for path in (ours, other):
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
            if path == ours:
                assert conn.execute(sqlalchemy.text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        engine.dispose()
    assert _mode(ours) == "wal"
    assert _mode(other) == "delete"  # sqlite's default: an unrelated database is not touched
    with sqlite3.connect(ours) as conn:  # the committed row is readable by a plain client (MLflow's UI, optuna CLI)
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_urls_that_are_not_local_sqlite_files_are_ignored() -> None:
    for url in ("postgresql://u:p@127.0.0.1/db", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        assert sqlite_journal.sqlite_path(url) is None
        sqlite_journal.use_wal(url)  # no error, nothing registered
