"""Peer: a random search over plain ``onnxruntime.quantization.quantize_static`` (run in its own venv).

The space: calibration statistic (MinMax, Entropy, Percentile 99.99 / 99.999) x per-channel weights (yes/no) x
calibration size (64-512 frames of the pool); with ``--allow16`` also the 16-bit outputs (none, logits, featmap, both).
Each seed visits the points in its own random order, without repeats, for ``--evaluations`` points. Each evaluation:
quantize_static (QDQ, uint8 activations, int8 weights), then the integer run (ORT_ENABLE_ALL fuses QDQ into integer
kernels) over the evaluation set; objective: logits MAE against the float model.
``--timing POINT``: the plain script of the wall-time comparison: quantize_static, one QDQ emulation run
(ORT_DISABLE_ALL) and one integer run, for one point, timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import logits_mae, precision_report, run, session  # noqa: E402

METHODS = {"minmax": (CalibrationMethod.MinMax, None), "entropy": (CalibrationMethod.Entropy, None),
           "p99.99": (CalibrationMethod.Percentile, 99.99), "p99.999": (CalibrationMethod.Percentile, 99.999)}
SIZES = (64, 128, 256, 512)
OUT16 = ("none", "logits", "featmap", "all")


class Reader(CalibrationDataReader):
    def __init__(self, data: np.ndarray, name: str):
        self.data, self.name, self.i = data, name, 0

    def get_next(self):  # type: ignore[no-untyped-def]
        if self.i >= len(self.data):
            return None
        self.i += 1
        return {self.name: self.data[self.i - 1 : self.i]}


def quantize(model: str, calib: np.ndarray, point: dict, out: Path, outputs: list[str]) -> onnx.ModelProto:
    method, pct = METHODS[point["method"]]
    extra: dict = {}
    if pct is not None:
        extra["CalibPercentile"] = pct
    wide = {"none": [], "all": outputs}.get(point.get("out16", "none"), [point.get("out16")])
    if wide:
        extra["TensorQuantOverrides"] = {o: [{"quant_type": QuantType.QUInt16}] for o in wide}
    name = onnx.load(model).graph.input[0].name
    quantize_static(model, str(out), Reader(calib[: point["n"]], name), quant_format=QuantFormat.QDQ, per_channel=point["per_channel"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method, extra_options=extra)
    return onnx.load(str(out))


def grid(allow16: bool) -> list[dict]:
    return [{"method": m, "per_channel": pc, "n": n, "out16": o}
            for m, pc, n, o in itertools.product(METHODS, (True, False), SIZES, OUT16 if allow16 else ("none",))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--seeds", default="0")
    p.add_argument("--evaluations", type=int, default=30)
    p.add_argument("--allow16", action="store_true")
    p.add_argument("--timing", help="JSON point: time the plain quantize + QDQ run + integer run for it")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    d = np.load(a.data)
    calib, evaluation = d["calib"], d["eval"]
    outputs = [k.removeprefix("ref_") for k in d.files if k.startswith("ref_")]
    ref = {o: d[f"ref_{o}"] for o in outputs}
    tmp = Path(tempfile.mkdtemp(prefix="qs-peer-"))
    if a.timing:
        point = json.loads(a.timing)
        walls = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            q = quantize(a.model, calib, point, tmp / "q.onnx", outputs)
            emu = run(session(q, optimized=False), evaluation, outputs)
            dev = run(session(q, optimized=True), evaluation, outputs)
            walls.append(time.perf_counter() - t0)
        first = outputs[0] if "logits" not in outputs else "logits"  # another model's first output (bench_walltime --config)
        Path(a.out).write_text(json.dumps({"walls": walls, "emulated_mae": logits_mae(emu, ref, first), "device_mae": logits_mae(dev, ref, first)}))
        return
    points = grid(a.allow16)
    cache: dict[str, dict] = {}
    result = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        order = random.Random(seed).sample(points, k=min(a.evaluations, len(points)))
        trace = []
        for point in order:
            key = json.dumps(point, sort_keys=True)
            if key not in cache:  # deterministic: a point measured for one seed is the same for the next
                t0 = time.perf_counter()
                q = quantize(a.model, calib, point, tmp / "q.onnx", outputs)
                dev = run(session(q, optimized=True), evaluation, outputs)
                cache[key] = {"value": logits_mae(dev, ref), "seconds": time.perf_counter() - t0, "precision": precision_report(q)}
            trace.append({"point": point, **cache[key]})
        result[str(seed)] = trace
    Path(a.out).write_text(json.dumps({"grid_points": len(points), "seeds": result}))


if __name__ == "__main__":
    main()
