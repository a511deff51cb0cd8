"""The device stage of a trial and what it is compared with; no knowledge of any toolchain, Optuna or MLflow.

``run_device`` runs the compiled model on a device from its ``DeviceSpec`` (on this machine or on a device host), again
after a ``TransientDeviceError`` (a runtime timeout) up to ``DeviceSpec.retries`` times; the retries used are the metric
``device.retries``.
``compare_with_emulation`` compares the device's raw integers with the most hardware-faithful emulation the backend
offers (bit-exact where present, else quantized): that is ``agreement.*`` and the LSB histograms the
``device_disagrees`` finding reads. Where bit-exact emulation exists, the quantized emulation differs from the hardware
by normal rounding; that drift is measured apart (``emulation_drift.*``) and flags nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from hailo_sweep import lsb_metrics as lsb
from hailo_sweep import metrics as m
from hailo_sweep.backends.base import DeviceOutputs, DeviceSpec, EmulationContext, TransientDeviceError

DEVICE_PREFIX = "device"
AGREEMENT_PREFIX = "agreement"
#: quantized emulation vs the most hardware-faithful (bit-exact) emulation, in LSB of the device's grid
DRIFT_PREFIX = "emulation_drift"
#: the emulations the device may be compared with, most hardware-faithful first
AGREEMENT_CONTEXTS = (EmulationContext.BIT_EXACT, EmulationContext.QUANTIZED)
#: how findings name each emulation
CONTEXT_NAMES = {
    EmulationContext.FP_OPTIMIZED: "full-precision emulation",
    EmulationContext.QUANTIZED: "quantized emulation",
    EmulationContext.BIT_EXACT: "bit-exact emulation",
}

Repeat = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def run_device(
    spec: DeviceSpec,
    compiled_path: Path,
    evaluation: np.ndarray,
    determinism_samples: int,
    notes: list[str],
    metrics: dict[str, float],
) -> tuple[DeviceOutputs, Repeat | None]:
    """The device's outputs on ``evaluation`` (and, with ``determinism_samples``, the first ones again).

    Attempted up to ``1 + spec.retries`` times on transient device errors only; each attempt opens the device
    afresh (a failed run releases it). Each retry is a note with its reason; ``device.retries`` is set on every outcome.
    """
    attempts = 1 + max(0, int(spec.retries))
    attempt = 0
    try:
        while True:
            try:
                repeat = None
                with spec.open(compiled_path) as runner:
                    dev = runner.run(evaluation)
                    if determinism_samples:
                        # the same inputs again: a device must return the same bytes
                        again = runner.run(evaluation[:determinism_samples])
                        repeat = ({k: v[:determinism_samples] for k, v in dev.raw.items()}, again.raw)
                return dev, repeat
            except TransientDeviceError as exc:
                if attempt + 1 >= attempts:
                    raise
                notes.append(f"device attempt {attempt + 1} of {attempts} failed ({exc}); retrying")
                attempt += 1
    finally:
        metrics[f"{DEVICE_PREFIX}.retries"] = float(attempt)


def compare_with_emulation(
    outputs: Sequence[m.OutputSpec],
    emulations: Mapping[EmulationContext, dict[str, np.ndarray]],
    dev: DeviceOutputs,
    metrics: dict[str, float],
    params: dict[str, str | int | float],
    lsb_histograms: dict[str, dict[int, int]],
) -> EmulationContext | None:
    """Device vs the most faithful emulation, and the quantized emulation's drift from it; returns the emulation the
    device was compared with (None when nothing is comparable)."""
    # outputs the device could only return as float (e.g. several quantization parameters) have no raw integers
    comparable = tuple(spec for spec in outputs if spec.name in dev.raw and spec.name in dev.quant)
    reference = next((c for c in AGREEMENT_CONTEXTS if c in emulations), None)
    if reference is None or not comparable or not any(spec.weight > 0 for spec in comparable):
        return None
    faithful = emulations[reference]
    params["agreement_reference"] = reference.value
    agreement = lsb.agreement_metrics(faithful, dev.raw, dev.quant, comparable, histograms=lsb_histograms)
    metrics.update({f"{AGREEMENT_PREFIX}.{k}": v for k, v in agreement.items()})
    quantized = emulations.get(EmulationContext.QUANTIZED)
    if reference is not EmulationContext.QUANTIZED and quantized is not None:
        # on the device's integer grid: the faithful emulation's floats quantized as the device's raw integers
        grid = {spec.name: dev.quant[spec.name].quantize(faithful[spec.name]) for spec in comparable}
        drift = lsb.agreement_metrics(quantized, grid, dev.quant, comparable)
        metrics.update({f"{DRIFT_PREFIX}.{k}": v for k, v in drift.items()})
    return reference
