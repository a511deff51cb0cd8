"""Which Dask workers offer which resources (``compile``, ``hailo8l``...), and waiting, bounded, for the missing ones.

A worker declares its resources on its command line (``dask worker ADDRESS --nthreads 1 --resources "hailo8l=1"``);
the scheduler reports them per worker. The driver checks before it submits any trial, so a sweep with no device
worker says so (with the line that starts one) instead of queueing tasks that never run.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hailo_sweep.errors import ResourceMissing

if TYPE_CHECKING:
    from distributed import Client

POLL_S = 0.5  # how often the scheduler is asked again while a resource is missing


def worker_resources(client: Client) -> dict[str, dict[str, float]]:
    """Worker address -> the resources it declared (``{}`` for a worker started without ``--resources``)."""
    info = _scheduler_info(client)
    return {addr: {name: float(amount) for name, amount in (w.get("resources") or {}).items()} for addr, w in info.get("workers", {}).items()}


def _scheduler_info(client: Client) -> dict[str, Any]:
    # every worker: newer releases report only the first few workers unless asked for all (n_workers=-1)
    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return dict(client.scheduler_info(n_workers=-1))
    return dict(client.scheduler_info())


def providers(resources: dict[str, dict[str, float]], needed: Sequence[str]) -> dict[str, list[str]]:
    """Resource -> the workers offering at least one unit of it (sorted), for each needed resource."""
    return {name: sorted(addr for addr, offered in resources.items() if offered.get(name, 0) >= 1) for name in needed}


def worker_line(resource: str, scheduler: str) -> str:
    """The command that starts a worker offering one unit of ``resource`` (one compile slot, or one Hailo device)."""
    tls = " --tls-ca-file CA.pem --tls-cert WORKER.pem --tls-key WORKER.key" if scheduler.startswith("tls://") else ""
    return f'dask worker {scheduler} --nthreads 1 --resources "{resource}=1"{tls}'


def wait_for_resources(client: Client, needed: Sequence[str], timeout_s: float, say: Callable[[str], None]) -> dict[str, list[str]]:
    """Resource -> worker addresses, once every needed resource is offered by at least one worker. While one is
    missing, says so once (with the ``dask worker`` line that provides it) and asks the scheduler again every
    ``POLL_S``; after ``timeout_s`` raises ``ResourceMissing`` naming each resource still missing."""
    needed = list(dict.fromkeys(needed))
    scheduler = client.scheduler.address if client.scheduler is not None else "tcp://SCHED:8786"
    deadline = time.monotonic() + timeout_s
    told: set[str] = set()
    while True:
        found = providers(worker_resources(client), needed)
        missing = [name for name in needed if not found[name]]
        if not missing:
            return found
        for name in missing:
            if name not in told:
                say(f"waiting up to {timeout_s:g} s for a Dask worker with the resource {name!r}; start one: {worker_line(name, scheduler)}")
                told.add(name)
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(repr(name) for name in missing)
            lines = [f"no Dask worker at {scheduler} offers the resource {names} after {timeout_s:g} s; no trial was started"]
            lines += [f"  start one: {worker_line(name, scheduler)}" for name in missing]
            raise ResourceMissing(missing, "\n".join(lines))
        time.sleep(min(POLL_S, left))
