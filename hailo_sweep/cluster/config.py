"""The ``cluster:`` section of a sweep config: where the Dask scheduler is and how to reach it safely.

Imports nothing from ``distributed``: a config with a ``cluster:`` section loads (and is checked) on a machine without
the ``[cluster]`` extra. ``resolved(config_file)`` makes the TLS paths absolute (relative to the config file, like the
other paths of a config) and refuses a missing file by its key.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hailo_sweep.errors import UserInputError

TLS_KEYS: tuple[str, ...] = ("tls_ca_file", "tls_cert", "tls_key")
_WHAT = {
    "tls_ca_file": "the CA certificate (PEM) that signed the scheduler's and workers' certificates",
    "tls_cert": "this client's certificate (PEM)",
    "tls_key": "this client's private key (PEM)",
}


class ClusterConfig(BaseModel):
    """How ``hailo-sweep run CONFIG --cluster ADDRESS`` reaches a Dask scheduler (``--cluster`` overrides ``address``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None  # e.g. tcp://sched:8786, or tls://sched:8786 with the TLS files below
    # Dask's TLS: all three or none (the scheduler and workers take the same files as --tls-ca-file/--tls-cert/--tls-key)
    tls_ca_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_encryption: bool = False  # refuse any plain tcp:// connection (Dask's require_encryption)
    connect_timeout_s: float = Field(default=20, gt=0)  # how long to try reaching the scheduler before giving up
    resource_timeout_s: float = Field(default=600, gt=0)  # how long to wait for a worker with a needed resource
    queued: int = Field(default=1, ge=0)  # trials submitted beyond the number of compile slots

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> ClusterConfig:
        given = [key for key in TLS_KEYS if getattr(self, key) is not None]
        if given and len(given) != len(TLS_KEYS):
            missing = [key for key in TLS_KEYS if key not in given]
            raise ValueError(f"TLS needs all of {', '.join(TLS_KEYS)}; {', '.join(missing)} not set (set all three, or none for plain tcp)")
        if self.require_encryption and not given:
            raise ValueError("require_encryption needs the TLS files tls_ca_file, tls_cert and tls_key")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca_file is not None

    def resolved(self, config_file: Path | None) -> ClusterConfig:
        """A copy whose TLS paths are absolute (relative ones are relative to ``config_file``'s folder), each checked to
        be an existing file. ``config_file`` None: relative paths are relative to the current directory."""
        base = config_file.parent if config_file is not None else Path.cwd()
        update: dict[str, Path] = {}
        for key in TLS_KEYS:
            value: Path | None = getattr(self, key)
            if value is None:
                continue
            path = Path(os.path.expanduser(str(value)))
            update[key] = path if path.is_absolute() else (base / path).absolute()
        copy = self.model_copy(update=update)
        copy.check_files(config_file)
        return copy

    def check_files(self, config_file: Path | None = None) -> None:
        """Each TLS file must exist and be a regular file: else bad input naming the file, the key and the fix."""
        for key in TLS_KEYS:
            path: Path | None = getattr(self, key)
            if path is None or path.is_file():
                continue
            problem = f"{_WHAT[key]} {'is a directory, not a file' if path.is_dir() else 'not found'}: {path}"
            raise UserInputError(
                problem,
                file=config_file or path,
                key=f"cluster.{key}",
                fix=f"point cluster.{key} at an existing PEM file (a relative path is relative to the config file), "
                "or remove tls_ca_file, tls_cert and tls_key for a plain tcp:// scheduler on a private network",
            )
