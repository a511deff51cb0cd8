"""Benchmark: the real-model corpus swept by hailo-sweep vs plain ONNX Runtime ``quantize_static`` (issue 10, Numbers).

Per corpus model, side by side in one run, on the same calibration and evaluation samples (built by
``hailo_sweep.examples.corpus``; host normalization, QDQ, per-channel int8 weights, uint8 activations):

- parity: the sweep's level-0 trial (the baseline: MinMax) vs plain ``quantize_static`` MinMax on the same samples,
  device SQNR (integer kernels) of the total over outputs; target |difference| <= 0.05 dB;
- quality: the sweep's best over ``--evaluations`` (<= 16) trials whose 16-bit activations stay within 10 % of the
  model's layers vs plain ``quantize_static`` Percentile (99.999) on all calibration samples; the all-16-bit figure
  (a one-trial sweep with ``all_16bit: all``) beside it;
- memory: peak RSS of the sweep process (targets: < 3 GB up to 2 M parameters at 224x224 with 256 calibration samples,
  < 6 GB for the large-input detectors);
- time: a trial's optimize stage (MinMax and Percentile, the first trial of each, calibration included) vs plain
  ``quantize_static`` with the same method; target <= 2x.

Plain Percentile holds every sample's activations at once (ORT's calibrator; see docs/onnxruntime-quantization.md),
so the plain side calibrates in chunks of 16 samples with ORT's own ``CalibStridedMinMax`` option.
Every sweep and every plain quantization runs in its own child process, so each peak RSS is that step's alone.

Usage: ``python benchmarks/bench_real_models.py [--models orientation ppocr_cls] [--evaluations 16] [--calib 256]
[--eval 32] [--json out.json]``. Expect minutes per model (the large-input detectors: tens of minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hailo_sweep.examples.corpus import BY_NAME, materialize  # noqa: E402

TARGETS = {"parity_db": 0.05, "rss_mb_small": 3072.0, "rss_mb_detector": 6144.0, "time_ratio": 2.0}
DETECTORS = ("ppocr_det", "layout_cdla")
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PLAIN_CHUNK = 16


# ----------------------------------------------------------------------------------------------------- children
def _child(args: list[str]) -> dict[str, Any]:
    """Run ``python args...`` in a child; its wall time and peak RSS (the child's own, measured by a wrapper)."""
    wrapper = (
        "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plain_child(model: str, data_dir: str, method: str, samples: int, out: str) -> None:
    """In a child: plain quantize_static of the float model (host normalization) on the first ``samples`` samples."""
    import contextlib
    import io
    import logging

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)
    calib = _normalized(model, np.load(Path(data_dir) / "calib.npy")[:samples])
    fixed = _fixed_batch(Path(data_dir) / "model.onnx")
    batch = fixed or 8

    class Reader(CalibrationDataReader):  # __len__/set_range: CalibStridedMinMax chunks it
        def __init__(self) -> None:
            self.start, self.end, self.i = 0, len(calib), 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= self.end:
                return None
            part = calib[self.i : min(self.i + batch, self.end)]
            self.i += batch
            if len(part) < batch:  # equal batch shapes (histograms; fixed-batch models): repeat the last sample
                part = np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])
            return {_input_name(Path(data_dir) / "model.onnx"): part}

        def __len__(self) -> int:
            return len(calib)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end, self.i = start_index, end_index, start_index

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"CalibStridedMinMax": PLAIN_CHUNK}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(Path(data_dir) / "model.onnx"), out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        extra_options=extra)
    print(json.dumps({"optimize_s": time.perf_counter() - start}))


# ------------------------------------------------------------------------------------------------------- helpers
def _config(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "configs" / "real" / f"{name}.yaml").read_text())


def _normalized(name: str, x: np.ndarray) -> np.ndarray:
    norm = _config(name).get("normalization")
    x = x.astype(np.float32)
    if norm:
        x = (x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # the corpus data is NHWC


def _input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def _fixed_batch(path: Path) -> int | None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dim = graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _layers(path: Path) -> int:
    import onnx

    return sum(n.op_type in LAYER_OPS for n in onnx.load(str(path), load_external_data=False).graph.node)


def _outputs(name: str, model: Path) -> tuple[Any, ...]:
    import onnx

    from hailo_sweep.metrics import OutputSpec

    declared = _config(name).get("outputs") or {}
    names = [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]
    return tuple(OutputSpec(name=n, batch_axis=(declared.get(n) or {}).get("batch_axis") or 0) for n in names)


def _run(model: Path, x: np.ndarray, outputs: tuple[Any, ...], *, level: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from hailo_sweep.onnx_runner import run_chunked, session

    levels = {"float": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "device": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    sess = session(model, levels[level])
    return run_chunked(sess, x, tuple(o.name for o in outputs), {o.name: o.batch_axis for o in outputs})


def _total_snr(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], outputs: tuple[Any, ...]) -> float:
    from hailo_sweep.metrics import stage_metrics

    return float(stage_metrics(reference, candidate, outputs)["total.snr_db"])


def _sweep_config(name: str, root: Path, data: Path, trials: int, search: dict[str, Any], suffix: str = "") -> Path:
    raw = _config(name)
    raw["name"] = f"{raw['name']}{suffix}"
    raw["model"] = str(data / "model.onnx")
    raw["data"]["calibration"] = str(data / "calib.npy")
    raw["data"]["evaluation"] = str(data / "eval.npz")
    raw["data"].pop("labels_key", None)
    raw["backend"] = "onnxruntime"
    raw["search"] = search
    raw["objective"] = {"metric": "total.snr_db", "stage": "device", "direction": "maximize"}
    raw["constraints"] = []
    raw["trials"] = trials
    raw["stores"] = {"root": str(root)}
    raw["diagnostics"] = {"layer_noise": False, "determinism_samples": 2}
    path = root / f"{name}{suffix}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _study_rows(config: Path) -> list[dict[str, Any]]:
    import optuna
    from mlflow.tracking import MlflowClient

    raw = yaml.safe_load(config.read_text())
    root = Path(raw["stores"]["root"])
    study = optuna.load_study(study_name=raw["name"], storage=f"sqlite:///{root / 'sweeps' / 'optuna.db'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params)}
        if "mlflow_run_id" in t.user_attrs:
            metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
            row["optimize_s"] = metrics.get("time.optimize_s")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------- one model
def bench_model(name: str, work: Path, evaluations: int, n_calib: int, n_eval: int) -> dict[str, Any]:
    sizes = (n_calib if name not in DETECTORS else min(n_calib, 64), n_eval if name not in DETECTORS else min(n_eval, 16))
    data = materialize(BY_NAME[name], work / "data", sizes=sizes)
    model = data / "model.onnx"
    calib_n = sizes[0]
    k16 = max(0, int(0.10 * _layers(model)))  # at most 10 % of the layers' activations at 16 bit
    space = {
        "optimization_level": [0, 1, 2],
        "calibset_size": [calib_n],
        "normalization_placement": ["host"],
        "calibration_method": ["minmax", "percentile"],
        "clipping_percentile": [99.9, 99.99, 99.999],
        "noisy_layers_16bit": sorted({0, k16}),
        "output_16bit": ["none"],
    }
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": name, "calibration_samples": calib_n, "evaluation_samples": sizes[1], "max_16bit_layers": k16}
    config = _sweep_config(name, root, data, evaluations, space)
    sweep = _child(["-m", "hailo_sweep.cli", "run", str(config), "--trials", str(evaluations)])
    result.update(sweep_rc=sweep["rc"], sweep_wall_s=sweep["wall_s"], sweep_peak_rss_mb=sweep["peak_rss_mb"])
    if sweep["rc"] != 0:
        result["sweep_error"] = sweep["err"][-1500:]
        return result
    rows = _study_rows(config)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    baseline = rows[0]
    result["baseline_params"] = baseline["params"]
    result["ours_level0_db"] = baseline["value"]
    result["ours_best_db"] = max(r["value"] for r in done)
    result["ours_best_params"] = max(done, key=lambda r: r["value"])["params"]
    first = {m: next((r for r in done if r["params"].get("calibration_method", "minmax") == m), None) for m in ("minmax", "percentile")}
    all16 = _child(["-m", "hailo_sweep.cli", "run", str(_sweep_config(name, root, data, 1, {**{k: [v[0]] for k, v in space.items()}, "all_16bit": ["all"]}, "-all16")), "--trials", "1"])
    rows16 = _study_rows(root / f"{name}-all16.yaml") if all16["rc"] == 0 else []
    result["ours_all16_db"] = rows16[0]["value"] if rows16 else None
    # the plain side
    outputs = _outputs(name, model)
    evaluation = _normalized(name, np.load(data / "eval.npz")["x"])
    reference = _run(model, evaluation, outputs, level="float")
    for method, samples in (("minmax", int(baseline["params"].get("calibset_size", calib_n))), ("percentile", calib_n)):
        out = root / f"plain-{method}.onnx"
        child = _child([__file__, "--plain", name, str(data), method, str(samples), str(out)])
        if child["rc"] != 0:
            result[f"plain_{method}_error"] = child["err"][-1500:]
            continue
        result[f"plain_{method}_db"] = _total_snr(reference, _run(out, evaluation, outputs, level="device"), outputs)
        result[f"plain_{method}_optimize_s"] = json.loads(child["out"].strip().splitlines()[-1])["optimize_s"]
        result[f"plain_{method}_peak_rss_mb"] = child["peak_rss_mb"]
        if first[method] is not None:
            result[f"ours_{method}_optimize_s"] = first[method]["optimize_s"]
            result[f"time_ratio_{method}"] = first[method]["optimize_s"] / result[f"plain_{method}_optimize_s"]
    if "plain_minmax_db" in result:
        result["parity_db"] = result["ours_level0_db"] - result["plain_minmax_db"]
    return result


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(BY_NAME), choices=list(BY_NAME))
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--calib", type=int, default=256, help="calibration samples (the detectors: at most 64)")
    parser.add_argument("--eval", type=int, default=32, help="evaluation samples (the detectors: at most 16)")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-"))
    results = []
    for name in args.models:
        start = time.perf_counter()
        r = bench_model(name, work, args.evaluations, args.calib, args.eval)
        r["bench_s"] = time.perf_counter() - start
        results.append(r)
        print(json.dumps(r, default=str), flush=True)
    head = ("model", "lvl0 dB", "plain MinMax", "parity", "best dB", "plain P99.999", "all-16", "RSS MB", "t MinMax x", "t Pctl x")
    print("\n" + " | ".join(head))
    for r in results:
        print(" | ".join([r["model"], _fmt(r.get("ours_level0_db")), _fmt(r.get("plain_minmax_db")), _fmt(r.get("parity_db"), "+.3f"),
                          _fmt(r.get("ours_best_db")), _fmt(r.get("plain_percentile_db")), _fmt(r.get("ours_all16_db")),
                          _fmt(r.get("sweep_peak_rss_mb"), ".0f"), _fmt(r.get("time_ratio_minmax")), _fmt(r.get("time_ratio_percentile"))]))
    summary = {"targets": TARGETS, "results": results, "max_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
