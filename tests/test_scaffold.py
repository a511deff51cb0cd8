"""``hailo-sweep new``: a starter config from the model's own interface, loaded at once, runnable without edits."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hailo_sweep.config import load_config
from hailo_sweep.errors import UserInputError
from hailo_sweep.examples.corpus import BY_NAME, MODELS, fetch_model, materialize
from hailo_sweep.scaffold import guess_outputs, write_starter
from tests.conftest import cli

SMALL = {"ppocr_det": (8, 4), "layout_cdla": (8, 4)}


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus") / "data"
    return {m.name: materialize(m, root, sizes=SMALL.get(m.name, (16, 8))) for m in MODELS}


def test_kinds_and_batch_axes_are_guessed_from_the_graph() -> None:
    import onnx

    def guesses(name: str) -> dict[str, tuple[str | None, int | None]]:
        model = onnx.load(str(fetch_model(BY_NAME[name])), load_external_data=False)
        return {g.name: (g.kind, g.batch_axis) for g in guess_outputs(model)}

    assert guesses("ppocr_cls") == {"save_infer_model/scale_0.tmp_1": ("probabilities", None)}  # Softmax behind an Identity
    assert guesses("orientation") == {"fetch_name_0": ("probabilities", None)}
    assert guesses("captcha_crnn") == {"logits": (None, 1)}  # (T, batch, C): the input's batch symbol on axis 1
    assert guesses("ddddocr") == {"387": (None, None)}  # declared (1, seqlen): no class axis to call logits
    layout = guesses("layout_cdla")
    assert len(layout) == 8 and set(layout.values()) == {(None, None)}


def test_written_config_loads_with_quoted_names_and_the_data_read(tmp_path: Path, corpus_data: dict[str, Path]) -> None:
    data = corpus_data["ddddocr"]
    out = tmp_path / "cfg" / "ddddocr.yaml"
    cfg = write_starter(data / "model.onnx", out, data / "calib.npy", data / "eval.npz")
    text = out.read_text()
    assert '"387":' in text  # a numeric name stays a string in YAML
    assert list(cfg.outputs) == ["387"] and cfg.outputs["387"].batch_axis == 1  # declared (1, seqlen), probed (T, 1, C)
    assert cfg.data.layout == "NHWC" and cfg.data.domain == (0.0, 255.0)
    assert cfg.data.calibration == (data / "calib.npy").resolve()
    assert cfg.search.calibset_size == [16]  # sized to the 16 calibration samples
    assert load_config(out) == cfg


def test_a_config_without_data_still_loads_and_an_existing_file_is_kept(tmp_path: Path) -> None:
    model = fetch_model(BY_NAME["orientation"])
    out = tmp_path / "orientation.yaml"
    cfg = write_starter(model, out)
    assert cfg.outputs["fetch_name_0"].kind == "probabilities"
    before = out.read_text()
    with pytest.raises(UserInputError, match="exists"):
        write_starter(model, out)
    assert out.read_text() == before


def test_data_that_does_not_fit_the_model_is_refused_and_nothing_is_left(tmp_path: Path, corpus_data: dict[str, Path]) -> None:
    out = tmp_path / "x.yaml"
    with pytest.raises(UserInputError):  # ddddocr's 1-channel frames for a 3-channel model
        write_starter(fetch_model(BY_NAME["orientation"]), out, corpus_data["ddddocr"] / "calib.npy", corpus_data["ddddocr"] / "eval.npz")
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "init"])
def test_run_and_init_given_a_model_point_to_new(tmp_path: Path, command: str) -> None:
    model = fetch_model(BY_NAME["ppocr_cls"])
    proc = cli(tmp_path, command, str(model))
    assert proc.returncode == 2
    assert "ONNX model, not a sweep config" in proc.stderr and "hailo-sweep new" in proc.stderr
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in MODELS])
def test_new_then_run_without_edits(tmp_path: Path, corpus_data: dict[str, Path], name: str) -> None:
    data = corpus_data[name]
    config = tmp_path / f"{name}.yaml"
    made = cli(tmp_path, "new", str(data / "model.onnx"), "--calibration", str(data / "calib.npy"), "--evaluation", str(data / "eval.npz"), "-o", str(config))
    assert made.returncode == 0, made.stdout + made.stderr
    proc = cli(tmp_path, "run", str(config), "--trials", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = yaml.safe_load(config.read_text())
    study = optuna.load_study(study_name=raw["name"], storage=f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}")
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE]
