"""Bad input: each case gets a clear error naming the file/key and a fix, a non-zero exit, and no store is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hailo_sweep.cli import app
from tests.conftest import MODEL, base_config

runner = CliRunner()


def run_cli(config: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["run", str(config)])
    return result.exit_code, result.output


def assert_refused(config: Path, *fragments: str) -> str:
    code, out = run_cli(config)
    assert code == 2, out
    flat = " ".join(out.split())
    for fragment in (str(config.name), *fragments):
        assert fragment in flat, f"{fragment!r} not in:\n{out}"
    root = config.parent
    assert not (root / "sweeps" / "optuna.db").exists(), "the study store was written"
    assert not (root / "mlruns").exists(), "the tracking store was written"
    return flat


def test_unknown_key_suggests_close_match(write_config) -> None:
    cfg = write_config()
    text = cfg.read_text().replace("trials: 4", "trails: 4")
    cfg.write_text(text)
    assert_refused(cfg, "trails", "did you mean 'trials'", "fix:")


def test_unknown_nested_key_suggests_close_match(write_config, digits_data) -> None:
    raw = base_config(digits_data)
    raw["outputs"]["logits"]["knd"] = "logits"
    assert_refused(write_config(raw), "outputs.logits.knd", "did you mean 'kind'")


def test_out_of_range_knob(write_config) -> None:
    flat = assert_refused(write_config(search={"optimization_level": [0, 7]}), "search.optimization_level", "0-4")
    assert "7" in flat


def test_level_the_backend_cannot_honour_is_refused(write_config) -> None:
    assert_refused(write_config(search={"optimization_level": [2, 4]}), "search.optimization_level", "optimization_level=4", "AdaRound")


def test_unknown_target(write_config) -> None:
    assert_refused(write_config(target="hailo8x"), "target", "'hailo8x'", "did you mean 'hailo8'")


def test_missing_model(write_config, tmp_path) -> None:
    assert_refused(write_config(model=str(tmp_path / "nope.onnx")), "model", "not found")


def test_non_onnx_model(write_config, tmp_path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"this is not a protobuf" * 10)
    assert_refused(write_config(model=str(bogus)), "model", "not a valid ONNX model", "torch.onnx.export")


def test_layout_mixup_is_named(write_config, digits_data) -> None:
    raw = base_config(digits_data)
    raw["data"]["layout"] = "NCHW"  # the files are NHWC
    assert_refused(write_config(raw), "data.layout", "NHWC", "set data.layout: NHWC")


def with_calibration(digits_data, path: Path, array: np.ndarray) -> dict:
    """The example config with its calibration set replaced by ``array``, saved at ``path``."""
    np.save(path, array)
    raw = base_config(digits_data)
    raw["data"]["calibration"] = str(path)
    return raw


def test_shape_mismatch(write_config, digits_data, tmp_path) -> None:
    raw = with_calibration(digits_data, tmp_path / "small.npy", np.zeros((8, 64, 64, 1), np.uint8))
    assert_refused(write_config(raw), "small.npy", "(96, 128, 1)")


def test_nan_in_data(write_config, digits_data, tmp_path) -> None:
    bad = np.load(digits_data["calibration"]).astype(np.float32)[:200]
    bad[3, 10, 10, 0] = np.nan
    raw = with_calibration(digits_data, tmp_path / "nan.npy", bad)
    assert_refused(write_config(raw), "data.calibration", "NaN/inf", "sample 3")


def test_empty_data(write_config, digits_data, tmp_path) -> None:
    raw = with_calibration(digits_data, tmp_path / "empty.npy", np.zeros((0, 96, 128, 1), np.uint8))
    assert_refused(write_config(raw), "data.calibration", "empty")


def test_calibset_larger_than_data(write_config) -> None:
    assert_refused(write_config(search={"calibset_size": [64, 4096]}), "search.calibset_size", "4096", "1024 samples")


def test_labels_requested_but_absent(write_config, digits_data, tmp_path) -> None:
    x = np.load(digits_data["evaluation"])["x"]
    path = tmp_path / "nolabels.npz"
    np.savez(path, x=x)
    raw = base_config(digits_data)
    raw["data"]["evaluation"] = str(path)
    assert_refused(write_config(raw), "data.labels_key", "labels were requested", "no array 'y'")


def test_output_not_in_model(write_config) -> None:
    assert_refused(
        write_config(outputs={"logits": {"kind": "logits"}, "boxes": {}}), "outputs.boxes", "featmap, logits"
    )


def test_pickled_npy_is_refused_and_never_loaded(write_config, digits_data, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # runs on unpickling
            return (marker.write_text, ("loaded",))

    path = tmp_path / "evil.npy"
    np.save(path, np.array([Payload()], dtype=object), allow_pickle=True)
    raw = base_config(digits_data)
    raw["data"]["calibration"] = str(path)
    assert_refused(write_config(raw), "data.calibration", "pickled", "not loaded")
    assert not marker.exists(), "the pickle was executed"


def test_yaml_is_loaded_safely(write_config, tmp_path) -> None:
    marker = tmp_path / "yaml-pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    code, out = run_cli(cfg)
    assert code == 2 and "not valid YAML" in out
    assert not marker.exists()


@pytest.mark.parametrize("metric", ["logits.nope", "boxes.mae", "featmap.softmax_mae"])
def test_bad_objective_metric(write_config, metric) -> None:
    assert_refused(write_config(objective={"metric": metric, "stage": "device"}), "objective.metric")


def test_model_path_relative_to_config(tmp_path, digits_data) -> None:
    """Relative paths resolve against the config file, not the working directory."""
    from hailo_sweep.config import load_config

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.onnx").write_bytes(MODEL.read_bytes())
    raw = base_config(digits_data, model="m/x.onnx")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert load_config(cfg_path).model == (tmp_path / "m" / "x.onnx").resolve()


def test_unknown_finding_in_a_constraint(write_config) -> None:
    assert_refused(
        write_config(constraints=[{"metric": "findings.nope", "stage": "device", "max": 0}]), "constraints[0].metric", "unknown finding", "device_disagrees"
    )


# -- round two (issue 15): input that used to get through -------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(write_config) -> None:
    cfg = write_config()
    lines = cfg.read_text().splitlines()
    first = lines.index("trials: 4") + 1
    cfg.write_text("\n".join([*lines, "trials: 1"]) + "\n")
    assert_refused(cfg, "key 'trials' appears twice", f"line {first} and line {len(lines) + 1}", "fix: keep one 'trials'")


def test_duplicate_keys_in_a_nested_mapping_are_refused(write_config) -> None:
    cfg = write_config()
    text = cfg.read_text().replace("  inputs_key: x\n", "  inputs_key: x\n  inputs_key: y\n")
    cfg.write_text(text)
    line = text.splitlines().index("  inputs_key: x") + 1
    assert_refused(cfg, "key 'inputs_key' appears twice", f"line {line} and line {line + 1}")


def with_labels(digits_data, path: Path, labels: np.ndarray) -> dict:
    with np.load(digits_data["evaluation"]) as data:
        np.savez(path, x=data["x"], y=labels)
    raw = base_config(digits_data)
    raw["data"]["evaluation"] = str(path)
    return raw


@pytest.mark.parametrize("bad", [10, -1])
def test_labels_outside_the_class_range_are_refused_up_front(write_config, digits_data, tmp_path, bad) -> None:
    with np.load(digits_data["evaluation"]) as data:
        labels = data["y"].copy()
    labels[7] = bad
    raw = with_labels(digits_data, tmp_path / "badlabels.npz", labels)
    assert_refused(write_config(raw), "data.labels_key", "'logits' has 10 classes", f"first bad label is {bad} (sample 7)", "[0, 9]")


def test_constant_calibration_data_is_refused(write_config, digits_data, tmp_path) -> None:
    raw = with_calibration(digits_data, tmp_path / "zeros.npy", np.zeros((256, 96, 128, 1), np.uint8))
    assert_refused(write_config(raw), "data.calibration", "zeros.npy is constant", "every value of its 256 samples is 0")


def test_constant_evaluation_data_is_refused(write_config, digits_data, tmp_path) -> None:
    path = tmp_path / "grey.npz"
    with np.load(digits_data["evaluation"]) as data:
        np.savez(path, x=np.full_like(data["x"], 128), y=data["y"])
    raw = base_config(digits_data)
    raw["data"]["evaluation"] = str(path)
    assert_refused(write_config(raw), "data.evaluation", "grey.npz is constant")


def test_copies_of_one_sample_are_refused(write_config, digits_data, tmp_path) -> None:
    one = np.load(digits_data["calibration"])[:1]
    raw = with_calibration(digits_data, tmp_path / "same.npy", np.repeat(one, 128, axis=0))
    assert_refused(write_config(raw), "data.calibration", "128 copies of one sample")


def loop(tmp_path: Path, name: str) -> Path:
    link = tmp_path / name
    link.symlink_to(link)
    return link


@pytest.mark.parametrize("role", ["model", "calibration", "evaluation"])
def test_a_symlink_loop_where_a_file_is_expected_is_refused(write_config, digits_data, tmp_path, role) -> None:
    link = loop(tmp_path, f"loop-{role}.{'onnx' if role == 'model' else 'npy'}")
    raw = base_config(digits_data)
    if role == "model":
        raw["model"] = str(link)
    else:
        raw["data"][role] = str(link)
    assert_refused(write_config(raw), "model" if role == "model" else f"data.{role}", "is a symlink loop", "fix:")


def test_a_config_that_is_a_symlink_loop_is_refused(tmp_path) -> None:
    code, out = run_cli(loop(tmp_path, "loop.yaml"))
    assert code == 2, out
    assert "loop.yaml is a symlink loop" in " ".join(out.split())
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("role", ["config", "model", "calibration"])
def test_a_directory_where_a_file_is_expected_is_refused(write_config, digits_data, tmp_path, role) -> None:
    folder = tmp_path / f"a-folder.{'yaml' if role == 'config' else 'onnx' if role == 'model' else 'npy'}"
    folder.mkdir()
    if role == "config":
        code, out = run_cli(folder)
        assert code == 2 and "is a directory, not a file" in " ".join(out.split()), out
        return
    raw = base_config(digits_data)
    if role == "model":
        raw["model"] = str(folder)
    else:
        raw["data"]["calibration"] = str(folder)
    flat = assert_refused(write_config(raw), "is a directory, not a file")
    assert "not found" not in flat


def lying_npy(path: Path, shape: tuple[int, ...], data_bytes: int = 4096) -> Path:
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
        fh.write(b"\0" * data_bytes)
    return path


def test_a_npy_header_claiming_a_petabyte_is_refused_before_allocating(write_config, digits_data, tmp_path) -> None:
    path = lying_npy(tmp_path / "huge.npy", (2**38, 96, 128, 1))  # 4 * 2**38 * 12288 bytes: about 13 PB
    raw = base_config(digits_data)
    raw["data"]["calibration"] = str(path)
    assert_refused(write_config(raw), "data.calibration", "huge.npy: the header claims an array of shape (274877906944, 96, 128, 1)", "holds 4096 bytes")


def test_a_npz_member_whose_header_lies_is_refused(write_config, digits_data, tmp_path) -> None:
    import zipfile

    member = lying_npy(tmp_path / "x.npy", (2**30, 96, 128, 1))
    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(member, "x.npy")
    raw = base_config(digits_data)
    raw["data"]["calibration"] = str(path)
    raw["data"]["labels_key"] = None
    assert_refused(write_config(raw), "data.calibration", "lying.npz (array 'x'): the header claims", "holds 4096 bytes")


def test_an_object_array_inside_a_npz_is_refused_from_its_header(write_config, digits_data, tmp_path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    raw = base_config(digits_data)
    raw["data"]["calibration"] = str(path)
    assert_refused(write_config(raw), "data.calibration", "pickled", "not loaded")


def test_finetune_on_the_embedded_backend_is_refused(write_config) -> None:
    assert_refused(write_config(search={"optimization_level": [0], "finetune": ["disabled", "enabled"]}), "search.finetune", "finetune='enabled'", "fix:")


def test_a_yaml_boolean_knob_value_names_the_fix(write_config) -> None:
    cfg = write_config(search={"optimization_level": [0]})
    cfg.write_text(cfg.read_text().replace("search:\n", "search:\n  equalization: [on, off]\n"))
    assert_refused(cfg, "search.equalization", "enabled/disabled")


@pytest.mark.parametrize("command", [["best"], ["diagnose", "--trial", "0"]])
def test_a_sweep_that_never_ran_is_refused_without_creating_its_store(write_config, command: list[str]) -> None:
    """`best` or `diagnose` before `run` (or from another directory): a clear refusal, and no empty database left."""
    config = write_config()
    result = runner.invoke(app, [command[0], str(config), *command[1:]])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "no sweep named" in flat and "does not exist" in flat and "hailo-sweep run" in flat, flat
    assert not (config.parent / "sweeps" / "optuna.db").exists(), "an empty study store was created"
