"""Errors the user can act on. Each names where the problem is (file, key) and how to fix it."""

from __future__ import annotations

from pathlib import Path


class UserInputError(Exception):
    """Bad input: a config, model or data problem the user must fix. The CLI prints it and exits non-zero."""

    def __init__(self, problem: str, *, file: str | Path | None = None, key: str | None = None, fix: str | None = None):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.key = key
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        text = f"{where}: {self.problem}" if where else self.problem
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class UnsupportedSetting(UserInputError):
    """A knob value the selected backend cannot honour. Refused, never silently ignored."""


class BackendUnavailable(UserInputError):
    """The backend's packages are not installed (e.g. the Hailo SDK outside Hailo's Developer Zone)."""


class RunFailed(RuntimeError):
    """A run-time failure (a stage of a trial failed on this machine), not bad input: the CLI prints it and exits 1."""


class ResourceMissing(RunFailed):
    """No Dask worker offers a resource the sweep needs (``compile``, the target's device), after waiting for one:
    a run-time failure (exit 1), raised before any trial starts. ``missing``: the resource names."""

    def __init__(self, missing: list[str], message: str):
        self.missing = list(missing)
        super().__init__(message)


class ClusterUnreachable(Exception):
    """The Dask scheduler cannot be reached (an outage like a store that is down, not bad input): the CLI exits 3.
    ``address`` is the address as given, with any password replaced by ``***``."""

    def __init__(self, address: str, reason: str, timeout_s: float):
        self.address = address
        super().__init__(
            f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s ({reason}); "
            "check that `dask scheduler` runs there and that its port is reachable from this machine"
        )
