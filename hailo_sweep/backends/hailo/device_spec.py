"""What a device host needs to run a HEF: the target it was compiled for, the output naming, the device options.

Made on the compile host by ``HailoBackend.device_spec``; opened on the machine with the device (which may be a
Raspberry Pi with HailoRT and no Dataflow Compiler), so this module imports only HailoRT, and that only in ``open``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hailo_sweep.backends.base import DeviceRunner, DeviceSpec
from hailo_sweep.backends.hailo._imports import import_hailort
from hailo_sweep.backends.hailo.runtime import DeviceOptions, HailoDeviceRunner, OutputNaming


@dataclass
class HailoDeviceSpec(DeviceSpec):
    hef_target: str
    naming: OutputNaming
    options: DeviceOptions
    retries: int = 0

    def open(self, compiled_path: Path) -> DeviceRunner:
        return HailoDeviceRunner(hrt=import_hailort(), hef_path=Path(compiled_path), hef_target=self.hef_target, naming=self.naming, options=self.options)
