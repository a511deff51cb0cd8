"""The simulated machine behind the ``hailo_platform`` fake: which devices exist and what goes wrong. Test-only.

Tests set ``SYSTEM`` before running; the ``hailo_fakes`` fixture re-imports the fake for every test, so each test
starts from these defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class FakeSystem:
    #: device id (PCIe BDF, as Device.scan() returns in 4.23) -> DeviceArchitectureTypes member name
    devices: dict[str, str] = field(default_factory=lambda: {"0000:01:00.0": "HAILO8"})
    #: make every inference fail: "timeout" (HailoRTTimeout) or "driver" (HailoRTDriverOperationFailedException)
    fail_on_infer: str | None = None
    #: an intermittent timeout: this many next inferences raise HailoRTTimeout, the ones after succeed
    timeouts_left: int = 0
    #: False: ``Device`` has no control APIs (``device.control`` raises AttributeError), as in the HailoRT build of
    #: issue 11 (builds differ in what Device exposes: control APIs, the multi-process service, integrated devices)
    control_api: bool = True
    #: a device another process (outside hailo-sweep) holds for a while: device id -> how many more VDevice openings
    #: fail with HAILO_DEVICE_IN_USE before it is free
    busy_for: dict[str, int] = field(default_factory=dict)
    #: devices currently opened by a VDevice; a second VDevice on one of them fails, as without the multi-process service
    in_use: set[str] = field(default_factory=set)
    vdevices_opened: int = 0
    inferences: int = 0


def _from_environment() -> FakeSystem:
    """Fake-only: ``HAILO_FAKE_DEVICES="<id>=<ARCH>,..."`` sets the devices of a fake in another process (a CLI run,
    its workers), where a test cannot reach ``SYSTEM``."""
    system = FakeSystem()
    spec = os.environ.get("HAILO_FAKE_DEVICES")
    if spec is not None:
        system.devices = dict(item.split("=", 1) for item in spec.split(",") if item)
    return system


SYSTEM = _from_environment()
