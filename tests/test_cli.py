"""The command line's own behaviour: version, help, declared choices, errors before heavy imports, progress lines,
the end-of-run table at 80 columns, and hints that work as printed."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hailo_sweep import __version__, console as console_mod
from hailo_sweep.cli import app
from hailo_sweep.progress import LADDER, RichObserver, SweepClock
from hailo_sweep.settings import Settings
from hailo_sweep.study_report import TrialRow

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

HEAVY = ("mlflow", "optuna", "onnxruntime", "matplotlib")
PROBE = """
import sys
sys.argv = ["hailo-sweep", *sys.argv[1:]]
from hailo_sweep.cli import app
try:
    app()
finally:
    sys.stderr.write("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n")
"""


def probe(*args: str, cwd: Path) -> tuple[int, str, list[str]]:
    """Run the CLI in a fresh interpreter; return its exit code, its output, and the heavy modules it imported."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("HEAVY:"))
    return proc.returncode, proc.stdout + proc.stderr, [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_version_and_short_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"hailo-sweep {__version__}"
    result = runner.invoke(app, ["-h"])
    assert result.exit_code == 0 and "run" in result.output and "--install-completion" in result.output
    result = runner.invoke(app, ["best", "-h"])
    assert result.exit_code == 0 and "--allow-infeasible" in result.output


def test_diagnose_declares_its_required_options_and_choices(tmp_path: Path) -> None:
    config = REPO / "configs" / "digits.yaml"
    result = runner.invoke(app, ["diagnose", "-h"], env={"COLUMNS": "200"})
    assert "--trial" in result.output and "--compiled is required" in result.output and "host|model" in result.output
    result = runner.invoke(app, ["diagnose", str(config)])
    assert result.exit_code == 2 and "--trial" in result.output and "--compiled" in result.output
    result = runner.invoke(app, ["diagnose", str(config), "--compiled", "x.onnx", "--placement", "device"])
    assert result.exit_code == 2 and "host" in result.output and "model" in result.output


def test_a_config_error_is_reported_before_any_heavy_import(tmp_path: Path) -> None:
    good = (REPO / "configs" / "digits.yaml").read_text()
    (tmp_path / "bad.yaml").write_text(good.replace("\ntarget:", "\ntarged:"))
    code, out, heavy = probe("run", "bad.yaml", cwd=tmp_path)
    assert code == 2, out
    assert "targed" in out and "did you mean 'target'" in out
    assert heavy == []
    code, out, heavy = probe("--help", cwd=tmp_path)
    assert code == 0 and heavy == []
    assert not list(tmp_path.glob("**/*.db")), "a config error wrote a store"


def test_hints_name_the_command_as_it_was_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = tmp_path / ".venv" / "bin" / "hailo-sweep"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "run"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert console_mod.self_command() == ".venv/bin/hailo-sweep"
    monkeypatch.setenv("PATH", str(script.parent))
    script.chmod(0o755)
    assert console_mod.self_command() == "hailo-sweep"
    monkeypatch.setattr(sys, "argv", ["/x/hailo_sweep/cli.py"])
    assert console_mod.self_command().endswith(" -m hailo_sweep.cli")


def _observer(width: int = 80) -> tuple[RichObserver, io.StringIO]:
    out = io.StringIO()
    return RichObserver(Console(file=out, width=width, force_terminal=False, color_system=None)), out


SETTINGS = Settings(optimization_level=2, compression_level=1, calibset_size=256, normalization_placement="model", output_16bit=("featmap", "logits"))


def test_the_status_line_keeps_count_stage_time_eta_and_best_at_80_columns() -> None:
    obs, _ = _observer()
    obs.set_direction("minimize")
    obs.sweep_started(30, 30)
    obs.trial_started(0, SETTINGS)
    obs.stage_started("compile")
    text = obs.status_text().plain
    assert "trials 0/30" in text and f"compile {LADDER.index('compile') + 1}/{len(LADDER)}" in text and "ETA ?" in text
    obs.trial_finished(0, "COMPLETE", 0.000331416, True)
    obs.trial_finished(1, "COMPLETE", 0.0001, False)  # infeasible: never the best so far
    obs.trial_started(2, SETTINGS)
    obs.stage_started("optimize")
    text = obs.status_text().plain
    assert "trials 2/30" in text and "optimize 1/6" in text and "best 0.000331416 (#0)" in text
    assert "ETA ?" not in text and "ETA 0:" in text
    assert len(text) <= 78  # fits next to the spinner at 80 columns


def test_eta_comes_from_the_stage_times_so_far() -> None:
    clock = SweepClock(total=10, done=2, trial_seconds=[10.0, 12.0])
    for stage, seconds in (("optimize", 2.0), ("emulate", 1.0), ("compile", 6.0), ("device", 2.0)):
        clock.add_stage(stage, seconds)
    # in compile for 1 s of its 6: 5 + 2 (device) left in this trial, then 7 more trials of 11 s on average
    assert clock.eta("compile", 1.0) == pytest.approx(5.0 + 2.0 + 7 * 11.0)


def test_trial_lines_say_state_value_feasibility_and_why_a_trial_failed() -> None:
    obs, out = _observer()
    obs.sweep_started(5, 5)
    obs.trial_finished(0, "COMPLETE", 0.000331416, True)
    obs.trial_finished(1, "FAIL", None, None, failed_stage="compile", error="RuntimeError: out of memory\nTraceback ...")
    obs.trial_finished(2, "COMPLETE", 0.0198, False, violated=("device.logits.accuracy_drop.max",))
    obs.trial_finished(3, "COMPLETE (reused)", 0.000331416, True, duplicate_of=0)
    obs.trial_finished(4, "COMPLETE (reused)", 0.000331416, True, duplicate_of=0)
    lines = out.getvalue().splitlines()
    assert "0.000331416" in lines[0] and "feasible" in lines[0]
    assert "FAIL" in lines[1] and "in compile: RuntimeError: out of memory" in lines[1] and "Traceback" not in out.getvalue()
    assert "infeasible (accuracy_drop)" in lines[2]
    assert "(reused #0)" in lines[3]
    assert "trials 3/5 +2 reused" in obs.status_text().plain  # a reused result spends no budget
    assert lines[4].startswith("(reused #N): trial N already evaluated these settings")  # explained once, after the first
    assert out.getvalue().count("without recomputing") == 1 and "(reused #0)" in lines[-1]


def test_the_trials_table_fits_80_columns_without_cutting_values(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(console_mod, "console", Console(file=out, width=80, color_system=None))
    params = {"optimization_level": 3, "compression_level": 2, "calibset_size": 1024, "normalization_placement": "model", "output_16bit": "featmap+logits"}
    rows = [
        TrialRow(12, 0.000331416, True, params, {"device.throughput_fps": 12345.6}, "r1", None),
        TrialRow(7, 0.0198352123, False, params, {"device.throughput_fps": 481.0}, "r2", None, {"device.logits.accuracy_drop.max": 0.0133}),
    ]
    console_mod.print_trials(rows, "device.logits.softmax_mae")
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for value in ("0.000331416", "0.0198352", "12346", "1024"):
        assert value in text
    assert "no: accuracy_drop" in " ".join(text.split())


def _table(monkeypatch: pytest.MonkeyPatch, rows: list[TrialRow], width: int = 120) -> str:
    out = io.StringIO()
    monkeypatch.setattr(console_mod, "console", Console(file=out, width=width, color_system=None))
    console_mod.print_trials(rows, "device.logits.softmax_mae")
    return out.getvalue()


DIGITS_LIKE = {
    "optimization_level": 0, "compression_level": 0, "calibset_size": 64, "normalization_placement": "host",
    "output_16bit": "all", "noisy_layers_16bit": 0, "equalization": "disabled", "bias_correction": "enabled",
    "calibration_method": "percentile", "clipping_percentile": 99.999, "clipping_scope": "outputs",
}


def test_trials_that_differ_only_in_an_algorithm_knob_look_different_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        TrialRow(17, 0.000339557, True, DIGITS_LIKE, {"device.throughput_fps": 2101.0}, "r1", None),
        TrialRow(25, 0.000339557, True, {**DIGITS_LIKE, "equalization": "enabled"}, {"device.throughput_fps": 2101.0}, "r2", None),
    ]
    text = _table(monkeypatch, rows)
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.split()[:2] == ["trial", "value"])
    assert "equal" in header.split() and "calib" not in header.split()  # only the knob that differs is a column
    row17, row25 = (next(ln for ln in lines if ln.split() and ln.split()[0] == n) for n in ("17", "25"))
    assert "disabled" in row17.split() and "enabled" in row25.split()
    constants = " ".join(text.split()).split("same in every trial above:")[1]
    for said in ("calibset_size 64", "bias_correction enabled", "calibration_method percentile", "clipping_percentile 99.999"):
        assert said in constants
    assert "equalization" not in constants


def test_a_percentile_under_minmax_calibration_is_shown_as_no_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    minmax = {**DIGITS_LIKE, "calibration_method": "minmax", "clipping_percentile": 99.9, "clipping_scope": "first"}
    rows = [
        TrialRow(1, 0.1, True, minmax, {}, "r1", None),
        TrialRow(2, 0.2, True, {**minmax, "clipping_percentile": 99.99, "clipping_scope": "all"}, {}, "r2", None),
    ]
    text = _table(monkeypatch, rows)
    assert "clip%" not in text and "scope" not in text  # the same point twice: Optuna's unused suggestions are no difference
    rows.append(TrialRow(3, 0.3, True, DIGITS_LIKE, {}, "r3", None))
    lines = _table(monkeypatch, rows).splitlines()
    header = next(ln for ln in lines if ln.split()[:2] == ["trial", "value"]).split()
    assert {"method", "clip%", "scope"} <= set(header)
    row1 = next(ln for ln in lines if ln.split() and ln.split()[0] == "1").split()
    assert row1[header.index("clip%")] == "-" and row1[header.index("scope")] == "-"
    assert "clip% clipping_percentile" in " ".join(" ".join(lines).split())  # the legend names the config key


def test_a_table_where_every_digits_knob_differs_fits_120_columns_uncut(monkeypatch: pytest.MonkeyPatch) -> None:
    other = {
        "optimization_level": 2, "compression_level": 1, "calibset_size": 1024, "normalization_placement": "model",
        "output_16bit": "featmap", "noisy_layers_16bit": 3, "equalization": "enabled", "bias_correction": "disabled",
        "calibration_method": "entropy", "clipping_scope": "first",
    }
    rows = [
        TrialRow(8, 0.000322424, True, DIGITS_LIKE, {"device.throughput_fps": 1259.0}, "r1", None),
        TrialRow(30, 0.0198352123, False, other, {"device.throughput_fps": 3023.0}, "r2", None, {"device.logits.accuracy_drop.max": 0.0133}),
    ]
    text = _table(monkeypatch, rows)
    assert max(len(line) for line in text.splitlines()) <= 120
    table_rows = [ln.split() for ln in text.splitlines() if ln.split() and ln.split()[0] in ("8", "30")]
    for value in ("percentile", "99.999", "outputs", "disabled", "enabled", "entropy", "first", "featmap", "1024", "model"):
        assert any(value in r for r in table_rows), value  # whole, not folded


def test_the_run_hint_exports_where_make_demo_and_the_readme_do() -> None:
    import shutil

    from hailo_sweep.cli import export_dir_for

    hinted = export_dir_for(Path("configs/digits.yaml"))
    assert hinted == "out/digits"  # the config's stem, not the sweep's name (digits-hailo8l)
    assert f"verify {hinted}" in (REPO / "README.md").read_text()
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"best configs/digits.yaml --export {hinted}\n" in dry


def test_a_missing_model_or_data_file_is_refused_before_any_heavy_import(tmp_path: Path) -> None:
    good = (REPO / "configs" / "digits.yaml").read_text()
    (tmp_path / "c.yaml").write_text(good)  # its model and data paths are relative: none exists under tmp_path
    for command in (("run",), ("worker",), ("init",), ("diagnose", "--trial", "0"), ("best", "--export", "out")):
        code, out, heavy = probe(command[0], "c.yaml", *command[1:], cwd=tmp_path)
        assert code == 2, (command, out)
        assert "model file not found" in out and "c.yaml: model:" in out and "fix: point 'model' at" in " ".join(out.split()), (command, out)
        assert heavy == [], command
    (tmp_path / "d.yaml").write_text(good.replace("models/digits_cnn.onnx", str(REPO / "configs" / "models" / "digits_cnn.onnx")))
    code, out, heavy = probe("run", "d.yaml", cwd=tmp_path)
    assert code == 2 and "data.calibration" in out and "data file not found" in out, out
    assert heavy == []
    assert not list(tmp_path.glob("**/*.db")) and not (tmp_path / "out").exists(), "a path error wrote something"


TYPERS_OWN = ("--help", "--install-completion", "--show-completion")  # Typer's own options: their help is Typer's


def test_our_flags_take_no_value_and_their_help_says_none(tmp_path: Path) -> None:
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"new", "best", "run"} <= set(commands)
    seen = set()
    for args in ([], *([name] for name in commands)):
        result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0, (args, result.output)
        for line in result.output.splitlines():
            cells = line.strip("│ ").split()
            if cells and cells[0].startswith("--"):
                seen.add(cells[0])
                if cells[0] not in TYPERS_OWN:
                    assert "<bool>" not in line, (args, line)  # a flag shown as if it took a value
    assert {"--force", "--allow-infeasible", "--version"} <= seen
    model, out = tmp_path / "m.onnx", tmp_path / "m.yaml"
    model.write_bytes((REPO / "configs" / "models" / "digits_cnn.onnx").read_bytes())
    out.write_text("taken\n")
    refused = runner.invoke(app, ["new", str(model), "-o", str(out)])
    assert refused.exit_code == 2 and out.read_text() == "taken\n"
    forced = runner.invoke(app, ["new", str(model), "-o", str(out), "--force"])  # a flag: no value follows it
    assert forced.exit_code == 0, forced.output
    assert out.read_text() != "taken\n"


def test_output_to_a_pipe_is_wide_enough_for_the_trials_table() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    probe = "from hailo_sweep.console import PIPE_WIDTH, console; print(console.width, PIPE_WIDTH)"
    piped = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert piped[0] == piped[1] == "120"
    narrow = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**env, "COLUMNS": "90"}, check=True).stdout.split()
    assert narrow[0] == "90", "COLUMNS still decides"
