"""``verify DIR`` trusts nothing in ``lock.json``, and ``diagnose`` refuses files it cannot read: each case exits 2
with a message naming the problem, reads nothing outside the export directory and rebuilds nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def export(sweep, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "export"
    proc = cli(sweep["root"], "best", str(sweep["config"]), "--export", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def compiled_of(export: Path) -> Path:
    return export / json.loads((export / "manifest.json").read_text())["files"]["compiled"]["name"]


def tampered(export: Path, tmp_path: Path, edit: Any) -> Path:
    """A copy of the export whose lock.json is ``edit(lock)`` (or the text ``edit`` when it is a string)."""
    copy = tmp_path / "tampered"
    shutil.copytree(export, copy)
    if isinstance(edit, str):
        (copy / "lock.json").write_text(edit)
    else:
        lock = json.loads((export / "lock.json").read_text())
        edit(lock)
        (copy / "lock.json").write_text(json.dumps(lock))
    return copy


def refused(root: Path, directory: Path, *fragments: str) -> str:
    proc = cli(root, "verify", str(directory))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "verified" not in out and "not reproduced" not in out, out
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in {out}"
    return out


def test_a_lock_that_is_not_json_is_refused(sweep, export, tmp_path) -> None:
    refused(sweep["root"], tampered(export, tmp_path, "{not json"), "lock.json", "not valid JSON")


def test_a_lock_missing_a_key_is_refused(sweep, export, tmp_path) -> None:
    refused(sweep["root"], tampered(export, tmp_path, lambda lock: lock.pop("model")), "not a valid lock file", "model: Field required")


def test_a_lock_naming_an_unknown_backend_is_refused(sweep, export, tmp_path) -> None:
    def edit(lock: dict) -> None:
        lock["backend"] = "tensorrt"

    refused(sweep["root"], tampered(export, tmp_path, edit), "not a valid lock file", "backend", "'onnxruntime' or 'hailo'")


def test_edited_settings_are_refused_not_rebuilt(sweep, export, tmp_path) -> None:
    def edit(lock: dict) -> None:
        lock["settings"]["calibset_size"] = 2 * int(lock["settings"]["calibset_size"])

    refused(sweep["root"], tampered(export, tmp_path, edit), "settings_sha256 does not match", "settings")


def test_a_file_name_outside_the_export_directory_is_never_read(sweep, export, tmp_path) -> None:
    def edit(lock: dict) -> None:
        lock["files"]["compiled"]["name"] = "../../../../../../../../etc/passwd"

    refused(sweep["root"], tampered(export, tmp_path, edit), "files.compiled.name", "points outside the export directory")


def test_a_symlink_out_of_the_export_directory_is_refused(sweep, export, tmp_path) -> None:
    def edit(lock: dict) -> None:
        lock["files"]["compiled"]["name"] = "escape.onnx"

    copy = tampered(export, tmp_path, edit)
    (copy / "escape.onnx").symlink_to(Path(sweep["cfg"]["model"]))
    refused(sweep["root"], copy, "'escape.onnx' points outside the export directory")


def test_a_config_pointing_at_another_model_than_the_hashed_one_is_refused(sweep, export, tmp_path) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(Path(sweep["cfg"]["model"]).read_bytes())

    def edit(lock: dict) -> None:
        lock["config"]["model"] = str(other)

    out = refused(sweep["root"], tampered(export, tmp_path, edit), "config.model", f"names {other}", "the file whose hash is recorded is")
    assert "rebuild" not in out


def test_a_config_pointing_at_other_data_than_the_hashed_data_is_refused(sweep, export, tmp_path) -> None:
    other = tmp_path / "other.npy"
    shutil.copy(sweep["cfg"]["data"]["calibration"], other)

    def edit(lock: dict) -> None:
        lock["config"]["data"]["calibration"] = str(other)

    refused(sweep["root"], tampered(export, tmp_path, edit), "config.data.calibration", "the file whose hash is recorded is")


def test_diagnose_refuses_a_compiled_file_of_random_bytes(sweep, tmp_path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = cli(sweep["root"], "diagnose", str(sweep["config"]), "--compiled", str(junk))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "--compiled: junk.onnx cannot be run by the onnxruntime backend" in out and "Traceback" not in out, out


def test_diagnose_refuses_a_directory_as_compiled_model(sweep, tmp_path) -> None:
    folder = tmp_path / "model.hef"
    folder.mkdir()
    proc = cli(sweep["root"], "diagnose", str(sweep["config"]), "--compiled", str(folder))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "compiled model" in out and "is a directory, not a file" in out and "Traceback" not in out, out


def test_diagnose_refuses_outputs_holding_an_object_array_without_unpickling(sweep, export, tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # runs on unpickling
            return (marker.write_text, ("loaded",))

    outputs = tmp_path / "outputs.npz"
    np.savez(outputs, featmap=np.array([Payload()], dtype=object), logits=np.zeros((2, 10), np.float32))
    proc = cli(sweep["root"], "diagnose", str(sweep["config"]), "--compiled", str(compiled_of(export)), "--outputs", str(outputs))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "--outputs" in out and "pickled" in out and "Traceback" not in out, out
    assert not marker.exists()


def test_diagnose_refuses_outputs_of_random_bytes(sweep, export, tmp_path) -> None:
    junk = tmp_path / "outputs.npz"
    junk.write_bytes(np.random.default_rng(1).bytes(2048))
    proc = cli(sweep["root"], "diagnose", str(sweep["config"]), "--compiled", str(compiled_of(export)), "--outputs", str(junk))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert "--outputs" in out and "cannot read" in out and "outputs.npz" in out and "Traceback" not in out, out
