"""The simulated machine behind the ``hailo_platform`` fake: which devices exist and what goes wrong. Test-only.

Tests set ``SYSTEM`` before running; the ``hailo_fakes`` fixture re-imports the fake for every test, so each test
starts from these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakeSystem:
    #: device id (PCIe BDF, as Device.scan() returns in 4.23) -> DeviceArchitectureTypes member name
    devices: dict[str, str] = field(default_factory=lambda: {"0000:01:00.0": "HAILO8"})
    #: make the next inference fail: "timeout" (HailoRTTimeout) or "driver" (HailoRTDriverOperationFailedException)
    fail_on_infer: str | None = None
    #: devices currently opened by a VDevice; a second VDevice on one of them fails, as without the multi-process service
    in_use: set[str] = field(default_factory=set)
    vdevices_opened: int = 0
    inferences: int = 0


SYSTEM = FakeSystem()
