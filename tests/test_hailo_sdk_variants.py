"""The ``hailo`` backend against SDK and device behaviours it was not written with (issue 11), on the contract fakes.

Each test names the item of issue 11 it covers. The behaviours are modelled in ``tests/fakes`` with their sources:
a ``Device`` without control APIs, the DFC's level downgrade keyed on the entries given to ``optimize()``,
``calibset_size`` read from the model script, bit-exact emulation equal to the HEF (quantized emulation not), a device
another process holds for a while, an intermittent ``HailoRTTimeout``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hailo_fixtures import FakeHailo, TinyModel, hailo_fakes, hold_device_lock, tiny_model  # noqa: F401 - fixtures
from typer.testing import CliRunner

from hailo_sweep.backends.hailo.backend import HailoBackend
from hailo_sweep.backends.hailo.runtime import DeviceLock, HailoDeviceError
from hailo_sweep.config import DiagnosticsConfig, load_config
from hailo_sweep.diagnose.findings import check_optimization_level
from hailo_sweep.errors import UserInputError
from hailo_sweep.pipeline import prepare_sweep
from hailo_sweep.trial import StageTimeout, TrialResult, run_trial
from hailo_sweep.commands.reproduce import is_reproducible
from hailo_sweep.settings import Settings

DEVICE = "0000:01:00.0"
NO_DIAGNOSIS = DiagnosticsConfig(layer_noise=False, determinism_samples=0)
SEARCH = {"optimization_level": [2], "compression_level": [0], "calibset_size": [64], "normalization_placement": ["model"], "output_16bit": ["none"]}


def make_backend(tiny: TinyModel, tmp_path: Path, target: str = "hailo8", **options: object) -> HailoBackend:
    backend = HailoBackend(tiny.context(tmp_path / "sweep", target=target, **options))
    backend.activate()
    return backend


def compiled_model(backend: HailoBackend, tiny: TinyModel, tmp_path: Path) -> object:
    settings = Settings(1, 0, 32, "model")
    model = backend.optimize(settings, tiny.feed(tiny.calibration, "model"), tmp_path / "trial")
    return backend.compile(model, tmp_path / "trial")


class Messages:
    """A sweep observer that keeps the pre-flight's messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


# -- item 1: a Device without control APIs ------------------------------------------------------------------------------
def test_device_without_control_api_runs_and_falls_back_to_hailort_refusing_the_hef(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path
) -> None:
    hailo_fakes.system.control_api = False
    backend = make_backend(tiny_model, tmp_path)
    compiled = compiled_model(backend, tiny_model, tmp_path)
    with backend.device(compiled) as runner:  # type: ignore[arg-type]
        out = runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    assert out.raw["feat"].shape == (6, 2, 8, 8)
    assert any("architecture not identified (AttributeError: 'Device' object has no attribute 'control')" in n for n in out.notes)

    hailo_fakes.system.devices = {DEVICE: "HAILO8L"}  # a hailo8 HEF on a Hailo-8L: HailoRT's configure() refuses it
    with pytest.raises(UserInputError, match="HailoRT refused the hailo8 HEF"):
        with backend.device(compiled):  # type: ignore[arg-type]
            pass
    assert hailo_fakes.system.in_use == set()


# -- item 2: the whole calibration set; the level the compiler will lower said once, before the first trial -------------
def test_optimize_gets_every_entry_and_calibset_size_goes_into_the_script(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    many = np.resize(tiny_model.calibration, (1024, 1, 8, 8))
    model = backend.optimize(Settings(2, 1, 16, "model"), tiny_model.feed(many, "model"), tmp_path / "trial")
    assert hailo_fakes.sdk.ClientRunner.last_optimize_entries == 1024
    assert "model_optimization_config(calibration, calibset_size=16)" in model.script
    assert model.params["effective_optimization_level"] == 2 and "optimization_level_lowered" not in model.flags
    assert (model.params["calibration_entries_given"], model.params["calibration_entries_used"]) == (1024, 16)


def test_calibration_advice_names_the_levels_the_compiler_will_lower(tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = HailoBackend(tiny_model.context(tmp_path))
    advice = backend.calibration_advice(300, [0, 1, 2, 3])
    assert advice is not None and "300 entries" in advice and "level(s) 2, 3" in advice and "1024" in advice and "GPU" in advice
    assert backend.calibration_advice(1024, [2, 3, 4]) is None
    assert backend.calibration_advice(300, [0, 1]) is None


def test_sweep_says_once_before_the_first_trial_that_levels_will_be_lowered(
    hailo_fakes: FakeHailo, write_config: Callable[..., Path], digits_data: dict[str, Path], tmp_path: Path
) -> None:
    from hailo_sweep.sweep import Sweep

    few = tmp_path / "few.npy"
    np.save(few, np.load(digits_data["calibration"])[:300])
    cfg = write_config(backend="hailo", search={**SEARCH, "optimization_level": [1, 2, 4]})
    config = load_config(cfg).model_copy(update={"data": load_config(cfg).data.model_copy(update={"calibration": few})})
    observer = Messages()
    Sweep(config, observer).preflight()  # type: ignore[arg-type]
    lowered = [line for line in observer.lines if "fewer than the 1024" in line]
    assert len(lowered) == 1 and "level(s) 2, 4" in lowered[0] and "300 entries" in lowered[0]


# -- item 3: no false finding on a clean trial (covered end to end in test_hailo_backend's whole sweep) ----------------
def test_clean_trial_agrees_bit_for_bit_with_bit_exact_emulation_and_reports_drift_apart(
    hailo_fakes: FakeHailo, write_config: Callable[..., Path]
) -> None:
    config = load_config(write_config(backend="hailo", search=SEARCH))
    result = one_trial(config, Settings(2, 0, 64, "model"))
    assert result.ok, result.error
    assert result.params["agreement_reference"] == "bit_exact"
    assert result.metrics["agreement.total.identical_share"] == 1.0 and result.metrics["agreement.total.lsb_max"] == 0.0
    assert 0.9 < result.metrics["emulation_drift.total.identical_share"] < 1.0
    assert result.metrics["emulation_drift.total.lsb_max"] == 1.0
    assert result.metrics["findings.device_disagrees"] == 0


# -- item 4: two workers on one device --------------------------------------------------------------------------------------
def test_a_worker_waits_for_the_device_another_worker_holds(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, device_stage_timeout_s=120.0)
    compiled = compiled_model(backend, tiny_model, tmp_path)
    proc = hold_device_lock(DeviceLock(tmp_path / "sweep" / "locks", DEVICE).path)
    waiting = threading.Event()

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for"):
                waiting.set()

    said = Said()
    logging.getLogger("hailo_sweep.backends.hailo.device").addHandler(said)
    outcome: dict[str, object] = {}

    def second_worker() -> None:
        try:
            with backend.device(compiled) as runner:  # type: ignore[arg-type]
                outcome["out"] = runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
        except Exception as exc:  # reported to the test thread
            outcome["error"] = exc

    try:
        worker = threading.Thread(target=second_worker)
        worker.start()
        assert waiting.wait(timeout=60), "the worker never said it waits"
        assert proc.stdin is not None
        proc.stdin.write("release\n")
        proc.stdin.flush()
        worker.join(timeout=60)
    finally:
        logging.getLogger("hailo_sweep.backends.hailo.device").removeHandler(said)
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=10)
    assert "error" not in outcome, outcome.get("error")
    notes = outcome["out"].notes  # type: ignore[attr-defined]
    assert any(n.startswith(f"waiting for Hailo device {DEVICE}") and f"held by pid {proc.pid}" in n for n in notes)


def test_a_worker_waits_while_a_process_outside_the_sweep_holds_the_device(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path, device_stage_timeout_s=120.0)
    compiled = compiled_model(backend, tiny_model, tmp_path)
    hailo_fakes.system.busy_for = {DEVICE: 2}  # HAILO_DEVICE_IN_USE twice, then free
    with backend.device(compiled) as runner:  # type: ignore[arg-type]
        out = runner.run(tiny_model.feed(tiny_model.evaluation, "model"))
    assert hailo_fakes.system.busy_for[DEVICE] == 0
    assert any("held by a process outside hailo-sweep" in n and "HAILO_DEVICE_IN_USE" in n for n in out.notes)

    hailo_fakes.system.busy_for = {DEVICE: 10**6}  # never free: bounded by the device stage's time limit
    short = make_backend(tiny_model, tmp_path, device_stage_timeout_s=0.5)
    with pytest.raises(HailoDeviceError, match="HAILO_DEVICE_IN_USE"):
        with short.device(compiled):  # type: ignore[arg-type]
            pass
    lock = DeviceLock(tmp_path / "sweep" / "locks", DEVICE)
    assert lock.try_acquire()  # released after the failed wait
    lock.release()


# -- item 5: the device checked once before the first trial -------------------------------------------------------------
def test_a_mismatched_device_refuses_the_sweep_before_the_first_trial(hailo_fakes: FakeHailo, write_config: Callable[..., Path], tmp_path: Path) -> None:
    from hailo_sweep.cli import app

    hailo_fakes.system.devices = {DEVICE: "HAILO8L"}
    path = write_config(backend="hailo", target="hailo8", search=SEARCH)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"device {DEVICE} is a Hailo-8L" in text and "no trial was started" in text and "fix: set target: hailo8l" in text
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlruns").exists()  # nothing written to any store
    assert hailo_fakes.sdk.ClientRunner.translate_calls == 0


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ({"devices": {}}, "no Hailo device found"),
        ({"control_api": False}, "architecture not identified before the sweep (AttributeError"),
    ],
)
def test_device_checks_that_cannot_be_made_degrade_to_a_message(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, system: dict[str, object], expected: str
) -> None:
    for key, value in system.items():
        setattr(hailo_fakes.system, key, value)
    notes = make_backend(tiny_model, tmp_path).check_device()
    assert any(expected in n for n in notes), notes


def test_a_busy_device_is_noted_before_the_sweep(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    lock = DeviceLock(tmp_path / "sweep" / "locks", DEVICE)
    assert lock.try_acquire()
    try:
        notes = make_backend(tiny_model, tmp_path).check_device()
    finally:
        lock.release()
    assert any(f"device {DEVICE} is in use by pid" in n and "trials will wait" in n for n in notes)


# -- item 6: a transient device timeout is retried ------------------------------------------------------------------------
@pytest.mark.parametrize(("timeouts", "retries", "ok", "used"), [(1, 2, True, 1), (5, 2, False, 2), (1, 0, False, 0)])
def test_an_intermittent_timeout_is_retried_a_bounded_number_of_times(
    hailo_fakes: FakeHailo, write_config: Callable[..., Path], timeouts: int, retries: int, ok: bool, used: int
) -> None:
    config = load_config(write_config(backend="hailo", search=SEARCH, hailo={"device_retries": retries}))
    hailo_fakes.system.timeouts_left = timeouts
    result = one_trial(config, Settings(1, 0, 64, "model"))
    assert result.ok is ok, result.error
    assert result.metrics["device.retries"] == used
    assert sum("retrying" in n for n in result.notes) == used
    if not ok:
        assert result.failed_stage == "device" and "HailoDeviceTimeout" in str(result.error)


def test_other_device_errors_are_not_retried(hailo_fakes: FakeHailo, write_config: Callable[..., Path]) -> None:
    config = load_config(write_config(backend="hailo", search=SEARCH))
    hailo_fakes.system.fail_on_infer = "driver"
    result = one_trial(config, Settings(1, 0, 64, "model"))
    assert result.failed_stage == "device" and "HailoRTDriverOperationFailedException" in str(result.error)
    assert result.metrics["device.retries"] == 0 and hailo_fakes.system.inferences == 1


# -- item 7: the compiler's words kept ----------------------------------------------------------------------------------------
def test_the_compilers_reason_reaches_the_finding(hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path) -> None:
    backend = make_backend(tiny_model, tmp_path)
    model = backend.optimize(Settings(2, 1, 32, "model"), tiny_model.feed(tiny_model.calibration, "model"), tmp_path / "trial")
    reason = str(model.params["optimization_level_reason"])
    assert reason.endswith("because there's less data than the recommended amount (1024), and there's no available GPU")
    finding = check_optimization_level(2, model.params, model.flags)
    assert finding is not None and reason in finding.message and finding.evidence["compiler_message"] == reason
    assert "48 calibration entries" in finding.message
    assert "at least 1024 entries" in finding.fix and "GPU" in finding.fix
    assert (tmp_path / "trial" / "optimize.log").read_text().count("Reducing optimization level") == 1


# -- item 8: no timing metric in the reproduction verdict -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "compared"),
    [
        ("device.latency_max_ms", False),
        ("device.latency_ms", False),
        ("device.throughput_fps", False),
        ("time.optimize_s", False),
        ("device.retries", False),
        ("device.logits.snr_db", True),
        ("emulated.total.nmae", True),
        ("device.logits.accuracy_drop", True),
    ],
)
def test_verify_compares_no_timing(metric: str, compared: bool) -> None:
    assert is_reproducible(metric) is compared


# -- item 10 (inside the pipeline): the SDK's [info] lines go to the log; a stage timeout is named as such ------------------
def test_sdk_info_lines_reach_the_log_not_the_console(
    hailo_fakes: FakeHailo, tiny_model: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # the fake's console handler holds the stdout of its import (as HailoRT's StreamHandler(sys.stdout) does)
    backend = make_backend(tiny_model, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="hailo_sweep.backends.hailo.compiler"):
        model = backend.optimize(Settings(1, 0, 32, "model"), tiny_model.feed(tiny_model.calibration, "model"), tmp_path / "trial")
        backend.compile(model, tmp_path / "trial")
    out = capsys.readouterr()
    assert "[info]" not in out.out + out.err and "[warning]" not in out.out + out.err
    said = "\n".join(r.getMessage() for r in caplog.records if r.name == "hailo_sweep.backends.hailo.compiler")
    assert "[info] Using dataset with 32 entries for calibration" in said and "[info] Compiling network" in said
    assert "[info] Compiling network" in (tmp_path / "trial" / "compile.log").read_text()


def test_a_stage_timeout_inside_an_sdk_call_is_named_as_a_timeout_of_the_stage(
    hailo_fakes: FakeHailo, write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def expired(self: object) -> bytes:  # what SIGALRM does in the middle of runner.compile()
        raise StageTimeout("stage 'compile' exceeded its time limit of 5 s")

    monkeypatch.setattr(hailo_fakes.sdk.ClientRunner, "compile", expired)
    config = load_config(write_config(backend="hailo", search=SEARCH))
    result = one_trial(config, Settings(1, 0, 64, "model"))
    assert result.failed_stage == "compile"
    assert result.error == "StageTimeout: stage 'compile' exceeded its time limit of 5 s"


# -- item 9: diagnose reports a run-time failure as one (exit 1), not as bad input --------------------------------------------
def test_diagnose_of_a_trial_failing_at_run_time_exits_1(hailo_fakes: FakeHailo, write_config: Callable[..., Path]) -> None:
    from hailo_sweep.cli import app
    from hailo_sweep.sweep import Sweep

    path = write_config(backend="hailo", trials=1, search=SEARCH)
    Sweep(load_config(path)).run()
    hailo_fakes.system.fail_on_infer = "driver"
    result = CliRunner().invoke(app, ["diagnose", str(path), "--trial", "0"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "trial 0 failed again at run time, in stage device" in text and "HailoRTDriverOperationFailedException" in text


def test_real_suite_skips_where_the_sdk_lacks_the_noise_analysis() -> None:
    from test_hailo_real import skip_without_noise_analysis

    class ClientRunner:  # a DFC without analyze_noise / get_params_statistics
        def optimize(self, calib: object) -> None: ...

    with pytest.raises(pytest.skip.Exception, match="no ClientRunner.analyze_noise"):
        skip_without_noise_analysis(SimpleNamespace(ClientRunner=ClientRunner, __version__="3.27.0"))  # type: ignore[arg-type]


# -- helpers ---------------------------------------------------------------------------------------------------------------------
def one_trial(config: object, settings: Settings) -> TrialResult:
    """One trial of ``config`` through the pipeline (prepare once, then run_trial), as a sweep runs it."""
    from hailo_sweep.backends.hailo.backend import HailoBackend as Backend
    from hailo_sweep.stores import resolve_stores

    work = resolve_stores(config).work_dir  # type: ignore[arg-type]
    prepared = prepare_sweep(config, work)  # type: ignore[arg-type]
    backend = Backend(prepared.backend_context())
    with backend:
        prepared.facts.update(backend.prepare())
        return run_trial(prepared, backend, settings, work / "trial", diagnostics=NO_DIAGNOSIS)
