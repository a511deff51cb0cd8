"""Peer: Intel Neural Compressor 2.6 post-training quantization with a tuning strategy (run in its own venv).

The quantization is fully 8-bit (uint8 activations, int8 weights; fp32 is removed from every op type's choices, so
the strategy cannot fall back to float layers) and the tuning space includes the calibration size (64-512 frames of
the same pool). Every model the strategy evaluates is recorded with its device error (the QOperator model on ONNX
Runtime's integer kernels: logits MAE against the float model). INC maximizes the evaluation function, so it returns
the negated error; the accuracy goal is set out of reach and the timeout high so that all ``--evaluations`` trials run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import logits_mae, precision_report, run, session  # noqa: E402

SIZES = [64, 128, 256, 512]


class Loader:
    """INC's calibration dataloader protocol: ``batch_size`` and an iterator of (inputs, label)."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.batch_size = 1

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(len(self.data)):
            yield self.data[i : i + 1], 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--seeds", default="0")
    p.add_argument("--evaluations", type=int, default=30)
    p.add_argument("--strategy", default="bayesian")
    a = p.parse_args()
    logging.disable(logging.WARNING)
    import onnx
    from neural_compressor import PostTrainingQuantConfig, quantization, set_random_seed
    from neural_compressor.config import AccuracyCriterion, TuningCriterion

    d = np.load(a.data)
    calib, evaluation = d["calib"], d["eval"]
    outputs = [k.removeprefix("ref_") for k in d.files if k.startswith("ref_")]
    ref = {o: d[f"ref_{o}"] for o in outputs}
    model = onnx.load(a.model)
    result = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        set_random_seed(seed)
        trace: list[dict] = []
        t_last = [time.perf_counter()]

        def evaluate(m, trace=trace, t_last=t_last):  # type: ignore[no-untyped-def]
            proto = getattr(m, "model", m)
            dev = run(session(proto, optimized=True), evaluation, outputs)
            value = logits_mae(dev, ref)
            now = time.perf_counter()
            is_float = not any(n.op_type in ("QuantizeLinear", "QLinearConv", "DequantizeLinear") for n in proto.graph.node)
            if not is_float:  # INC evaluates the float model first, as its baseline: not a trial
                trace.append({"value": value, "seconds": now - t_last[0], "precision": precision_report(proto)})
            t_last[0] = time.perf_counter()
            return -value

        op8 = {"weight": {"dtype": ["int8"]}, "activation": {"dtype": ["uint8"]}}
        config = PostTrainingQuantConfig(
            approach="static", quant_format="default", calibration_sampling_size=SIZES,
            op_type_dict={op: op8 for op in ("Conv", "Gemm", "MatMul", "MaxPool", "Relu", "ReduceMean", "Add", "GlobalAveragePool")},
            tuning_criterion=TuningCriterion(strategy=a.strategy, max_trials=a.evaluations, timeout=10**6),
            accuracy_criterion=AccuracyCriterion(higher_is_better=True, criterion="absolute", tolerable_loss=1e-9),
        )
        start = time.perf_counter()
        quantization.fit(model, config, calib_dataloader=Loader(calib), eval_func=evaluate)
        result[str(seed)] = {"trace": trace[: a.evaluations], "wall_s": time.perf_counter() - start}
    Path(a.out).write_text(json.dumps({"strategy": a.strategy, "seeds": result}))


if __name__ == "__main__":
    main()
