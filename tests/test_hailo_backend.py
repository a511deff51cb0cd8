"""The ``hailo`` backend's stages against the contract fakes of ``hailo_sdk_client`` and ``hailo_platform``.

Expected values are computed independently: float references with onnxruntime directly on the ONNX file,
dequantization from the HEF's quant infos read through the (fake) HailoRT API, lock holders from another process.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hailo_fixtures import FakeHailo, TinyModel, hailo_fakes, hold_device_lock, purge_fake_modules, tiny_model  # noqa: F401 - fixtures until tests/conftest.py registers them

from hailo_sweep.backends.base import CompiledModel, EmulationContext, OptimizedModel
from hailo_sweep.backends.hailo import compiler
from hailo_sweep.backends.hailo.backend import HailoBackend
from hailo_sweep.backends.hailo.runtime import ENV_DEVICE_ID, DeviceLock, HailoDeviceError
from hailo_sweep.errors import BackendUnavailable, UnsupportedSetting, UserInputError
from hailo_sweep.settings import Settings

DEVICE = "0000:01:00.0"


def make_backend(tiny: TinyModel, tmp_path: Path, target: str = "hailo8", **options: object) -> HailoBackend:
    backend = HailoBackend(tiny.context(tmp_path / "sweep", target=target, **options))
    backend.activate()
    return backend


def reference(tiny: TinyModel, raw: np.ndarray) -> dict[str, np.ndarray]:
    """Float outputs of the ONNX model on host-normalized input, straight from onnxruntime."""
    sess = ort.InferenceSession(str(tiny.path), providers=["CPUExecutionProvider"])
    feat, logits = sess.run(["feat", "logits"], {"image": tiny.normalization.apply(raw)})
    return {"feat": feat, "logits": logits}


def optimized(backend: HailoBackend, tiny: TinyModel, tmp_path: Path, settings: Settings, name: str = "trial") -> OptimizedModel:
    calib = tiny.feed(tiny.calibration[: settings.calibset_size], settings.normalization_placement)
    return backend.optimize(settings, calib, tmp_path / name)


def hef_quant(fakes: FakeHailo, hef_path: Path) -> dict[str, object]:
    """ONNX output name -> the HEF's quant info, mapped through HailoRT's own original-name API."""
    hef = fakes.platform.HEF(str(hef_path))
    by_node = {"/stem/Relu": "feat", "/head/Gemm": "logits"}
    result = {}
    for info in hef.get_output_vstream_infos():
        originals = hef.get_original_names_from_vstream_name(info.name)
        result[by_node[originals[-1]]] = info.quant_info
    return result


# -- prepare ------------------------------------------------------------------------------------------------------------
def test_prepare_translates_once_per_key_and_caches_the_har(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    runner_cls = hailo_fakes.sdk.ClientRunner
    first = make_backend(tiny_model, tmp_path).prepare()
    assert first["cache_hit"] == "false" and runner_cls.translate_calls == 1
    second = make_backend(tiny_model, tmp_path).prepare()
    assert second["cache_hit"] == "true" and runner_cls.translate_calls == 1
    assert second["har_key"] == first["har_key"]

    other_target = make_backend(tiny_model, tmp_path, target="hailo8l").prepare()
    other_nodes = make_backend(tiny_model, tmp_path, end_node_names=["/stem/Relu", "/head/Gemm"]).prepare()
    assert other_target["cache_hit"] == "false" and other_nodes["cache_hit"] == "false"
    assert runner_cls.translate_calls == 3
    cache = tmp_path / "sweep" / "hailo"
    assert len(list(cache.glob("parsed-*.har"))) == 3
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp files left behind


def test_prepare_refuses_extra_lines_naming_unknown_layers(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, extra_model_script=["quantization_param(conv7, precision_mode=a8_w4)"])
    with pytest.raises(UserInputError) as info:
        backend.prepare()
    assert "conv7" in str(info.value) and info.value.key == "hailo.extra_model_script"


def test_outputs_missing_from_the_translated_model_are_refused(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as info:
        make_backend(tiny_model, tmp_path, end_node_names=["/head/Gemm"]).prepare()
    assert "feat" in str(info.value) and info.value.key == "hailo.end_node_names"


def test_sdk_failures_carry_the_sdk_message_and_output(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(compiler.DfcError) as info:
        make_backend(tiny_model, tmp_path, end_node_names=["/head/Nope"]).prepare()
    assert "translate_onnx_model failed" in str(info.value) and "'/head/Nope' is not a node" in str(info.value)
    assert "Translation started" in str(info.value)  # the SDK's own output, captured, ends the message

    backend = make_backend(tiny_model, tmp_path, extra_model_script=["foo_param(x=1)"])
    with pytest.raises(compiler.DfcError, match=r"load_model_script failed.*unknown model script command 'foo_param'"):
        optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    assert (tmp_path / "trial" / "optimize.log").is_file()
    assert not (tmp_path / "trial" / "model_quantized.har").exists()


def test_unknown_option_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as info:
        HailoBackend(tiny_model.context(tmp_path, device="x"))
    assert "device" in str(info.value) and "device_id" in str(info.value)


# -- optimize -----------------------------------------------------------------------------------------------------------
def test_optimize_detects_the_dfc_lowering_the_level(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    assert model.params["effective_optimization_level"] == 0
    assert model.params["effective_compression_level"] == 0
    assert model.params["calibration_entries_used"] == 32
    assert model.flags == ["optimization_level_lowered"]
    assert "optimization_level=2, compression_level=1" in model.script  # requested in the script, not effective
    assert model.script_name == "model_script.alls"
    assert "Reducing optimization level to 0" in (tmp_path / "trial" / "optimize.log").read_text()
    assert (tmp_path / "trial" / "model_quantized.har").is_file()

    kept = optimized(backend, tiny_model, tmp_path, Settings(1, 3, 32, "model"), name="trial2")
    assert kept.params["effective_optimization_level"] == 1
    assert kept.params["effective_compression_level"] == 3
    assert kept.flags == []


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("[info] Using dataset with 64 entries for calibration\n", (2, 1, False, 64)),
        (
            "[warning] Reducing optimization level to 1 (the accuracy won't be optimized and compression won't be used) "
            "because there's less data than the recommended amount (1024)\n",
            (1, 0, True, None),
        ),
        ("Reducing optimization level to 1 because reasons\nReducing optimization level to 0 because more\n", (0, 1, True, None)),
    ],
)
def test_parse_optimize_log(log: str, expected: tuple[int, int, bool, int | None]) -> None:
    facts = compiler.parse_optimize_log(log, 2, 1)
    assert (facts.effective_optimization_level, facts.effective_compression_level, facts.lowered, facts.calibration_entries) == expected


def test_captured_output_collects_log_records_and_stdout() -> None:
    quiet = logging.getLogger("test_hailo.nonpropagating")
    quiet.propagate = False
    quiet.setLevel(logging.INFO)
    loud = logging.getLogger("test_hailo.propagating")
    loud.setLevel(logging.INFO)
    with compiler.captured_output() as captured:
        quiet.warning("Reducing optimization level to 0 (quiet)")
        loud.info("propagated record")
        print("printed line")
    text = captured.text
    assert "[warning] Reducing optimization level to 0 (quiet)" in text
    assert text.count("propagated record") == 1
    assert "printed line" in text


# -- normalization: once, never twice, never missed ------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["model", "host"])
def test_normalization_applied_exactly_once(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, placement: str) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, placement))  # type: ignore[arg-type]
    ref = reference(tiny_model, tiny_model.evaluation)
    fp = backend.emulate(model, tiny_model.feed(tiny_model.evaluation, placement), EmulationContext.FP_OPTIMIZED)
    for name in ("feat", "logits"):
        np.testing.assert_allclose(fp[name], ref[name], atol=1e-5)
    # the same check tells a double or missing normalization apart: feed the other domain and it must fail
    other = "host" if placement == "model" else "model"
    wrong = backend.emulate(model, tiny_model.feed(tiny_model.evaluation, other), EmulationContext.FP_OPTIMIZED)
    assert not np.allclose(wrong["logits"], ref["logits"], atol=1e-2)

    # the calibration set reached the DFC in the fed domain: raw 0..255 (model) or normalized (host)
    hef = hailo_fakes.platform.HEF(str(backend.compile(model, tmp_path / "trial").path))
    quant = hef.get_input_vstream_infos()[0].quant_info
    calib = tiny_model.feed(tiny_model.calibration[:32], placement).astype(np.float64)
    step = quant.qp_scale
    assert quant.limvals_min == pytest.approx(min(calib.min(), 0.0), abs=step)
    assert quant.limvals_max == pytest.approx(calib.max(), abs=step)


# -- emulate -------------------------------------------------------------------------------------------------------------------
def test_emulate_in_every_context(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    assert backend.emulation_contexts() == (EmulationContext.FP_OPTIMIZED, EmulationContext.QUANTIZED, EmulationContext.BIT_EXACT)
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    x = tiny_model.feed(tiny_model.evaluation, "model")
    outs = {c: backend.emulate(model, x, c) for c in backend.emulation_contexts()}
    for out in outs.values():
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "feat": ((6, 2, 8, 8), np.float32),
            "logits": ((6, 3), np.float32),
        }
    quant = hef_quant(hailo_fakes, backend.compile(model, tmp_path / "trial").path)
    for name in ("feat", "logits"):
        lsb = np.abs(outs[EmulationContext.BIT_EXACT][name] - outs[EmulationContext.FP_OPTIMIZED][name]) / quant[name].qp_scale
        assert lsb.max() <= 2.0  # rounding (0.5) plus the fake's level-0 error (1.0)
        assert lsb.max() > 0.1  # quantized emulation is not the float model
        drift = np.rint((outs[EmulationContext.QUANTIZED][name] - outs[EmulationContext.BIT_EXACT][name]) / quant[name].qp_scale)
        assert set(np.unique(drift)) <= {-1.0, 0.0, 1.0}  # SDK_QUANTIZED: one rounding step off here and there


def test_bit_exact_only_where_the_sdk_has_it(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class OlderInferenceContext(enum.Enum):
        SDK_NATIVE = 1
        SDK_FP_OPTIMIZED = 2
        SDK_QUANTIZED = 3

    backend = make_backend(tiny_model, tmp_path)
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    monkeypatch.setattr(hailo_fakes.sdk, "InferenceContext", OlderInferenceContext)
    assert backend.emulation_contexts() == (EmulationContext.FP_OPTIMIZED, EmulationContext.QUANTIZED)
    with pytest.raises(UnsupportedSetting, match="SDK_BIT_EXACT"):
        backend.emulate(model, tiny_model.feed(tiny_model.evaluation, "model"), EmulationContext.BIT_EXACT)


# -- compile ---------------------------------------------------------------------------------------------------------------------
def test_compile_writes_the_hef_atomically(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    compiled = backend.compile(model, tmp_path / "trial")
    assert compiled.path == tmp_path / "trial" / "model.hef"
    assert compiled.kind == "hef" and compiled.params["hef_target"] == "hailo8"
    assert compiled.size_bytes == compiled.path.stat().st_size
    assert hailo_fakes.platform.HEF(str(compiled.path)).get_network_group_names() == ["tiny"]
    assert [p.name for p in (tmp_path / "trial").iterdir() if p.name.startswith(".")] == []

    def fail_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("hailo_sweep.atomic.os.replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        backend.compile(model, tmp_path / "trial2")
    assert list((tmp_path / "trial2").iterdir()) == []  # neither a partial model.hef nor a temp file


# -- device --------------------------------------------------------------------------------------------------------------------
def compiled_model(backend: HailoBackend, tiny: TinyModel, tmp_path: Path, settings: Settings) -> tuple[OptimizedModel, CompiledModel]:
    model = optimized(backend, tiny, tmp_path, settings)
    return model, backend.compile(model, tmp_path / "trial")


def test_device_returns_raw_integers_and_dequantizes_with_the_hef_quant_info(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    settings = Settings(2, 1, 32, "model", ("logits",))
    model, compiled = compiled_model(backend, tiny_model, tmp_path, settings)
    x = tiny_model.feed(tiny_model.evaluation, "model")
    with backend.device(compiled) as runner:
        out = runner.run(x)
    assert out.raw["feat"].dtype == np.uint8 and out.raw["logits"].dtype == np.uint16
    assert out.raw["feat"].shape == (6, 2, 8, 8) and out.raw["logits"].shape == (6, 3)
    for name, info in hef_quant(hailo_fakes, compiled.path).items():
        expected = (out.raw[name].astype(np.float64) - info.qp_zp) * info.qp_scale
        np.testing.assert_allclose(out.outputs[name], expected, rtol=1e-6, atol=1e-7)
        assert (out.quant[name].scale, out.quant[name].zero_point) == (info.qp_scale, info.qp_zp)
    emulated = backend.emulate(model, x, EmulationContext.BIT_EXACT)
    for name in ("feat", "logits"):
        np.testing.assert_array_equal(out.outputs[name], emulated[name])  # the fake chip is bit-exact
    assert out.metrics["frames"] == 6 and out.metrics["throughput_fps"] > 0 and out.metrics["latency_ms"] > 0
    assert any("InferModel" in n for n in out.notes)
    assert hailo_fakes.system.in_use == set()


def test_device_quantizes_normalized_inputs_like_hailort(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "host"))
    x = tiny_model.feed(tiny_model.evaluation, "host")
    with backend.device(compiled) as runner:
        out = runner.run(x)
    assert any("input quantized on the host" in n for n in out.notes)
    emulated = backend.emulate(model, x, EmulationContext.BIT_EXACT)
    for name in ("feat", "logits"):
        np.testing.assert_array_equal(out.outputs[name], emulated[name])


def test_multiple_quant_infos_fall_back_to_float32(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, extra_model_script=["model_optimization_config(globals, output_encoding_vector=enabled)"])
    model, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    hef = hailo_fakes.platform.HEF(str(compiled.path))
    assert all(i.quant_info.qp_scale == 0 and i.quant_info.qp_zp == 0 for i in hef.get_output_vstream_infos())
    x = tiny_model.feed(tiny_model.evaluation, "model")
    with backend.device(compiled) as runner:
        out = runner.run(x)
    assert out.raw == {} and out.quant == {}
    fallbacks = [n for n in out.notes if n.startswith("float32 fallback")]
    assert len(fallbacks) == 2 and "2 quant infos" in " ".join(fallbacks) and "3 quant infos" in " ".join(fallbacks)
    emulated = backend.emulate(model, x, EmulationContext.BIT_EXACT)
    for name in ("feat", "logits"):
        np.testing.assert_allclose(out.outputs[name], emulated[name], atol=1e-6)


def test_infervstreams_fallback_gives_the_same_outputs(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model", ("feat",)))
    x = tiny_model.feed(tiny_model.evaluation, "model")
    with backend.device(compiled) as runner:
        first = runner.run(x)
    monkeypatch.delattr(hailo_fakes.pyhailort.VDevice, "create_infer_model")
    with backend.device(compiled) as runner:
        second = runner.run(x)
    assert any("InferVStreams" in n for n in second.notes)
    assert not any("InferVStreams" in n for n in first.notes)
    for name in ("feat", "logits"):
        assert second.raw[name].dtype == first.raw[name].dtype
        np.testing.assert_array_equal(second.raw[name], first.raw[name])
    assert second.metrics["throughput_fps"] > 0


def test_outputs_map_through_the_hn_when_the_hef_has_no_original_names(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model", ("logits",)))

    def missing(self: object, vstream_name: str, network_group_name: str | None = None) -> list[str]:
        raise hailo_fakes.pyhailort.HailoRTNotFoundException("Item not found")

    monkeypatch.setattr(hailo_fakes.pyhailort.HEF, "get_original_names_from_vstream_name", missing)
    with backend.device(compiled) as runner:
        out = runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    assert out.raw["logits"].dtype == np.uint16 and out.raw["feat"].dtype == np.uint8


def test_target_mismatch_is_refused_before_running(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    hailo_fakes.system.devices = {DEVICE: "HAILO8L"}
    backend = make_backend(tiny_model, tmp_path)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    with pytest.raises(UserInputError) as info:
        with backend.device(compiled):
            pass
    message = str(info.value)
    assert info.value.key == "target"
    assert "compiled for hailo8 (Hailo-8)" in message and "is a Hailo-8L" in message and "target: hailo8l" in message
    assert hailo_fakes.system.vdevices_opened == 0  # refused before any VDevice was opened
    lock = DeviceLock(tmp_path / "sweep" / "locks", DEVICE)
    assert lock.try_acquire()  # and the lock was released
    lock.release()


def test_hailo8l_hef_runs_on_a_hailo8_with_a_note(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, target="hailo8l")
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    with backend.device(compiled) as runner:
        out = runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    assert any("lower performance" in n for n in out.notes)


def test_device_locked_by_another_process_gives_a_clear_error(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, device_stage_timeout_s=0.5)  # waits 80 % of it, then says why
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    proc = hold_device_lock(DeviceLock(tmp_path / "sweep" / "locks", DEVICE).path)
    try:
        with pytest.raises(HailoDeviceError) as info:
            with backend.device(compiled):
                pass
        message = str(info.value)
        assert DEVICE in message and "still in use by another process after waiting 0.4 s" in message and f"pid {proc.pid}" in message
        assert hailo_fakes.system.vdevices_opened == 0
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    with backend.device(compiled) as runner:  # free again once the other process is gone
        assert runner.run(tiny_model.feed(tiny_model.evaluation[:1], "model")).outputs["feat"].shape == (1, 2, 8, 8)


def test_one_device_per_runner_and_selection_order(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hailo_fakes.system.devices = {"0000:01:00.0": "HAILO8", "0000:02:00.0": "HAILO8"}
    backend = make_backend(tiny_model, tmp_path, device_stage_timeout_s=0.5)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    with backend.device(compiled) as first, backend.device(compiled) as second:
        assert (first.device_id, second.device_id) == ("0000:01:00.0", "0000:02:00.0")  # scan order, first free
        with pytest.raises(HailoDeviceError, match="all 2 Hailo devices"):
            backend.device(compiled).activate()

    monkeypatch.setenv(ENV_DEVICE_ID, "0000:02:00.0")
    with backend.device(compiled) as runner:
        assert runner.device_id == "0000:02:00.0"
    pinned = make_backend(tiny_model, tmp_path, device_id="0000:01:00.0")
    pinned.prepare()
    with pinned.device(compiled) as runner:  # the config's device_id wins over the environment
        assert runner.device_id == "0000:01:00.0"


@pytest.mark.parametrize("failure", ["timeout", "driver"])
def test_device_error_fails_with_reason_and_releases_everything(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, failure: str
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    hailo_fakes.system.fail_on_infer = failure
    runner = backend.device(compiled)
    runner.activate()
    assert hailo_fakes.system.in_use == {DEVICE}
    with pytest.raises(HailoDeviceError) as info:
        runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    expected = "HailoRTTimeout" if failure == "timeout" else "HailoRTDriverOperationFailedException"
    assert expected in str(info.value) and DEVICE in str(info.value) and "released" in str(info.value)
    assert hailo_fakes.system.in_use == set()
    lock = DeviceLock(tmp_path / "sweep" / "locks", DEVICE)
    assert lock.try_acquire()
    lock.release()
    with pytest.raises(HailoDeviceError, match="not active"):
        runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    runner.deactivate()  # safe to call again


# -- facts, validation, availability ---------------------------------------------------------------------------------------
def test_validate_defaults_and_versions(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    assert backend.default_settings(1000, ("feat", "logits")) == Settings(2, 1, 64, "model", ())
    assert backend.default_settings(10, ("feat", "logits")).calibset_size == 10
    assert backend.versions() == {"hailo_sdk_client": "3.33.0", "hailo_platform": "4.23.0"}
    backend.validate(Settings(4, 5, 1, "host", ("feat", "logits")))
    with pytest.raises(UnsupportedSetting, match="valid outputs: feat, logits"):
        backend.validate(Settings(2, 1, 64, "model", ("scores",)))
    with pytest.raises(UnsupportedSetting, match="hailo8, hailo8l, hailo10h"):
        make_backend(tiny_model, tmp_path, target="hailo15h").validate(Settings(2, 1, 64, "model"))


def test_missing_packages_raise_backend_unavailable_with_install_hint(
    tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    purge_fake_modules()
    monkeypatch.setitem(sys.modules, "hailo_sdk_client", None)  # import fails as if the wheel were not installed
    monkeypatch.setitem(sys.modules, "hailo_platform", None)
    assert HailoBackend.is_available() is False
    backend = HailoBackend(tiny_model.context(tmp_path))
    with pytest.raises(BackendUnavailable) as info:
        backend.activate()
    message = str(info.value)
    assert "'hailo_sdk_client'" in message and "hailo-dataflow-compiler" in message and "is not installed" in message
    assert "Developer Zone" in message and "backend: onnxruntime" in message
    assert backend.versions() == {"hailo_sdk_client": "not installed", "hailo_platform": "not installed"}


def test_missing_hailort_is_reported_at_the_device_stage(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    _, compiled = compiled_model(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"))
    monkeypatch.setitem(sys.modules, "hailo_platform", None)
    with pytest.raises(BackendUnavailable) as info:
        backend.device(compiled)
    assert "'hailo_platform'" in str(info.value) and "HailoRT" in str(info.value) and "hailort-" in str(info.value)


def test_broken_hailort_install_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hailo_sweep.backends.hailo._imports import import_hailort

    package = tmp_path / "broken" / "hailo_platform"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("_pyhailort version (4.20.0) does not match pyhailort version (4.23.0)")\n')
    purge_fake_modules()
    monkeypatch.syspath_prepend(str(tmp_path / "broken"))
    try:
        with pytest.raises(BackendUnavailable) as info:
            import_hailort()
    finally:
        purge_fake_modules()
    assert "is installed but failed to import" in str(info.value) and "does not match" in str(info.value)


# -- the whole sweep on the fakes -------------------------------------------------------------------------------------------
def script_artifact(client: object, run_id: str, dst: Path) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, "model_script.alls", str(dst))).read_text()  # type: ignore[attr-defined]


def test_whole_sweep_runs_on_the_hailo_backend(hailo_fakes: FakeHailo, write_config: Callable[..., Path], tmp_path: Path) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from hailo_sweep.config import load_config
    from hailo_sweep.stores import resolve_stores
    from hailo_sweep.sweep import Sweep

    search = {
        "optimization_level": [1, 2],
        "compression_level": [0],
        "calibset_size": [64],
        "normalization_placement": ["host", "model"],
        "output_16bit": ["logits"],
        "noisy_layers_16bit": [1],
    }
    path = write_config(backend="hailo", trials=4, search=search, sampler={"name": "grid", "seed": 0}, diagnostics={"layer_noise": "per_trial"})
    cfg = load_config(path)
    Sweep(cfg).run()
    stores = resolve_stores(cfg)
    trials = optuna.load_study(study_name=cfg.name, storage=stores.optuna_url).get_trials(deepcopy=False)
    client = MlflowClient(stores.mlflow_uri)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs.get("error") for t in trials]
    seen = set()
    for t in trials:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["hailo_sweep.backend"] == "hailo"
        level = t.params["optimization_level"]
        seen.add((level, t.params["normalization_placement"]))
        # the whole 1024-entry calibration file reaches optimize(); calibset_size=64 is in the script: level 2 is honoured
        assert int(run.data.params["effective_optimization_level"]) == level
        assert "optimization_level_lowered" not in run.data.tags.get("hailo_sweep.flags", "")
        assert (run.data.params["calibration_entries_given"], run.data.params["calibration_entries_used"]) == ("1024", "64")
        assert "model_optimization_config(calibration, calibset_size=64)" in script_artifact(client, run.info.run_id, tmp_path / f"s-{run.info.run_id}")
        # the device is compared with bit-exact emulation (equal to the HEF); the quantized emulation's drift apart
        assert run.data.params["agreement_reference"] == "bit_exact"
        assert run.data.metrics["agreement.total.identical_share"] == 1.0 and run.data.metrics["findings.device_disagrees"] == 0
        assert 0.9 < run.data.metrics["emulation_drift.total.identical_share"] < 1.0
        assert run.data.metrics["device.throughput_fps"] > 0 and run.data.metrics["device.retries"] == 0
        assert "model_script.alls" in {a.path for a in client.list_artifacts(run.info.run_id)}
        logs = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
        assert logs == {"logs/compile.log", "logs/optimize.log"}  # the DFC's own words, kept with the trial
        optimize_log = Path(client.download_artifacts(run.info.run_id, "logs/optimize.log", str(tmp_path / f"l-{run.info.run_id}"))).read_text()
        assert "Using dataset with 64 entries for calibration" in optimize_log
        assert run.data.metrics["device.logits.snr_db"] > 20  # a sweep on the fakes measures real, small errors
        promoted = run.data.params["hailo.noisy_layers"]  # one hidden layer of the digits CNN, never an output's
        assert len(promoted.split(",")) == 1 and f"quantization_param({promoted}, precision_mode=a16_w16)" in script_artifact(client, run.info.run_id, tmp_path / run.info.run_id)
        assert 0 < run.data.metrics["layer_noise.worst1_snr_db"] <= run.data.metrics["layer_noise.worst2_snr_db"]
    assert seen == {(1, "host"), (1, "model"), (2, "host"), (2, "model")}


@pytest.mark.parametrize(("knob", "value"), [("weights_granularity", "per_tensor"), ("calibration_method", "entropy")])
def test_knob_values_without_a_dfc_equivalent_are_refused(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, knob: str, value: str) -> None:
    backend = make_backend(tiny_model, tmp_path)
    with pytest.raises(UnsupportedSetting) as info:
        backend.validate(Settings(2, 0, 32, "model", **{knob: value}))  # type: ignore[arg-type]
    assert info.value.key == f"search.{knob}"
    backend.validate(Settings(2, 0, 32, "model", weights_granularity="per_channel", calibration_method="percentile", finetune="enabled"))


def test_clipping_scope_names_the_hn_layers(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    # the tiny model's HN: input_layer1 -> conv1 (output "feat") -> ... -> fc1 (output "logits")
    backend = make_backend(tiny_model, tmp_path)
    expected = {"first": "layers=[conv1]", "outputs": "layers=[conv1, fc1]", "all": "layers={*}"}
    for scope, layers in expected.items():
        settings = Settings(2, 0, 32, "model", calibration_method="percentile", clipping_percentile=99.9, clipping_scope=scope)  # type: ignore[arg-type]
        script = backend.script_for(settings)
        assert f"pre_quantization_optimization(activation_clipping, {layers}, mode=percentile, clipping_values=[0.1, 99.9])" in script
    model = optimized(backend, tiny_model, tmp_path, Settings(2, 0, 32, "model", all_16bit="all", bias_correction="disabled"))
    assert "quantization_param({*}, precision_mode=a16_w16)" in model.script  # the fake DFC parsed and ran it
    assert "post_quantization_optimization(bias_correction, policy=disabled)" in model.script
