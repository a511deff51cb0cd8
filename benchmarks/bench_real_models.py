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
- time: a trial's optimize stage (MinMax and Percentile, level 0, calibration included: a one-trial sweep of those
  settings with a cold cache) vs plain ``quantize_static`` with the same method, the two alternated ``--time-repeats``
  times (median and every ratio reported; the machine is shared, so one pair alone says little); target <= 2x. The
  main sweep's first trial of each method is reported beside it (``sweep_first_*``): it may also equalize, correct
  biases or rank noisy layers, which plain ``quantize_static`` does not do.

Plain Percentile holds every sample's activations at once (ORT's calibrator; see docs/onnxruntime-quantization.md).
The plain side therefore calibrates all samples in one pass where they hold at most ``PLAIN_ONE_PASS_ELEMENTS`` input
values, and otherwise in chunks of 16 samples with ORT's own ``CalibStridedMinMax`` option (``plain_pass`` in the
report). The two are not the same calibration: each chunk after the first re-bins ORT's histograms, so a chunked
Percentile gets other thresholds than one pass (on ddddocr 25.97 dB chunked vs 25.81 dB in one pass, which is also
what the sweep's own Percentile gives at the same settings).
Every sweep and every plain quantization runs in its own child process, so each peak RSS is that step's alone.

Usage: ``python benchmarks/bench_real_models.py [--models orientation ppocr_cls] [--evaluations 16] [--calib 256]
[--eval 32] [--time-repeats 3] [--json out.json]``. Expect minutes per model (the large-input detectors: tens of minutes).
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
PLAIN_ONE_PASS_ELEMENTS = 16 << 20  # input values of a one-pass plain calibration (256 samples of 3x60x160 fit)


def plain_pass(data: Path, samples: int) -> int:
    """Samples per plain calibration pass: all of them when they are small enough, else ``PLAIN_CHUNK``."""
    shape = np.load(data / "calib.npy", mmap_mode="r").shape
    return samples if samples * int(np.prod(shape[1:])) <= PLAIN_ONE_PASS_ELEMENTS else PLAIN_CHUNK


# ----------------------------------------------------------------------------------------------------- children
def _child(args: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """Run ``python args...`` in a child; its wall time and peak RSS (the child's own, measured by a wrapper)."""
    wrapper = (
        "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args], capture_output=True, text=True, check=True, cwd=cwd)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plain_child(model: str, data_dir: str, method: str, samples: int, out: str, chunk: int) -> None:
    """In a child: plain quantize_static of the float model (host normalization) on the first ``samples`` samples,
    calibrated ``chunk`` samples per pass."""
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

    # ONNX Runtime's documented flow: pre-process (shape inference, BatchNormalization folded), then quantize; the
    # sweep pre-processes once per sweep too, so neither side's optimize time includes it
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    source = onnx.load(str(Path(data_dir) / "model.onnx"))
    if source.opset_import[0].version < 13:  # per-channel QDQ needs opset 13 (DequantizeLinear's axis)
        source = onnx.version_converter.convert_version(source, 13)
    upgraded = str(Path(out).with_suffix(".opset.onnx"))
    onnx.save(source, upgraded)
    pre = str(Path(out).with_suffix(".pre.onnx"))
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            quant_pre_process(upgraded, pre)
        except Exception:  # noqa: BLE001 - symbolic shape inference gives up on some exports: retry without it
            quant_pre_process(upgraded, pre, skip_symbolic_shape=True)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    extra: dict[str, Any] = {"CalibStridedMinMax": chunk} if chunk < samples else {}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
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
    with np.load(data / "eval.npz") as made:
        if raw["data"].get("labels_key") not in made.files:  # the config's labels only when the data made has them
            raw["data"].pop("labels_key", None)
    raw["backend"] = "onnxruntime"
    raw["search"] = search
    raw["objective"] = {"metric": "total.snr_db", "stage": "device", "direction": "maximize"}
    raw["constraints"] = []
    for metric in (raw.get("metrics") or {}).values():  # task metrics: the file beside the shipped config
        file, _, function = metric["function"].rpartition(":")
        metric["function"] = f"{REPO / 'configs' / 'real' / file}:{function}"
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
            row["task"] = {k: v for k, v in metrics.items() if k.startswith("device.task.")}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------- time
def time_ratios(name: str, root: Path, data: Path, calib_n: int, repeats: int) -> dict[str, Any]:
    """A trial's optimize stage vs plain ``quantize_static`` with the same calibration method, side by side.

    Per method and repeat, in this order, each in its own process: plain ``quantize_static`` (its call only), then a
    one-trial sweep of exactly those settings (level 0: no equalization, no bias correction, no 16-bit layers; a cold
    calibration cache), whose ``time.optimize_s`` is read from MLflow. Alternating the two puts them under the same
    load (this machine is shared); the ratio per repeat, its median and spread are reported.
    """
    ratios: dict[str, list[float]] = {"minmax": [], "percentile": []}
    seconds: dict[str, list[tuple[float, float]]] = {"minmax": [], "percentile": []}
    for rep in range(repeats):
        for method in ratios:
            space = {"optimization_level": [0], "calibset_size": [calib_n], "normalization_placement": ["host"], "calibration_method": [method],
                     "clipping_percentile": [99.999], "noisy_layers_16bit": [0], "output_16bit": ["none"]}
            where = root / f"time-{method}-{rep}"
            where.mkdir(parents=True, exist_ok=True)
            plain = _child([str(Path(__file__).resolve()), "--plain", name, str(data), method, str(calib_n), str(where / "plain.onnx"),
                            str(plain_pass(data, calib_n))], cwd=where)
            config = _sweep_config(name, where, data, 1, space, f"-time-{method}-{rep}")
            ours = _child(["-m", "hailo_sweep.cli", "run", str(config), "--trials", "1"])
            if plain["rc"] != 0 or ours["rc"] != 0:
                continue
            plain_s = json.loads(plain["out"].strip().splitlines()[-1])["optimize_s"]
            ours_s = _study_rows(config)[0]["optimize_s"]
            seconds[method].append((round(ours_s, 2), round(plain_s, 2)))
            ratios[method].append(ours_s / plain_s)
    out: dict[str, Any] = {}
    for method, values in ratios.items():
        if values:
            out[f"time_ratio_{method}"] = float(np.median(values))
            out[f"time_ratio_{method}_all"] = [round(v, 2) for v in values]
            out[f"time_s_{method}_ours_plain"] = seconds[method]
    return out


# ---------------------------------------------------------------------------------------------------------- one model
def bench_model(name: str, work: Path, evaluations: int, n_calib: int, n_eval: int, time_repeats: int) -> dict[str, Any]:
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
    if baseline.get("task"):  # task metrics of the config (decoded strings, text masks): level 0 and the best trial
        result["ours_level0_task"] = baseline["task"]
        result["ours_best_task"] = max(done, key=lambda r: r["value"]).get("task")
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
        chunk = plain_pass(data, samples)
        result[f"plain_{method}_pass"] = "one" if chunk >= samples else f"chunks of {chunk}"
        child = _child([str(Path(__file__).resolve()), "--plain", name, str(data), method, str(samples), str(out), str(chunk)], cwd=root)
        if child["rc"] != 0:
            result[f"plain_{method}_error"] = child["err"][-1500:]
            continue
        result[f"plain_{method}_db"] = _total_snr(reference, _run(out, evaluation, outputs, level="device"), outputs)
        result[f"plain_{method}_peak_rss_mb"] = child["peak_rss_mb"]
        if first[method] is not None:  # the sweep's first trial of this method, whatever else it does (levels, 16-bit)
            result[f"sweep_first_{method}_optimize_s"] = first[method]["optimize_s"]
    result.update(time_ratios(name, root, data, calib_n, time_repeats))
    if "plain_minmax_db" in result:
        result["parity_db"] = result["ours_level0_db"] - result["plain_minmax_db"]
    return result


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--plain":
        plain_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], int(sys.argv[7]) if len(sys.argv) > 7 else PLAIN_CHUNK)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(BY_NAME), choices=list(BY_NAME))
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--calib", type=int, default=256, help="calibration samples (the detectors: at most 64)")
    parser.add_argument("--eval", type=int, default=32, help="evaluation samples (the detectors: at most 16)")
    parser.add_argument("--time-repeats", type=int, default=3, help="repeats of the side-by-side optimize timing per method")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-real-"))
    results = []
    for name in args.models:
        start = time.perf_counter()
        r = bench_model(name, work, args.evaluations, args.calib, args.eval, args.time_repeats)
        r["bench_s"] = time.perf_counter() - start
        results.append(r)
        print(json.dumps(r, default=str), flush=True)
    head = ("model", "lvl0 dB", "plain MinMax", "parity", "best dB", "plain P99.999", "pass", "all-16", "RSS MB", "t MinMax x", "t Pctl x")
    print("\n" + " | ".join(head))
    for r in results:
        print(" | ".join([r["model"], _fmt(r.get("ours_level0_db")), _fmt(r.get("plain_minmax_db")), _fmt(r.get("parity_db"), "+.3f"),
                          _fmt(r.get("ours_best_db")), _fmt(r.get("plain_percentile_db")), str(r.get("plain_percentile_pass", "-")), _fmt(r.get("ours_all16_db")),
                          _fmt(r.get("sweep_peak_rss_mb"), ".0f"), _fmt(r.get("time_ratio_minmax")), _fmt(r.get("time_ratio_percentile"))]))
    summary = {"targets": TARGETS, "results": results, "max_rss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
