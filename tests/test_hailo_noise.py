"""Per-layer noise on the ``hailo`` backend: the fake's ``analyze_noise``, ``HailoBackend.layer_noise`` and the
``noisy_layers_16bit`` knob (ranking once per sweep, a16_w16 lines in the model script).

Expected values come from elsewhere than the code under test: SNRs estimated with the uniform-quantization-noise model
(step**2 / 12 per rounded value) on float tensors read with onnxruntime, SNRs of the emulator's public outputs against
the ONNX model, the noisiest layer read through the fake SDK's own API, and the 48 dB that 8 more bits are worth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hailo_fixtures import FakeHailo, TinyModel, deep_model, hailo_fakes, tiny_model  # noqa: F401 - fixtures
from onnx import TensorProto, helper

from hailo_sweep.backends.base import EmulationContext, OptimizedModel
from hailo_sweep.backends.hailo import compiler, noise
from hailo_sweep.backends.hailo.backend import HailoBackend
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.settings import Settings

SNR = "layer_noise_analysis/snr"
PARTIAL = "layer_noise_analysis/partial_snr"
HIDDEN = {"deep/conv1", "deep/ew_mult1", "deep/avgpool1"}  # the deep model's layers between input and outputs
BITS_GAIN_DB = 20 * np.log10(65535 / 255)  # 8 more bits on the same range: the step shrinks 257x (48.2 dB)


def nhwc(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw.transpose(0, 2, 3, 1).astype(np.float32))


def make_backend(model: TinyModel, tmp_path: Path, **options: object) -> HailoBackend:
    backend = HailoBackend(model.context(tmp_path / "sweep", **options))
    backend.activate()
    return backend


def optimize(backend: HailoBackend, model: TinyModel, tmp_path: Path, settings: Settings, name: str) -> OptimizedModel:
    calib = model.feed(model.calibration[: settings.calibset_size], settings.normalization_placement)
    return backend.optimize(settings, calib, tmp_path / name)


def fake_runner(fakes: FakeHailo, model: TinyModel, *lines: str) -> Any:
    """A runner of the fake SDK, quantized at level 0 with the model's normalization in the script."""
    runner = fakes.sdk.ClientRunner(hw_arch="hailo8")
    runner.translate_onnx_model(str(model.path), "deep")
    script = ["normalization1 = normalization([100.0], [50.0])", "model_optimization_flavor(optimization_level=0, compression_level=0)", *lines]
    runner.load_model_script("\n".join(script))
    runner.optimize(nhwc(model.calibration))
    return runner


def float_tensor(model: TinyModel, tensor: str, raw: np.ndarray) -> np.ndarray:
    """An intermediate tensor of the ONNX model on host-normalized ``raw`` frames, straight from onnxruntime."""
    proto = onnx.load(str(model.path))
    proto.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([tensor], {"image": model.normalization.apply(raw)})[0]


def uniform_noise_snr(values: np.ndarray, lo: float, hi: float, bits: int) -> float:
    """SNR (dB) of rounding ``values`` to a ``bits``-bit grid over [min(lo, 0), max(hi, 0)], by the step**2/12 model.

    Values that are exactly 0 (ReLU) sit on the grid (the zero point) and add no noise.
    """
    step = (max(hi, 0.0) - min(lo, 0.0)) / ((1 << bits) - 1)
    noise = np.count_nonzero(values) * step**2 / 12
    return float(10 * np.log10(np.sum(values.astype(np.float64) ** 2) / noise))


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test.astype(np.float64)) ** 2)))


# -- the fake's analyze_noise ---------------------------------------------------------------------------------------------
def test_fake_analyze_noise_follows_the_documented_call(hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path) -> None:
    sdk = hailo_fakes.sdk
    parsed = sdk.ClientRunner(hw_arch="hailo8")
    parsed.translate_onnx_model(str(deep_model.path), "deep")
    with pytest.raises(RuntimeError, match="quantized"):
        parsed.analyze_noise(nhwc(deep_model.calibration))
    runner = fake_runner(hailo_fakes, deep_model)
    x = nhwc(deep_model.calibration)
    with pytest.raises(TypeError):
        runner.analyze_noise(x, data_count=8, batchsize=2)
    with pytest.raises(ValueError, match="analyze_mode"):
        runner.analyze_noise(x, analyze_mode="full")
    with pytest.raises(ValueError, match="NHWC"):
        runner.analyze_noise(deep_model.calibration.astype(np.float32))

    assert runner.analyze_noise(x, data_count=16, batch_size=2) is None  # default mode: simple -> partial_snr only
    stats = runner.get_params_statistics()
    layers = runner.get_hn()["layers"]
    assert all(isinstance(stats[name], dict) for name in layers)  # every HN layer is indexable (ACE inspector)
    assert set(stats["deep/ew_mult1"]) == {PARTIAL}
    value = stats["deep/ew_mult1"][PARTIAL]
    assert value.shape == (1,) and value.dtype == np.float32
    assert stats.get(f"deep/ew_mult1/{PARTIAL}") is not None and float(stats.get(f"deep/ew_mult1/{PARTIAL}")[0]) == float(value[0])

    runner.analyze_noise(dataset=x, data_count=16, batch_size=2, analyze_mode="advanced")
    assert set(runner.get_params_statistics()["deep/ew_mult1"]) == {SNR, PARTIAL}
    runner.save_har(str(tmp_path / "lat.har"))  # results are stored in the HAR (hailo-api.md §1.8)
    reloaded = sdk.ClientRunner(har=str(tmp_path / "lat.har")).get_params_statistics()
    assert float(reloaded["deep/ew_mult1"][SNR][0]) == float(runner.get_params_statistics()["deep/ew_mult1"][SNR][0])
    runner.compile()
    runner.analyze_noise(x, data_count=8, batch_size=8)  # a compiled runner still has its quantized parameters
    assert sdk.ClientRunner.analyze_noise_calls == 3


def test_fake_partial_snr_matches_the_uniform_noise_model_and_gains_48_db_at_16_bit(
    hailo_fakes: FakeHailo, deep_model: TinyModel
) -> None:
    a = float_tensor(deep_model, "a", deep_model.calibration)  # the output of deep/conv1 (conv + relu)
    measured = {}
    for bits, lines in ((8, ()), (16, ("quantization_param(conv1, precision_mode=a16_w16)",))):
        runner = fake_runner(hailo_fakes, deep_model, *lines)
        runner.analyze_noise(nhwc(deep_model.calibration), data_count=48, batch_size=8)
        measured[bits] = float(runner.get_params_statistics()["deep/conv1"][PARTIAL][0])
        expected = uniform_noise_snr(a, float(a.min()), float(a.max()), bits)  # ranges from the same 48 frames
        assert measured[bits] == pytest.approx(expected, abs=0.5)
    assert measured[16] - measured[8] == pytest.approx(BITS_GAIN_DB, abs=1.0)


# -- HailoBackend.layer_noise ----------------------------------------------------------------------------------------------
def test_layer_noise_returns_sorted_finite_snrs_named_by_the_hn(hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(deep_model, tmp_path)
    model = optimize(backend, deep_model, tmp_path, Settings(2, 1, 48, "model"), "trial")
    x = deep_model.feed(deep_model.evaluation, "model")
    rows = backend.layer_noise(model, x)

    names = [r.layer for r in rows]
    assert len(names) == len(set(names))
    assert set(names) == HIDDEN | {"deep/input_layer1", "feat", "logits"}
    assert {r.layer for r in rows if r.kind == "output"} == {"feat", "logits"}
    assert all(np.isfinite(r.snr_db) for r in rows)
    assert [r.snr_db for r in rows] == sorted(r.snr_db for r in rows)
    by_name = {r.layer: r.snr_db for r in rows}
    assert by_name["deep/input_layer1"] == 200.0  # uint8 frames through the identity input QP: no noise (capped)

    # an output's SNR is the emulator's output against the float ONNX model, measured here through public APIs
    emulated = backend.emulate(model, x, EmulationContext.BIT_EXACT)
    sess = ort.InferenceSession(str(deep_model.path), providers=["CPUExecutionProvider"])
    reference = dict(zip(("feat", "logits"), sess.run(["feat", "logits"], {"image": deep_model.normalization.apply(deep_model.evaluation)}), strict=True))
    for name in ("feat", "logits"):
        assert by_name[name] == pytest.approx(snr_db(reference[name], emulated[name]), abs=0.01)


def test_layer_noise_reads_partial_snr_when_analyze_mode_is_not_offered(
    hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner_cls = hailo_fakes.sdk.ClientRunner
    original = runner_cls.analyze_noise
    calls: list[dict[str, Any]] = []

    def older_analyze_noise(self: Any, dataset: Any, data_count: int | None = None, batch_size: int = 1) -> None:
        calls.append({"data_count": data_count, "batch_size": batch_size})
        original(self, dataset, data_count=data_count, batch_size=batch_size)  # the fake's default: simple mode

    monkeypatch.setattr(runner_cls, "analyze_noise", older_analyze_noise)
    backend = make_backend(deep_model, tmp_path)
    model = optimize(backend, deep_model, tmp_path, Settings(2, 1, 48, "model"), "trial")
    rows = backend.layer_noise(model, deep_model.feed(deep_model.evaluation, "model"))
    assert calls == [{"data_count": 6, "batch_size": 6}]
    assert HIDDEN <= {r.layer for r in rows}


def test_sdk_failures_of_the_analysis_are_explained(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = optimize(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"), "trial")
    x = tiny_model.feed(tiny_model.evaluation, "model")
    runner_cls = hailo_fakes.sdk.ClientRunner

    def out_of_memory(self: Any, dataset: Any, data_count: int | None = None, batch_size: int = 1, analyze_mode: str = "simple") -> None:
        raise MemoryError("GPU ran out of memory")

    monkeypatch.setattr(runner_cls, "analyze_noise", out_of_memory)
    with pytest.raises(compiler.DfcError, match="analyze_noise failed: MemoryError: GPU ran out of memory"):
        backend.layer_noise(model, x)

    def silent(self: Any, dataset: Any, data_count: int | None = None, batch_size: int = 1, analyze_mode: str = "simple") -> None:
        return None  # ran, stored nothing

    monkeypatch.setattr(runner_cls, "analyze_noise", silent)
    with pytest.raises(noise.LayerNoiseError, match="holds no 'layer_noise_analysis/snr'"):
        backend.layer_noise(model, x)


# -- noisy_layers_16bit ---------------------------------------------------------------------------------------------------
def noisiest_hidden_by_the_sdk(fakes: FakeHailo, model: TinyModel) -> str:
    """The lowest-SNR hidden layer of a level-0 quantization, read through the fake SDK's API (advanced analysis)."""
    runner = fake_runner(fakes, model)
    data = nhwc(model.calibration[:32])
    runner.analyze_noise(data, data_count=len(data), batch_size=8, analyze_mode="advanced")
    stats = runner.get_params_statistics()
    return min(HIDDEN, key=lambda layer: float(stats[layer][SNR][0]))


def test_noisy_layers_16bit_promotes_the_noisiest_hidden_layer(hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path) -> None:
    expected = noisiest_hidden_by_the_sdk(hailo_fakes, deep_model)
    assert expected == "deep/ew_mult1"  # the heavy-tailed square, as the model was built to have (see its docstring)

    backend = make_backend(deep_model, tmp_path)
    base = optimize(backend, deep_model, tmp_path, Settings(2, 1, 32, "model"), "k0")
    promoted = optimize(backend, deep_model, tmp_path, Settings(2, 1, 32, "model", (), 1), "k1")
    sixteen = [line for line in promoted.script.splitlines() if "a16_w16" in line]
    assert sixteen == ["quantization_param(ew_mult1, precision_mode=a16_w16)"]
    assert "a16_w16" not in base.script and "hailo.noisy_layers" not in base.params
    assert promoted.params["hailo.noisy_layers"] == "ew_mult1"

    x = deep_model.feed(deep_model.calibration[:32], "model")
    before = {r.layer: r.snr_db for r in backend.layer_noise(base, x)}
    after = {r.layer: r.snr_db for r in backend.layer_noise(promoted, x)}
    assert after["deep/ew_mult1"] > before["deep/ew_mult1"] + 3.0
    assert after["deep/conv1"] == pytest.approx(before["deep/conv1"], abs=1e-6)  # layers before it are untouched


def test_noise_ranking_is_computed_once_per_sweep_and_placement(hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path) -> None:
    runner_cls = hailo_fakes.sdk.ClientRunner
    backend = make_backend(deep_model, tmp_path)
    first = optimize(backend, deep_model, tmp_path, Settings(2, 1, 32, "model", (), 1), "t1")
    assert runner_cls.analyze_noise_calls == 1
    second = optimize(backend, deep_model, tmp_path, Settings(1, 0, 16, "model", (), 2), "t2")
    optimize(backend, deep_model, tmp_path, Settings(2, 1, 32, "model", ("logits",), 5), "t3")
    assert runner_cls.analyze_noise_calls == 1  # ranked once: later trials, other k, other knobs reuse it
    assert first.params["hailo.noisy_layers"] == "ew_mult1"
    assert second.params["hailo.noisy_layers"].split(",")[0] == "ew_mult1" and len(second.params["hailo.noisy_layers"].split(",")) == 2
    caches = list((tmp_path / "sweep" / "hailo").glob("noise-ranking-*.json"))
    assert len(caches) == 1

    other_worker = make_backend(deep_model, tmp_path)  # a new backend instance on the same sweep directory
    optimize(other_worker, deep_model, tmp_path, Settings(2, 1, 32, "model", (), 1), "t4")
    assert runner_cls.analyze_noise_calls == 1
    optimize(other_worker, deep_model, tmp_path, Settings(2, 1, 32, "host", (), 1), "t5")
    assert runner_cls.analyze_noise_calls == 2  # another placement is another level-0 model
    assert len(list((tmp_path / "sweep" / "hailo").glob("noise-ranking-*.json"))) == 2


def test_k_beyond_the_hidden_layers_promotes_them_all_and_negative_k_is_refused(
    hailo_fakes: FakeHailo, deep_model: TinyModel, tmp_path: Path
) -> None:
    backend = make_backend(deep_model, tmp_path)
    for k in (0, 1, 50):
        backend.validate(Settings(2, 1, 32, "model", (), k))
    model = optimize(backend, deep_model, tmp_path, Settings(2, 1, 32, "model", ("feat", "logits"), 50), "all")
    promoted = str(model.params["hailo.noisy_layers"]).split(",")
    assert sorted(promoted) == ["avgpool1", "conv1", "ew_mult1"]  # hidden layers only: outputs are output_16bit's
    lines = [line for line in model.script.splitlines() if "a16_w16" in line]
    assert len(lines) == 5  # two outputs + three hidden layers, each named once
    settings = Settings(2, 1, 32, "model")
    object.__setattr__(settings, "noisy_layers_16bit", -1)  # Settings refuses it itself; validate must too
    with pytest.raises(UnsupportedSetting, match="noisy_layers_16bit must be >= 0"):
        backend.validate(settings)


def test_a_dfc_without_the_analysis_says_so(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = optimize(backend, tiny_model, tmp_path, Settings(2, 1, 32, "model"), "trial")
    monkeypatch.delattr(hailo_fakes.sdk.ClientRunner, "analyze_noise")
    with pytest.raises(NotImplementedError, match="no ClientRunner.analyze_noise"):  # the pipeline notes it and goes on
        backend.layer_noise(model, tiny_model.feed(tiny_model.evaluation, "model"))
    backend.validate(Settings(2, 1, 32, "model", (), 0))
    with pytest.raises(UnsupportedSetting) as info:
        backend.validate(Settings(2, 1, 32, "model", (), 1))
    assert info.value.key == "search.noisy_layers_16bit" and "analyze_noise" in str(info.value)
