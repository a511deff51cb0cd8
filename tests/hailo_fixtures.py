"""Fixtures for the ``hailo`` backend tests: the contract fakes on ``sys.path``, and a tiny two-output ONNX model.

Register in ``tests/conftest.py`` with ``from hailo_fixtures import hailo_fakes, tiny_model  # noqa: F401``.
``hailo_fakes`` puts ``tests/fakes`` first on ``sys.path`` for one test and removes every fake module from
``sys.modules`` before and after, so no test sees another test's fake state and the real packages (if installed)
are never shadowed outside these tests.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hailo_sweep.backends.base import BackendContext, ModelIO, Normalization

FAKES = Path(__file__).parent / "fakes"
FAKE_MODULES = ("hailo_sdk_client", "hailo_platform", "_fake_hailo_core")


def purge_fake_modules() -> None:
    for name in list(sys.modules):
        if any(name == root or name.startswith(root + ".") for root in FAKE_MODULES):
            del sys.modules[name]


@dataclass
class FakeHailo:
    """Handles on the imported fakes: ``sdk`` (hailo_sdk_client), ``platform`` (hailo_platform), ``system``."""

    sdk: ModuleType
    platform: ModuleType
    pyhailort: ModuleType
    system: Any


@pytest.fixture
def hailo_fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHailo]:
    purge_fake_modules()
    monkeypatch.syspath_prepend(str(FAKES))
    try:
        sdk = importlib.import_module("hailo_sdk_client")
        platform = importlib.import_module("hailo_platform")
        pyhailort = importlib.import_module("hailo_platform.pyhailort.pyhailort")
        system = importlib.import_module("hailo_platform._fake_system").SYSTEM
        yield FakeHailo(sdk=sdk, platform=platform, pyhailort=pyhailort, system=system)
    finally:
        purge_fake_modules()


# -- a tiny model: NCHW 1-channel input, a feature map and logits ---------------------------------------------------------
H, W = 8, 8
MEAN, STD = 100.0, 50.0  # normalization in the raw 0..255 domain


def build_tiny_onnx(path: Path) -> Path:
    """image[N,1,8,8] -> Conv(3x3, 2 ch) -> Relu = "feat" [N,2,8,8]; GAP -> Flatten -> Gemm = "logits" [N,3].

    Node names differ from tensor names on purpose, so output mapping must go through the producing nodes.
    """
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((2, 1, 3, 3)) * 0.4).astype(np.float32)
    b1 = np.array([0.1, -0.05], np.float32)
    w2 = rng.standard_normal((3, 2)).astype(np.float32)
    b2 = np.array([0.2, -0.1, 0.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["conv_out"], name="/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["feat"], name="/stem/Relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="/head/GAP"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/head/Flatten"),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="/head/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, H, W])],
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 2, H, W]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@dataclass
class TinyModel:
    path: Path
    model_io: ModelIO
    normalization: Normalization
    calibration: np.ndarray  # raw uint8, NCHW
    evaluation: np.ndarray  # raw uint8, NCHW

    def feed(self, raw: np.ndarray, placement: str) -> np.ndarray:
        """What the pipeline feeds a stage: normalized float32 (host) or the raw uint8 frames (model)."""
        return self.normalization.apply(raw) if placement == "host" else raw.astype(np.uint8)

    def context(self, work_dir: Path, target: str = "hailo8", **options: Any) -> BackendContext:
        return BackendContext(
            model_path=self.path,
            target=target,
            work_dir=work_dir,
            model_io=self.model_io,
            normalization=self.normalization,
            domain=(0.0, 255.0),
            options=options,
        )


def build_deep_onnx(path: Path) -> Path:
    """image[N,1,8,8] -> Conv(3x3, 4 ch) -> Relu = "a"; a*a -> Conv(1x1, 2 ch) = "feat" [N,2,8,8];
    GAP(a) -> Flatten -> Gemm = "logits" [N,3].

    Three hidden layers (conv+relu, the square, the pooling) between input and outputs. The square is heavy-tailed (a
    few large values set its range, most values are small), so 8-bit quantization loses most there: the layer a
    noise ranking should find first.
    """
    rng = np.random.default_rng(11)
    w1 = (rng.standard_normal((4, 1, 3, 3)) * 0.4).astype(np.float32)
    b1 = np.array([0.1, -0.05, 0.0, 0.2], np.float32)
    w2 = (rng.standard_normal((2, 4, 1, 1)) * 0.5).astype(np.float32)
    b2 = np.zeros(2, np.float32)
    w3 = rng.standard_normal((3, 4)).astype(np.float32)
    b3 = np.array([0.2, -0.1, 0.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="/body/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="/body/Relu"),
        helper.make_node("Mul", ["a", "a"], ["sq"], name="/body/Square"),
        helper.make_node("Conv", ["sq", "w2", "b2"], ["feat"], name="/head/Conv"),
        helper.make_node("GlobalAveragePool", ["a"], ["gap"], name="/head/GAP"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="/head/Flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="/head/Gemm", transB=1),
    ]
    weights = ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"))
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, H, W])],
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 2, H, W]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(a, n) for a, n in weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _frames() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    calibration = rng.integers(0, 256, size=(48, 1, H, W), dtype=np.uint8)
    calibration[0, 0, 0, 0], calibration[0, 0, 0, 1] = 0, 255  # the calibration set spans the full 0..255 range
    evaluation = rng.integers(0, 256, size=(6, 1, H, W), dtype=np.uint8)
    return calibration, evaluation


@pytest.fixture
def deep_model(tmp_path: Path) -> TinyModel:
    """The model of ``build_deep_onnx`` with the tiny model's data, normalization and output names."""
    calibration, evaluation = _frames()
    return TinyModel(
        path=build_deep_onnx(tmp_path / "deep.onnx"),
        model_io=ModelIO(input_name="image", input_shape=("N", 1, H, W), output_names=("feat", "logits")),
        normalization=Normalization(mean=(MEAN,), std=(STD,)),
        calibration=calibration,
        evaluation=evaluation,
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> TinyModel:
    path = build_tiny_onnx(tmp_path / "tiny.onnx")
    calibration, evaluation = _frames()
    return TinyModel(
        path=path,
        model_io=ModelIO(input_name="image", input_shape=("N", 1, H, W), output_names=("feat", "logits")),
        normalization=Normalization(mean=(MEAN,), std=(STD,)),
        calibration=calibration,
        evaluation=evaluation,
    )


def hold_device_lock(lock_path: Path) -> subprocess.Popen[str]:
    """Another process holding a worker's device lock (as a second hailo-sweep worker would) until its stdin gets a
    line or is closed; returns once it holds the lock."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, ("pid %d on elsewhere" % os.getpid()).encode())
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc
