"""The ``hailo`` backend's stages against the REAL Dataflow Compiler, HailoRT and a Hailo device.

Run with ``pytest -m hailo`` on a machine with both wheels installed (Hailo Developer Zone) and a device visible to
``hailortcli scan``. Elsewhere every test here is skipped with the reason. Optional environment:
``HAILO_SWEEP_TARGET`` (hailo8 | hailo8l | hailo10h; default: the device's own architecture) and
``HAILO_SWEEP_DEVICE_ID`` (default: the first free device).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hailo_fixtures import FAKES, TinyModel, tiny_model  # noqa: F401 - fixtures until tests/conftest.py registers them

from hailo_sweep.backends.base import EmulationContext
from hailo_sweep.backends.hailo import compiler
from hailo_sweep.backends.hailo.backend import HailoBackend
from hailo_sweep.backends.hailo.device import device_arch
from hailo_sweep.backends.hailo.runtime import DeviceLock, HailoDeviceError
from hailo_sweep.settings import Settings

pytestmark = pytest.mark.hailo


@dataclass(frozen=True)
class RealHailo:
    hrt: ModuleType
    target: str
    device_id: str


def _import_real(name: str) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or HailoRT's MissingPyHRTLib
        pytest.skip(f"{name} does not import ({type(exc).__name__}: {exc}); install Hailo's wheels from the Developer Zone")
    if Path(getattr(module, "__file__", "") or "").resolve().is_relative_to(FAKES.resolve()):
        pytest.skip(f"{name} resolves to the contract fake in {FAKES}, not the real SDK")
    return module


@pytest.fixture(scope="module")
def real_hailo() -> RealHailo:
    _import_real("hailo_sdk_client")
    hrt = _import_real("hailo_platform")
    ids = [str(d) for d in hrt.Device.scan()]
    if not ids:
        pytest.skip("no Hailo device found (hailo_platform.Device.scan() returned nothing)")
    device_id = os.environ.get("HAILO_SWEEP_DEVICE_ID") or ids[0]
    target = os.environ.get("HAILO_SWEEP_TARGET") or device_arch(hrt, device_id)[0]
    if target not in ("hailo8", "hailo8l", "hailo10h"):
        pytest.skip(f"device {device_id} has architecture {target!r}; set HAILO_SWEEP_TARGET to hailo8, hailo8l or hailo10h")
    return RealHailo(hrt=hrt, target=target, device_id=device_id)


def _backend(tiny: TinyModel, tmp_path: Path, real: RealHailo) -> HailoBackend:
    backend = HailoBackend(tiny.context(tmp_path / "sweep", target=real.target, device_id=real.device_id))
    backend.activate()
    return backend


def test_real_prepare_is_cached(real_hailo: RealHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    assert _backend(tiny_model, tmp_path, real_hailo).prepare()["cache_hit"] == "false"
    assert _backend(tiny_model, tmp_path, real_hailo).prepare()["cache_hit"] == "true"


@pytest.mark.parametrize(("placement", "sixteen"), [("model", ()), ("host", ("logits",))])
def test_real_stages_end_to_end(real_hailo: RealHailo, tiny_model: TinyModel, tmp_path: Path, placement: str, sixteen: tuple[str, ...]) -> None:
    backend = _backend(tiny_model, tmp_path, real_hailo)
    backend.prepare()
    settings = Settings(2, 1, 48, placement, sixteen)  # type: ignore[arg-type]
    model = backend.optimize(settings, tiny_model.feed(tiny_model.calibration, placement), tmp_path / "trial")
    assert isinstance(model.params["effective_optimization_level"], int)
    assert ("optimization_level_lowered" in model.flags) == (model.params["effective_optimization_level"] != 2)

    x = tiny_model.feed(tiny_model.evaluation, placement)
    emulated = {c: backend.emulate(model, x, c) for c in backend.emulation_contexts()}
    for outs in emulated.values():
        assert outs["feat"].shape == (6, 2, 8, 8) and outs["logits"].shape == (6, 3)

    compiled = backend.compile(model, tmp_path / "trial")
    assert compiled.size_bytes == compiled.path.stat().st_size > 0
    with backend.device(compiled) as runner:
        out = runner.run(x)
    assert out.metrics["throughput_fps"] > 0 and out.metrics["latency_ms"] > 0
    hef = real_hailo.hrt.HEF(str(compiled.path))
    for name in ("feat", "logits"):
        if name not in out.raw:  # several quant infos: HailoRT's FLOAT32 was used, and a note says so
            assert any(name in n for n in out.notes)
            continue
        expected_dtype = np.uint16 if name in sixteen else np.uint8
        assert out.raw[name].dtype == expected_dtype
        q = out.quant[name]
        np.testing.assert_allclose(out.outputs[name], (out.raw[name].astype(np.float64) - q.zero_point) * q.scale, rtol=1e-5, atol=1e-6)
        faithful = emulated.get(EmulationContext.BIT_EXACT, emulated[EmulationContext.QUANTIZED])
        lsb = np.abs(out.outputs[name] - faithful[name]) / q.scale
        assert np.median(lsb) <= 2.0, f"{name}: device vs the most faithful emulation, median {np.median(lsb):.2f} LSB"
    assert {i.name for i in hef.get_output_vstream_infos()}  # the HEF reads back through HailoRT


def test_real_device_lock_refuses_a_second_owner(real_hailo: RealHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = HailoBackend(tiny_model.context(tmp_path / "sweep", target=real_hailo.target, device_id=real_hailo.device_id, device_stage_timeout_s=1.0))
    backend.activate()
    model = backend.optimize(Settings(2, 1, 48, "model"), tiny_model.feed(tiny_model.calibration, "model"), tmp_path / "trial")
    compiled = backend.compile(model, tmp_path / "trial")
    holder = DeviceLock(tmp_path / "sweep" / "locks", real_hailo.device_id)
    assert holder.try_acquire()
    try:
        with pytest.raises(HailoDeviceError, match="still in use by another process after waiting"):
            with backend.device(compiled):
                pass
    finally:
        holder.release()


def skip_without_noise_analysis(dfc: ModuleType) -> None:
    """Skip (not fail) where the installed DFC has no layer noise analysis: the backend then refuses
    noisy_layers_16bit up front and says so, which test_hailo_noise covers on the fakes."""
    if not compiler.has_noise_analysis(dfc):
        pytest.skip(f"the installed Dataflow Compiler ({getattr(dfc, '__version__', '?')}) has no ClientRunner.analyze_noise / get_params_statistics")


@pytest.fixture(scope="module")
def real_dfc_target() -> str:
    """The DFC alone is enough for the layer noise analysis; the target defaults to hailo8."""
    _import_real("hailo_sdk_client")
    return os.environ.get("HAILO_SWEEP_TARGET") or "hailo8"


def test_real_layer_noise_and_noisy_layer_promotion(real_dfc_target: str, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = HailoBackend(tiny_model.context(tmp_path / "sweep", target=real_dfc_target))
    backend.activate()
    skip_without_noise_analysis(backend.dfc)
    settings = Settings(0, 0, 48, "model", (), 1)
    model = backend.optimize(settings, tiny_model.feed(tiny_model.calibration, "model"), tmp_path / "trial")
    promoted = str(model.params["hailo.noisy_layers"])
    if promoted != "none":  # the tiny model's only hidden layer is its pooling, unless the DFC folds it away
        assert f"quantization_param({promoted}, precision_mode=a16_w16)" in model.script
    rows = backend.layer_noise(model, tiny_model.feed(tiny_model.evaluation, "model"))
    assert rows and all(np.isfinite(r.snr_db) for r in rows)
    assert [r.snr_db for r in rows] == sorted(r.snr_db for r in rows)
    assert {r.layer for r in rows if r.kind == "output"} <= {"feat", "logits"}
