"""Tests for the diagnosis building blocks: the checks (findings), the error ladder, the plots and the HTML report.

Each check gets a test that injects exactly one mistake into an otherwise clean run and asserts that exactly that
finding comes back (naming the output where there is one), and one clean run of the real embedded backend on the
digits example produces no finding at all. Real data: the digits example frames, the float ONNX model run here with
ONNX Runtime as the reference, and raw outputs of the onnxruntime backend's device runner (uint8 featmap, uint16
logits with Settings(0, 0, 64, "host", ("logits",))). Ladder values are hand-made with hand-computed expectations.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hailo_sweep.backends.base import BackendContext, DeviceOutputs, LayerNoise, Normalization, QuantParams
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend
from hailo_sweep.data import feed
from hailo_sweep.diagnose import findings as fd
from hailo_sweep.diagnose import stats as stats_mod
from hailo_sweep.diagnose.findings import FINDING_CODES, Evidence, Finding, run_all
from hailo_sweep.diagnose.ladder import dominant_step, explain, ladder_steps
from hailo_sweep.diagnose.plots import ladder_plot, layer_noise_plot, lsb_histogram_plot
from hailo_sweep.diagnose.report import render_report, write_report
from hailo_sweep.examples import digits
from hailo_sweep.model_io import read_model_io
from hailo_sweep.settings import Settings

MODEL = Path(__file__).resolve().parents[1] / "configs" / "models" / "digits_cnn.onnx"
NORM = Normalization(mean=(digits.MEAN,), std=(digits.STD,))
DOMAIN = (0.0, 255.0)
SETTINGS = Settings(0, 0, 64, "host", ("logits",))
N_EVAL = 128
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -------------------------------------------------------------------------------------------------------------
# a clean run of the embedded backend on the digits example
# -------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    calibration_raw: np.ndarray  # (64, 1, 96, 128) uint8: the frames the trial calibrated with
    evaluation_raw: np.ndarray  # (N_EVAL, 1, 96, 128) uint8
    stored_shape: tuple[int, ...]  # the evaluation array as stored on disk (NHWC)
    reference: dict[str, np.ndarray]  # float ONNX outputs, computed here
    device: DeviceOutputs
    repeat: DeviceOutputs  # the same inputs a second time


@pytest.fixture(scope="module")
def run(digits_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Run:
    calib = np.load(digits_data["calibration"])[: SETTINGS.calibset_size].transpose(0, 3, 1, 2).copy()
    with np.load(digits_data["evaluation"]) as npz:
        stored = npz["x"][:N_EVAL]
    evaluation = stored.transpose(0, 3, 1, 2).copy()
    root = tmp_path_factory.mktemp("diagnose")
    backend = OnnxRuntimeBackend(
        BackendContext(MODEL, "hailo8l", root / "work", read_model_io(MODEL), NORM, DOMAIN)
    )
    backend.prepare()
    optimized = backend.optimize(SETTINGS, feed(calib, "host", NORM, DOMAIN), root / "trial")
    compiled = backend.compile(optimized, root / "trial")
    fed = feed(evaluation, "host", NORM, DOMAIN)
    with backend.device(compiled) as runner:
        first, second = runner.run(fed), runner.run(fed)
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    ref = dict(zip(["featmap", "logits"], sess.run(["featmap", "logits"], {"input": fed})))
    return Run(calib, evaluation, tuple(stored.shape), ref, first, second)


# Emulator vs device numbers inside the default tolerances (max 1 LSB, >= 99 % identical).
CLEAN_AGREEMENT = {
    "agreement.featmap.lsb_max": 1.0,
    "agreement.featmap.lsb_p99": 0.0,
    "agreement.featmap.identical_share": 0.998,
    "agreement.logits.lsb_max": 1.0,
    "agreement.logits.lsb_p99": 0.0,
    "agreement.logits.identical_share": 0.995,
}


@pytest.fixture(scope="module")
def clean(run: Run) -> Evidence:
    """Evidence of a correct host-normalized run: every check has what it needs."""
    return Evidence(
        fed=feed(run.evaluation_raw, "host", NORM, DOMAIN),
        placement="host",
        normalization=NORM,
        domain=DOMAIN,
        expected_input_dtype="float32",
        data_shape=run.stored_shape,
        model_input_shape=read_model_io(MODEL).input_shape,
        declared_layout="NHWC",
        candidate=run.device.outputs,
        reference=run.reference,
        raw=run.device.raw,
        quant=run.device.quant,
        requested_optimization_level=SETTINGS.optimization_level,
        params={"effective_optimization_level": SETTINGS.optimization_level},
        flags=[],
        calibration=run.calibration_raw,
        evaluation=run.evaluation_raw,
        metrics=CLEAN_AGREEMENT,
        outputs=("featmap", "logits"),
        repeat=(run.device.raw, run.repeat.raw),
    )


def test_the_clean_run_is_what_the_injections_assume(run: Run) -> None:
    """Facts the injections rely on: uint8 featmap and uint16 logits, with dequantized outputs near the float model."""
    assert run.device.raw["featmap"].dtype == np.uint8 and run.device.quant["featmap"].bits == 8
    assert run.device.raw["logits"].dtype == np.uint16 and run.device.quant["logits"].bits == 16
    for name, ref in run.reference.items():
        err = np.abs(run.device.outputs[name] - ref).mean() / np.abs(ref).mean()
        assert err < 0.05, name


def test_a_clean_run_produces_no_finding(clean: Evidence) -> None:
    assert run_all(clean) == []


def test_a_clean_model_placement_run_produces_no_finding(run: Run) -> None:
    """Raw uint8 frames to a model that normalizes inside: neither normalization nor input-type findings."""
    evidence = Evidence(fed=feed(run.evaluation_raw, "model", NORM, DOMAIN), placement="model", normalization=NORM, domain=DOMAIN, expected_input_dtype="uint8")
    assert evidence.fed is not None and evidence.fed.dtype == np.uint8
    assert run_all(evidence) == []


def test_run_all_skips_checks_without_evidence() -> None:
    assert run_all(Evidence()) == []


# -------------------------------------------------------------------------------------------------------------
# one injected mistake -> exactly that finding
# -------------------------------------------------------------------------------------------------------------


def _flip_one_byte(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in arrays.items()}
    flat = out[name].reshape(-1)
    flat[7] = flat[7] ^ 1
    return out


Injection = Callable[[Run, Evidence], dict[str, object]]

INJECTIONS: dict[str, tuple[Injection, str, str | None]] = {
    # id: (changes to the clean evidence, expected code, expected output)
    "raw frames fed to a host-normalized model": (
        lambda r, e: {"fed": r.evaluation_raw.astype(np.float32)},
        "normalization_missed",
        None,
    ),
    "host code normalizes data that is already normalized": (
        lambda r, e: {"fed": NORM.apply(feed(r.evaluation_raw, "host", NORM, DOMAIN))},
        "normalization_twice",
        None,
    ),
    "normalized data fed to a model that normalizes inside": (
        lambda r, e: {"placement": "model"},
        "normalization_twice",
        None,
    ),
    "frames scaled to [0, 1] fed to a uint8 model": (
        lambda r, e: {"placement": "model", "expected_input_dtype": "uint8", "fed": r.evaluation_raw.astype(np.float32) / 255.0},
        "float_for_uint8",
        None,
    ),
    "raw float frames fed to a uint8 model": (
        lambda r, e: {"placement": "model", "expected_input_dtype": "uint8", "fed": r.evaluation_raw.astype(np.float32)},
        "float_for_uint8",
        None,
    ),
    "frames scaled to [0, 1] fed to a float model taking 0-255": (
        lambda r, e: {"placement": "model", "expected_input_dtype": "float32", "fed": r.evaluation_raw.astype(np.float32) / 255.0},
        "float_for_uint8",
        None,
    ),
    "NHWC data declared NCHW": (lambda r, e: {"declared_layout": "NCHW"}, "layout_mixup", None),
    "raw uint8 featmap compared without dequantization": (
        lambda r, e: {"candidate": {**r.device.outputs, "featmap": r.device.raw["featmap"]}},
        "not_dequantized",
        "featmap",
    ),
    "raw uint16 logits cast to float and compared": (
        lambda r, e: {"candidate": {**r.device.outputs, "logits": r.device.raw["logits"].astype(np.float32)}},
        "not_dequantized",
        "logits",
    ),
    "16-bit logits truncated to uint8": (
        lambda r, e: {"raw": {**r.device.raw, "logits": r.device.raw["logits"].astype(np.uint8)}},
        "16bit_read_as_8bit",
        "logits",
    ),
    "16-bit logits buffer read as uint8 bytes": (
        lambda r, e: {"raw": {**r.device.raw, "logits": r.device.raw["logits"].view(np.uint8)}},
        "16bit_read_as_8bit",
        "logits",
    ),
    "16-bit logits read as 8-bit and widened": (
        lambda r, e: {"raw": {**r.device.raw, "logits": (r.device.raw["logits"] >> 8).astype(np.uint16)}},
        "16bit_read_as_8bit",
        "logits",
    ),
    "compiler lowered the level (recorded level)": (
        lambda r, e: {"requested_optimization_level": 2, "params": {"effective_optimization_level": 0}},
        "optimization_level_lowered",
        None,
    ),
    "compiler lowered the level (flag)": (
        lambda r, e: {"params": {}, "flags": ["optimization_level_lowered"]},
        "optimization_level_lowered",
        None,
    ),
    "calibrated with under-exposed frames": (
        lambda r, e: {"calibration": r.calibration_raw // 2},
        "calibration_range",
        None,
    ),
    "device 3 LSB off on logits": (
        lambda r, e: {"metrics": {**CLEAN_AGREEMENT, "agreement.logits.lsb_max": 3.0}},
        "device_disagrees",
        "logits",
    ),
    "device bit-identical on only 90 % of featmap": (
        lambda r, e: {"metrics": {**CLEAN_AGREEMENT, "agreement.featmap.identical_share": 0.9}},
        "device_disagrees",
        "featmap",
    ),
    "second device run differs in one featmap byte": (
        lambda r, e: {"repeat": (r.device.raw, _flip_one_byte(r.device.raw, "featmap"))},
        "nondeterministic",
        "featmap",
    ),
}


@pytest.mark.parametrize("mistake", list(INJECTIONS))
def test_an_injected_mistake_gives_exactly_its_finding(mistake: str, run: Run, clean: Evidence) -> None:
    inject, code, output = INJECTIONS[mistake]
    found = run_all(dataclasses.replace(clean, **inject(run, clean)))  # type: ignore[arg-type]
    assert [f.code for f in found] == [code]
    assert found[0].output == output
    assert found[0].code in FINDING_CODES
    assert found[0].title and found[0].message and found[0].fix
    if output is not None:
        assert f"'{output}'" in found[0].title


def test_every_finding_code_is_injected_at_least_once() -> None:
    # softmax_as_logits is a check of the model file, made once per sweep (tests/test_structural.py); normalization_unset
    # one of the float model on the data, once per sweep (tests/test_normalization_unset.py)
    injected = {code for _, code, _ in INJECTIONS.values()} | {"input_shape_mismatch", "softmax_as_logits", "normalization_unset"}
    assert injected == set(FINDING_CODES)


# -------------------------------------------------------------------------------------------------------------
# the numbers in the findings
# -------------------------------------------------------------------------------------------------------------


def test_not_dequantized_names_the_scale_and_zero_point(run: Run) -> None:
    q = run.device.quant["featmap"]
    found = fd.check_dequantized({"featmap": run.device.raw["featmap"]}, run.reference, run.device.quant)
    assert [f.output for f in found] == ["featmap"]
    assert f"{q.scale:.6g}" in found[0].fix and f"{q.zero_point:g}" in found[0].fix
    ref = run.reference["featmap"].astype(np.float64)
    expected = np.abs(ref - run.device.raw["featmap"]).mean() / np.abs(ref).mean()
    assert found[0].evidence["nmae_as_compared"] == pytest.approx(expected)


def test_uint16_read_as_byte_pairs_is_recognized(run: Run) -> None:
    pairs = run.device.raw["logits"].view(np.uint8)
    assert pairs.size == 2 * run.reference["logits"].size
    (found,) = fd.check_output_bits({"logits": pairs}, run.device.quant, run.reference)
    # re-read as pairs it is exactly the device's logits again, so the nmae is the device's own error
    ref = run.reference["logits"].astype(np.float64)
    expected = np.abs(ref - run.device.outputs["logits"]).mean() / np.abs(ref).mean()
    assert found.evidence["nmae_as_16bit_pairs"] == pytest.approx(expected, rel=1e-6)
    assert "byte pairs" in found.message


def test_16bit_values_that_really_fit_in_8_bits_are_not_flagged() -> None:
    """A 16-bit output that truly lies in 0..255 and matches the reference is fine."""
    q = QuantParams(scale=0.5, zero_point=0, dtype="uint16")
    raw = np.arange(0, 200, dtype=np.uint16).reshape(2, 100)
    assert fd.check_output_bits({"y": raw}, {"y": q}, {"y": q.dequantize(raw)}) == []
    assert fd.check_output_bits({"y": raw.astype(np.uint8)}, {"y": q}) != []


def test_calibration_coverage_reports_the_share_outside(run: Run) -> None:
    dim = run.calibration_raw // 2
    found = fd.check_calibration_coverage(dim, run.evaluation_raw)
    assert found is not None
    ev = run.evaluation_raw
    expected = (np.count_nonzero(ev > dim.max()) + np.count_nonzero(ev < dim.min())) / ev.size
    assert found.evidence["outside_share"] == pytest.approx(expected)
    assert f"{expected:.2%}" in found.message
    # the same data as its own calibration covers everything
    assert fd.check_calibration_coverage(ev, ev) is None


def test_calibration_coverage_is_per_channel() -> None:
    """Each channel within the global range but not within its own: only per-channel coverage sees it."""
    calib = np.zeros((4, 2, 3, 3), np.float32)
    calib[:, 0] = 0.0
    calib[:, 1] = 10.0
    calib[0, 0, 0, 0], calib[0, 1, 0, 0] = 1.0, 11.0  # channel ranges [0, 1] and [10, 11]
    evaluation = np.full((1, 2, 3, 3), 5.0, np.float32)  # inside [0, 11] globally, outside both channels
    found = fd.check_calibration_coverage(calib, evaluation)
    assert found is not None
    assert found.evidence["outside_share_global"] == 0.0
    assert found.evidence["outside_share"] == 1.0


def test_block_wise_statistics_match_whole_array_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large arrays are reduced in blocks; with tiny blocks the results must equal numpy on the whole array."""
    monkeypatch.setattr(stats_mod, "BLOCK_ELEMENTS", 100)
    rng = np.random.default_rng(1)
    x = rng.normal(50.0, 20.0, (37, 3, 8, 9)).astype(np.float32)
    whole = x.astype(np.float64)
    stats = stats_mod.moments(x)
    assert stats.mean == pytest.approx(whole.mean(), rel=1e-12) and stats.std == pytest.approx(whole.std(), rel=1e-12)
    assert (stats.min, stats.max) == (float(x.min()), float(x.max()))
    ref, cand = rng.normal(size=(37, 5)), rng.normal(size=(37, 5))
    assert stats_mod.nmae(ref, cand) == pytest.approx(np.abs(ref - cand).mean() / np.abs(ref).mean(), rel=1e-12)
    assert stats_mod.integral(np.rint(x)) and not stats_mod.integral(x)
    cal = x[:10]
    found = fd.check_calibration_coverage(cal, x)
    assert found is not None
    lo, hi = cal.min(axis=(0, 2, 3)).reshape(1, 3, 1, 1), cal.max(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    assert found.evidence["outside_share"] == pytest.approx(((x < lo) | (x > hi)).mean())
    assert found.evidence["outside_share_global"] == pytest.approx(((x < cal.min()) | (x > cal.max())).mean())


def test_normalization_check_stays_silent_when_it_cannot_tell() -> None:
    """mean 0 / std 1: raw and normalized data look the same, so no hypothesis wins."""
    x = np.random.default_rng(0).normal(0.0, 1.0, (8, 1, 16, 16)).astype(np.float32)
    identity = Normalization(mean=(0.0,), std=(1.0,))
    assert fd.check_normalization(x, "host", identity, (-10.0, 10.0)) is None
    assert fd.check_normalization(x, "model", identity, (-10.0, 10.0)) is None
    assert fd.check_normalization(x, "host", None, (-10.0, 10.0)) is None


def test_normalization_missed_reports_the_statistics(run: Run) -> None:
    raw = run.evaluation_raw.astype(np.float32)
    found = fd.check_normalization(raw, "host", NORM, DOMAIN)
    assert found is not None and found.code == "normalization_missed"
    assert found.evidence["fed_mean"] == pytest.approx(float(raw.astype(np.float64).mean()))
    assert found.evidence["fed_max"] == float(raw.max())


def test_float_for_uint8_on_host_placement_needs_an_integer_input() -> None:
    """Normalized floats in [0, 1] are legitimate for a float model normalized on the host."""
    x = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 1, 8, 8)
    assert fd.check_input_type(x, "float32", DOMAIN, raw_input=False) is None
    assert fd.check_input_type(x, "float32", DOMAIN, raw_input=True) is not None
    assert fd.check_input_type(x, "float32", (0.0, 1.0), raw_input=True) is None  # the raw domain is [0, 1]
    assert fd.check_input_type(x.astype(np.uint8), "uint8", DOMAIN) is None


def test_layout_checks() -> None:
    model = ("batch", 3, 32, 48)
    assert fd.check_layout((5, 3, 32, 48), model, "NCHW") is None
    assert fd.check_layout((5, 32, 48, 3), model, "NHWC") is None
    mixed = fd.check_layout((5, 32, 48, 3), model, "NCHW")
    assert mixed is not None and mixed.code == "layout_mixup" and "NHWC" in mixed.fix
    other = fd.check_layout((5, 3, 32, 48), model, "NHWC")
    assert other is not None and other.code == "layout_mixup" and "NCHW" in other.fix
    wrong = fd.check_layout((5, 64, 64, 3), model, "NHWC")
    assert wrong is not None and wrong.code == "input_shape_mismatch"
    assert fd.check_layout((5, 4, 4, 4), (1, 4, 4, 4), "NHWC") is None  # C == H == W: undecidable


def test_optimization_level_not_lowered() -> None:
    assert fd.check_optimization_level(2, {"effective_optimization_level": 2}, []) is None
    assert fd.check_optimization_level(1, {"effective_optimization_level": 2}, []) is None
    assert fd.check_optimization_level(2, {}, ()) is None
    found = fd.check_optimization_level(3, {"effective_optimization_level": 1, "calibration_entries_used": 64}, [])
    assert found is not None and found.evidence["effective"] == 1.0 and "64 calibration images" in found.message


def test_agreement_uses_the_configured_tolerances() -> None:
    metrics = {"agreement.y.lsb_max": 3.0, "agreement.y.identical_share": 0.97, "agreement.y.lsb_p99": 1.0}
    assert fd.check_agreement(metrics, ["y"], lsb_tolerance=3.0, identical_min=0.95) == []
    (warn,) = fd.check_agreement(metrics, ["y"], lsb_tolerance=2.0, identical_min=0.95)
    assert warn.severity == "warning" and warn.evidence["lsb_max"] == 3.0
    (err,) = fd.check_agreement(metrics, ["y"], lsb_tolerance=0.5, identical_min=0.95)
    assert err.severity == "error"  # even the 99th percentile is beyond the tolerance
    assert fd.check_agreement(metrics, ["other"]) == []


def test_determinism_counts_differing_elements(run: Run) -> None:
    assert fd.check_determinism(run.device.raw, run.repeat.raw) is None
    second = {k: v.copy() for k, v in run.device.raw.items()}
    second["logits"].reshape(-1)[:5] += 1
    found = fd.check_determinism(run.device.raw, second)
    assert found is not None and found.output == "logits" and found.evidence["logits.differing"] == 5.0
    missing = fd.check_determinism(run.device.raw, {"featmap": run.device.raw["featmap"]})
    assert missing is not None and "'logits'" in missing.message
    nan = np.array([np.nan, 1.0], np.float32)
    assert fd.check_determinism({"x": nan}, {"x": nan.copy()}) is None  # same bytes, even NaN


# -------------------------------------------------------------------------------------------------------------
# the ladder (hand-made metrics)
# -------------------------------------------------------------------------------------------------------------

LADDER_METRICS = {
    "fp_optimized.logits.nmae": 0.01,
    "emulated.logits.nmae": 0.04,
    "device.logits.nmae": 0.24,
    "fp_optimized.featmap.nmae": 0.002,
    "emulated.featmap.nmae": 0.102,
    "device.featmap.nmae": 0.092,
    "emulated.logits.snr_db": 30.0,
}


def test_ladder_steps_without_bit_exact() -> None:
    steps = ladder_steps(LADDER_METRICS, ["logits", "featmap"])
    assert steps == pytest.approx(
        {
            "ladder.logits.fp_optimization_cost": 0.01,
            "ladder.logits.quantization_cost": 0.03,
            "ladder.logits.compile_runtime_cost": 0.20,
            "ladder.featmap.fp_optimization_cost": 0.002,
            "ladder.featmap.quantization_cost": 0.10,
            "ladder.featmap.compile_runtime_cost": -0.01,
        }
    )


def test_ladder_steps_with_bit_exact_and_missing_stages() -> None:
    metrics = {"emulated.y.nmae": 0.1, "bit_exact.y.nmae": 0.15, "device.y.nmae": 0.16}
    assert ladder_steps(metrics, ["y"]) == pytest.approx(
        {"ladder.y.quantization_cost": 0.1, "ladder.y.bit_exact_cost": 0.05, "ladder.y.compile_runtime_cost": 0.01}
    )
    assert ladder_steps(metrics, ["absent"]) == {}
    with pytest.raises(ValueError, match="error metric"):
        ladder_steps(LADDER_METRICS, ["logits"], metric="snr_db")


def test_dominant_step_and_explanation() -> None:
    outputs = ["logits", "featmap"]
    assert dominant_step(LADDER_METRICS, outputs) == {"logits": "compile_runtime", "featmap": "quantization"}
    logits, featmap = explain(LADDER_METRICS, outputs)
    # 0.20 of 0.24: 83 %; the device's 0.01 improvement on featmap leaves quantization 0.10 of 0.102 positive cost
    assert logits.startswith("logits: 83% of the device error") and "compile/runtime" in logits and "not from quantization" in logits
    assert featmap.startswith("featmap: 98% of the error added on the way to the device") and "from quantization" in featmap
    assert "closer to the float model than the emulation (-0.01)" in featmap
    tiny = {"emulated.y.nmae": 0.1, "device.y.nmae": 0.0999}  # the device step is 0.1 % of the error: negligible
    assert explain(tiny, ["y"]) == [
        "y: 100% of the device error (nmae 0.0999) comes from quantization (quantized vs float-optimized emulation); "
        "the device matches the emulation's error (-0.0001)."
    ]
    assert dominant_step({"emulated.y.nmae": 0.0, "device.y.nmae": 0.0}, ["y", "z"]) == {"y": "none", "z": "none"}


def test_the_issue_example_sentence() -> None:
    metrics = {"fp_optimized.logits.nmae": 0.0, "emulated.logits.nmae": 0.03, "device.logits.nmae": 0.2}
    (sentence,) = explain(metrics, ["logits"])
    assert sentence.startswith("logits: 85% of the device error")
    assert "compile/runtime step (device vs emulation), not from quantization." in sentence


# -------------------------------------------------------------------------------------------------------------
# plots and report
# -------------------------------------------------------------------------------------------------------------

NOISE = [LayerNoise(layer=f"layer_{i:02d}<b>", snr_db=10.0 + i, kind="output" if i == 3 else "activation") for i in range(12)]
HISTOGRAMS = {"featmap": {-1: 3, 0: 990, 2: 7}, "logits": {0: 640}}


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_plots_write_pngs(tmp_path: Path) -> None:
    metrics = {**LADDER_METRICS, "bit_exact.logits.nmae": 0.05}
    assert _is_png(ladder_plot(metrics, ["logits", "featmap"], tmp_path / "a" / "ladder.png"))
    assert _is_png(lsb_histogram_plot(HISTOGRAMS, tmp_path / "hist.png"))
    assert _is_png(lsb_histogram_plot({}, tmp_path / "empty.png"))
    assert _is_png(layer_noise_plot(NOISE, tmp_path / "noise.png", top=5))
    assert _is_png(layer_noise_plot([], tmp_path / "no-noise.png"))


def _report(tmp_path: Path, found: list[Finding]) -> str:
    return render_report(
        title="digits <trial 3>",
        settings={"optimization_level": 2, "output_16bit": "logits"},
        metrics={**LADDER_METRICS, **CLEAN_AGREEMENT, "device.logits.accuracy": 0.97},
        outputs=["logits", "featmap"],
        findings=found,
        lsb_histograms=HISTOGRAMS,
        layer_noise=NOISE,
        notes=["logits: 16-bit output runs through float kernels"],
        work_dir=tmp_path / "plots",
    )


def test_report_is_self_contained(tmp_path: Path) -> None:
    found = [
        Finding("not_dequantized", "'logits': raw device outputs compared <without> dequantization", "m1 <script>x</script>", "f1", "error", "logits"),
        Finding("calibration_range", "Calibration data does not cover", "m2", "f2", "warning"),
    ]
    text = _report(tmp_path, found)
    for forbidden in ("http://", "https://", 'src="/', "<script", "<link", "@import", "url("):
        assert forbidden not in text, forbidden
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 3  # ladder, LSB histograms, layer noise
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    for f in found:
        assert html.escape(f.title) in text and html.escape(f.message) in text and html.escape(f.fix) in text
    assert text.index("Findings") < text.index("Where the error comes from")
    for sentence in explain(LADDER_METRICS, ["logits", "featmap"]):
        assert html.escape(sentence) in text
    ranked = sorted(NOISE, key=lambda n: n.snr_db)
    for n in ranked[:10]:
        assert html.escape(n.layer) in text
    for n in ranked[10:]:
        assert html.escape(n.layer) not in text
    assert "99.50%" in text  # logits identical share in the agreement table
    assert html.escape("digits <trial 3>") in text


def test_report_without_findings_says_so(tmp_path: Path) -> None:
    text = _report(tmp_path, [])
    assert "No findings" in text


def test_write_report_is_atomic_and_complete(tmp_path: Path) -> None:
    text = _report(tmp_path, [])
    path = write_report(tmp_path / "out" / "report.html", text)
    assert path.read_text(encoding="utf-8") == text
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_the_fed_data_is_checked_once_per_placement_and_a_failing_check_is_a_note(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """fed_for checks the data as fed (the same in every trial of a placement) once; data that the user's file already
    holds normalized, fed with host normalization, is normalized twice. A check that raises leaves a note, no error."""
    from types import SimpleNamespace

    from hailo_sweep import trial as trial_mod

    normalized = feed(run.evaluation_raw, "host", NORM, DOMAIN)  # what the user's file holds: normalized once
    prepared = SimpleNamespace(dataset=SimpleNamespace(calibration=normalized, evaluation=normalized), normalization=NORM,
                               config=SimpleNamespace(data=SimpleNamespace(domain=DOMAIN)), fed={})
    fed = trial_mod.fed_for(prepared, "host")  # type: ignore[arg-type]
    assert [f.code for f in fed.input_findings] == ["normalization_twice"] and fed.input_check_error is None
    assert trial_mod.fed_for(prepared, "host") is fed  # made and checked once

    def broken(evidence: Evidence) -> list[Finding]:
        raise ValueError("no statistics")

    monkeypatch.setattr(trial_mod, "run_all", broken)
    prepared.fed = {}
    fed = trial_mod.fed_for(prepared, "host")  # type: ignore[arg-type]
    assert fed.input_findings == [] and fed.input_check_error is not None and "no statistics" in fed.input_check_error


def test_the_backend_sees_each_placements_fed_data_once_and_a_failing_look_ahead_is_a_note(run: Run) -> None:
    """feed_placements shows the backend the very arrays the trials get (``Backend.expect_inputs``); a backend whose
    look-ahead raises leaves a note naming the placement and the error, and the sweep goes on."""
    from types import SimpleNamespace

    from hailo_sweep import trial as trial_mod

    raw = run.evaluation_raw
    prepared = SimpleNamespace(dataset=SimpleNamespace(calibration=raw, evaluation=raw), normalization=NORM,
                               config=SimpleNamespace(data=SimpleNamespace(domain=DOMAIN)), fed={})
    seen: list[tuple[str, np.ndarray]] = []

    class LookAhead:
        def expect_inputs(self, placement: str, evaluation: np.ndarray) -> None:
            seen.append((placement, evaluation))
            if placement == "model":
                raise RuntimeError("float run failed")

    seconds, notes = trial_mod.feed_placements(prepared, LookAhead(), ["host", "model"])  # type: ignore[arg-type]
    assert [p for p, _ in seen] == ["host", "model"] and seconds >= 0
    assert all(arr is trial_mod.fed_for(prepared, p).evaluation and not arr.flags.writeable for p, arr in seen)  # type: ignore[arg-type]
    assert len(notes) == 1 and "model-normalized" in notes[0] and "float run failed" in notes[0]
    _, none = trial_mod.feed_placements(prepared, None, ["host"])  # type: ignore[arg-type]
    assert none == [] and len(seen) == 2  # no backend here (the cluster's workers have it): the data only


def test_a_backend_must_prepare_and_may_skip_the_look_ahead() -> None:
    """``expect_inputs`` is optional (it does nothing by default), the stages are not: a backend without ``prepare``
    cannot be made."""
    from hailo_sweep.backends.base import Backend

    assert {"prepare", "optimize", "emulate", "compile"} <= Backend.__abstractmethods__
    assert "expect_inputs" not in Backend.__abstractmethods__
