"""Plots logged with each trial. Matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LADDER_STAGES = ("fp_optimized", "emulated", "bit_exact", "device")
STAGE_LABELS = {
    "fp_optimized": "float optimized",
    "emulated": "quantized emulation",
    "bit_exact": "bit-exact emulation",
    "device": "device",
}


def error_ladder(metrics: Mapping[str, float], outputs: Sequence[str], path: Path, metric: str = "nmae") -> Path:
    """Error of each stage against the float reference, one line per output, stages left to right."""
    stages = [s for s in LADDER_STAGES if any(f"{s}.{o}.{metric}" in metrics for o in outputs)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for output in outputs:
        ys = [metrics.get(f"{s}.{output}.{metric}", float("nan")) for s in stages]
        ax.plot(range(len(stages)), ys, marker="o", label=output)
    ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages])
    ax.set_ylabel(f"{metric} vs float ONNX")
    ax.set_title("Error ladder: where the error comes from")
    if all(metrics.get(f"{s}.{o}.{metric}", 0) > 0 for s in stages for o in outputs):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
