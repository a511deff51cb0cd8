"""``HailoOptions``: the ``hailo:`` section of the config as the backend reads it (``BackendContext.options``), with the
defaults the backend applies. The config validates the keys; they are re-checked cheaply here, so a backend built
from a hand-made context is refused the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hailo_sweep.backends.base import BackendContext
from hailo_sweep.errors import UserInputError

DEFAULT_TIMEOUT_MS = 10000
DEFAULT_DEVICE_RETRIES = 2
#: how long a worker waits for a busy device when the device stage has no time limit
DEFAULT_DEVICE_WAIT_S = 600.0
#: share of the device stage's time limit a worker may spend waiting for a busy device (the rest is for the run)
DEVICE_WAIT_SHARE = 0.8
#: "less data than the recommended amount (1024)" (hailo-api.md §2): below it the DFC lowers levels 2-4 itself
RECOMMENDED_CALIBSET = 1024

_OPTION_KEYS = (
    "extra_model_script",
    "device_id",
    "start_node_names",
    "end_node_names",
    "net_name",
    "device_timeout_ms",
    "lock_dir",
    "device_retries",
    "device_stage_timeout_s",
)


@dataclass(frozen=True)
class HailoOptions:
    """``BackendContext.options`` of the hailo backend (validated by the config; re-checked cheaply here)."""

    extra_model_script: tuple[str, ...] = ()
    device_id: str | None = None
    start_node_names: tuple[str, ...] | None = None
    end_node_names: tuple[str, ...] | None = None
    net_name: str | None = None
    device_timeout_ms: int = DEFAULT_TIMEOUT_MS
    lock_dir: Path | None = None
    device_retries: int = DEFAULT_DEVICE_RETRIES
    device_stage_timeout_s: float | None = None  # timeouts.device: bounds the wait for a busy device

    @property
    def device_wait_s(self) -> float:
        if self.device_stage_timeout_s is None:
            return DEFAULT_DEVICE_WAIT_S
        return DEVICE_WAIT_SHARE * self.device_stage_timeout_s

    @classmethod
    def from_context(cls, context: BackendContext) -> HailoOptions:
        opts = dict(context.options)
        unknown = sorted(set(opts) - set(_OPTION_KEYS))
        if unknown:
            raise UserInputError(
                f"unknown hailo backend option(s) {', '.join(unknown)}; known: {', '.join(_OPTION_KEYS)}", key="hailo"
            )
        nodes = {k: tuple(opts[k]) if opts.get(k) is not None else None for k in ("start_node_names", "end_node_names")}
        timeout = DEFAULT_TIMEOUT_MS if opts.get("device_timeout_ms") is None else int(opts["device_timeout_ms"])
        if timeout <= 0:
            raise UserInputError(f"device_timeout_ms must be > 0, got {timeout}", key="hailo.device_timeout_ms")
        retries = DEFAULT_DEVICE_RETRIES if opts.get("device_retries") is None else int(opts["device_retries"])
        if retries < 0:
            raise UserInputError(f"device_retries must be >= 0, got {retries}", key="hailo.device_retries")
        stage_timeout = opts.get("device_stage_timeout_s")
        return cls(
            device_retries=retries,
            device_stage_timeout_s=float(stage_timeout) if stage_timeout else None,
            extra_model_script=tuple(opts.get("extra_model_script") or ()),
            device_id=opts.get("device_id") or None,
            net_name=opts.get("net_name") or None,
            device_timeout_ms=timeout,
            lock_dir=Path(opts["lock_dir"]) if opts.get("lock_dir") else None,
            **nodes,
        )
