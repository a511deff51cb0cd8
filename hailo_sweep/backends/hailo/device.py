"""Which Hailo device a worker runs on, and whether it can run the HEF: the device lock, the bounded wait for a busy
device, the architecture check. No inference here (``runtime`` does that).

Facts and sources (hailo-api.md §3; ``hailo-ai/hailort`` branch hailo8):

- One device per worker process at a time: an exclusive ``fcntl.flock`` per device id, waited for (bounded) while
  another worker holds it. A device held by a process outside hailo-sweep shows as HailoRT's ``HAILO_DEVICE_IN_USE``
  (73) or ``HAILO_OUT_OF_PHYSICAL_DEVICES`` (74) status (``hailort.h``), raised by pyhailort as a plain
  ``HailoRTException("libhailort failed with error: <code> (<status>)")`` (``pyhailort.py``
  ``ExceptionWrapper.create_exception_from_status``).
- The architecture comes from ``Device(id).control.identify().device_architecture`` (``pyhailort.py`` ``Device.control``,
  ``Control.identify``); builds differ in what ``Device`` exposes, so this check is optional: where it cannot be made,
  HailoRT's own refusal of the HEF at ``configure()`` is the next source of truth.
- Compatibility: ``device_internal.cpp::is_hef_compatible`` (a Hailo-8L runs only hailo8l HEFs; a Hailo-8 runs
  hailo8/hailo8r/hailo8l, the last more slowly).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hailo_sweep.backends.base import TransientDeviceError
from hailo_sweep.errors import UserInputError

ENV_DEVICE_ID = "HAILO_SWEEP_DEVICE_ID"
#: seconds between two looks at a busy device
POLL_S = 0.25
#: HailoRT statuses of a device another process holds (hailort.h: 73 HAILO_DEVICE_IN_USE, 74
#: HAILO_OUT_OF_PHYSICAL_DEVICES); pyhailort raises them as a plain HailoRTException "libhailort failed with error:
#: <code> (<status>)" (pyhailort.py ExceptionWrapper.create_exception_from_status)
_BUSY_STATUSES = ("HAILO_DEVICE_IN_USE", "HAILO_OUT_OF_PHYSICAL_DEVICES")
#: HailoRT exception classes worth another attempt of the device stage
_TRANSIENT = ("HailoRTTimeout",)
_LOG = logging.getLogger(__name__)

#: DeviceArchitectureTypes member -> hw_arch name (pyhailort.py DeviceArchitectureTypes, both 4.23 and 5.2)
_ARCH = {
    "HAILO8_A0": "hailo8",
    "HAILO8": "hailo8",
    "HAILO8L": "hailo8l",
    "HAILO10H": "hailo10h",
    "HAILO15H": "hailo15h",
    "HAILO15M": "hailo15m",
    "HAILO15L": "hailo15l",
}
#: device arch -> HEF targets it runs (device_internal.cpp::is_hef_compatible, hailort@hailo8)
_RUNS = {
    "hailo8": ("hailo8", "hailo8r", "hailo8l"),
    "hailo8l": ("hailo8l",),
    "hailo10h": ("hailo10h", "hailo15h", "hailo15m"),
    "hailo15h": ("hailo10h", "hailo15h", "hailo15m"),
    "hailo15m": ("hailo15m",),
    "hailo15l": ("hailo15l",),
}
_PRETTY = {"hailo8": "Hailo-8", "hailo8r": "Hailo-8R", "hailo8l": "Hailo-8L", "hailo10h": "Hailo-10H"}


def pretty(arch: str) -> str:
    return _PRETTY.get(arch, arch)


class HailoDeviceError(RuntimeError):
    """The device failed, timed out, is busy or missing; the message says which device and why."""


class HailoDeviceTimeout(HailoDeviceError, TransientDeviceError):
    """HailoRT timed out on the device: transient, the pipeline tries the device stage again."""


@dataclass(frozen=True)
class DeviceOptions:
    device_id: str | None
    timeout_ms: int
    lock_dir: Path
    wait_s: float = 600.0  # how long to wait for a busy device before failing the trial


def is_transient(exc: BaseException) -> bool:
    """``exc`` is a HailoRT error worth another attempt (by class name: not every build defines every class)."""
    return any(cls.__name__ in _TRANSIENT for cls in type(exc).__mro__)


def is_busy(exc: BaseException) -> bool:
    """HailoRT says the device is held by another process."""
    return any(status in str(exc) for status in _BUSY_STATUSES)


class Waiter:
    """The bounded wait for a busy device: says once that it waits (note + log), then polls until the deadline."""

    def __init__(self, wait_s: float, notes: list[str]):
        self.deadline = time.monotonic() + max(0.0, wait_s)
        self.wait_s = wait_s
        self.notes = notes
        self.said: set[str] = set()

    def wait(self, what: str) -> bool:
        """Say (once per ``what``) that this worker waits; sleep one poll. False once the deadline has passed."""
        if what not in self.said:
            self.said.add(what)
            message = f"waiting for {what} (up to {self.wait_s:g} s)"
            self.notes.append(message)
            _LOG.warning(message)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(POLL_S, remaining))
        return True


# -- one device per process ---------------------------------------------------------------------------------------
class DeviceLock:
    """Exclusive, non-blocking ``flock`` on ``<lock_dir>/hailo-device-<id>.lock``; the holder's pid is written in it.

    flock is per open file description, so a second open in the same process conflicts too. The file is never
    deleted (deleting a lock file races with a process about to lock it).
    """

    def __init__(self, lock_dir: Path, device_id: str):
        self.device_id = device_id
        self.path = lock_dir / f"hailo-device-{re.sub(r'[^A-Za-z0-9_.-]', '_', device_id)}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def candidate_devices(hrt: ModuleType, options: DeviceOptions) -> tuple[list[str], str]:
    """The device ids this worker may use, and where they came from."""
    if options.device_id:
        return [options.device_id], "hailo.device_id"
    if os.environ.get(ENV_DEVICE_ID):
        return [os.environ[ENV_DEVICE_ID]], f"${ENV_DEVICE_ID}"
    ids = [str(d) for d in hrt.Device.scan()]
    if not ids:
        raise HailoDeviceError(
            "no Hailo device found: Device.scan() returned nothing (check `hailortcli scan`, the PCIe driver "
            "and that no container hides /dev/hailo*)"
        )
    return ids, "Device.scan()"


def select_device(hrt: ModuleType, options: DeviceOptions, waiter: Waiter | None = None) -> tuple[str, DeviceLock]:
    """The device this worker will own, already locked; waits (bounded) while every candidate is held by another
    worker."""
    ids, source = candidate_devices(hrt, options)
    waiter = waiter or Waiter(options.wait_s, [])
    while True:
        busy: list[str] = []
        for device_id in ids:
            lock = DeviceLock(options.lock_dir, device_id)
            if lock.try_acquire():
                return device_id, lock
            busy.append(f"{device_id} (lock {lock.path} held by {lock.holder()})")
        what = f"Hailo device {busy[0]}" if len(busy) == 1 else f"all {len(busy)} Hailo devices ({'; '.join(busy)})"
        if not waiter.wait(f"{what}, in use by another worker"):
            raise HailoDeviceError(
                f"{what}, chosen from {source}, is still in use by another process after waiting {options.wait_s:g} s. "
                f"hailo-sweep runs one device per worker process at a time: give this worker a free device "
                f"(hailo.device_id or ${ENV_DEVICE_ID}), run fewer workers, or raise timeouts.device"
            )


# -- target check -------------------------------------------------------------------------------------------------
def device_arch(hrt: ModuleType, device_id: str) -> tuple[str | None, str | None]:
    """The device's architecture as a hw_arch name, or (None, why) when this HailoRT cannot say.

    An optional check: a ``Device`` without control APIs (``AttributeError``), a build that does not implement them
    (``NotImplementedError``) or any HailoRT error gives None with the reason, never a failure.
    """
    try:
        with hrt.Device(device_id) as device:
            arch = device.control.identify().device_architecture
    except (AttributeError, NotImplementedError, hrt.HailoRTException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    name = str(getattr(arch, "name", arch)).rsplit(".", 1)[-1].upper()
    return _ARCH.get(name, name.lower()), None


def target_mismatch(hef_target: str, arch: str, device_id: str, *, before_sweep: bool = False) -> UserInputError:
    if before_sweep:
        problem = (
            f"the sweep compiles for target {hef_target} ({pretty(hef_target)}) but device {device_id} is a {pretty(arch)}; "
            "HailoRT would refuse every HEF of the sweep (HEF not compatible with device), so no trial was started"
        )
    else:
        problem = (
            f"the HEF was compiled for {hef_target} ({pretty(hef_target)}) but device {device_id} is a {pretty(arch)}; "
            "HailoRT refuses it (HEF not compatible with device)"
        )
    return UserInputError(
        problem,
        key="target",
        fix=(
            f"set target: {arch} to compile for this device, or run on a {pretty(hef_target)} device "
            "(a Hailo-8 also runs hailo8l HEFs, more slowly; a Hailo-8L runs only hailo8l HEFs)"
        ),
    )


def check_target(hef_target: str, arch: str | None, device_id: str, why: str | None = None) -> list[str]:
    """Raise before loading a HEF the device would refuse; return notes about the pairing."""
    if arch is None:
        because = f" ({why})" if why else ""
        return [f"device {device_id}: architecture not identified{because}; relying on HailoRT's own HEF compatibility check at configure()"]
    runs = _RUNS.get(arch)
    if runs is not None and hef_target not in runs:
        raise target_mismatch(hef_target, arch, device_id)
    notes = [f"device {device_id}: {pretty(arch)}"]
    if arch == "hailo8" and hef_target == "hailo8l":
        notes.append("a hailo8l HEF on a Hailo-8 runs at lower performance (HailoRT warns the same)")
    return notes




# -- once per sweep ---------------------------------------------------------------------------------------------------
def check_before_sweep(hrt: ModuleType, options: DeviceOptions, target: str) -> list[str]:
    """Before the first trial: the candidate devices are there, free, and able to run ``target`` HEFs.

    Raises ``UserInputError`` (``target_mismatch``) when every candidate device is identified and none runs the target.
    Everything that cannot be checked (no scan, no control API, the device busy) degrades to a note.
    """
    try:
        ids, source = candidate_devices(hrt, options)
    except HailoDeviceError as exc:
        return [f"device not checked before the sweep: {exc}"]
    except (AttributeError, NotImplementedError, hrt.HailoRTException) as exc:
        return [f"device not checked before the sweep: Device.scan() failed ({type(exc).__name__}: {exc})"]
    notes: list[str] = []
    refused: list[tuple[str, str]] = []
    for device_id in ids:
        arch, why = device_arch(hrt, device_id)
        if arch is not None and arch in _RUNS and target not in _RUNS[arch]:
            refused.append((device_id, arch))
            continue
        if arch is None:
            notes.append(f"device {device_id} (from {source}): architecture not identified before the sweep ({why}); "
                         f"HailoRT's configure() will refuse a HEF it cannot run")
        lock = DeviceLock(options.lock_dir, device_id)
        if lock.try_acquire():
            lock.release()
        else:
            notes.append(f"device {device_id} is in use by {lock.holder()}; trials will wait for it (up to {options.wait_s:g} s each)")
    if refused and len(refused) == len(ids):
        device_id, arch = refused[0]
        raise target_mismatch(target, arch, device_id, before_sweep=True)
    return notes
