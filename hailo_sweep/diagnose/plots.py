"""Diagnosis plots (matplotlib, Agg backend, no display): the error ladder with named steps, the emulator vs device
LSB histograms, and the per-layer noise. Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from hailo_sweep.backends.base import LayerNoise  # noqa: E402
from hailo_sweep.diagnose.ladder import STAGE_LABELS, STAGES, STEP_LABELS, STEPS, stage_errors  # noqa: E402

_PNG_METADATA = {"Software": None}  # no version string in the file: identical inputs give identical bytes


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata=_PNG_METADATA)
    plt.close(fig)
    return path


def ladder_plot(metrics: Mapping[str, float], outputs: Sequence[str], path: Path, metric: str = "nmae") -> Path:
    """Error of each stage against the float reference (one line per output), each step annotated with its name.

    Only the stages measured for at least one output are drawn. Between two neighbouring stages the step's name
    ("quantization cost", "compile/runtime cost", ...) is written with each output's cost under it.
    """
    per_output = {o: stage_errors(metrics, o, metric) for o in outputs}
    stages = [s for s in STAGES if any(s in errs for errs in per_output.values())]
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=100)
    for output, errs in per_output.items():
        xs = [i for i, s in enumerate(stages) if s in errs]
        ax.plot(xs, [errs[stages[i]] for i in xs], marker="o", label=output)
    ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages])
    ax.set_ylabel(f"{metric} vs float ONNX")
    ax.set_title("Error ladder: where the error comes from")
    ax.grid(True, alpha=0.3)
    top = max([max(errs.values()) for errs in per_output.values()] + [0.0])
    ax.set_ylim(0.0, top * 1.45 if top > 0 else 1.0)
    for step, _, after in STEPS:  # a step spans from the nearest measured earlier stage
        if after not in stages:
            continue
        start = max(i for i, s in enumerate(stages) if STAGES.index(s) < STAGES.index(after))
        end = stages.index(after)
        lines = [STEP_LABELS[step]]
        for output, errs in per_output.items():
            earlier = [s for s in STAGES[: STAGES.index(after)] if s in errs]
            if after in errs and earlier:
                lines.append(f"{output}: {errs[after] - errs[earlier[-1]]:+.3g}")
        ax.annotate(
            "\n".join(lines),
            xy=((start + end) / 2.0, 0.98),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
    if outputs:
        ax.legend(loc="center left", fontsize=8)
    return _save(fig, path)


def lsb_histogram_plot(histograms: Mapping[str, Mapping[int, int]], path: Path) -> Path:
    """Per output, how many elements differ by how many LSB between device and emulation (log counts)."""
    names = list(histograms)
    fig, axes = plt.subplots(max(len(names), 1), 1, figsize=(7.0, 2.4 * max(len(names), 1)), dpi=100, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        hist = histograms[name]
        values = sorted(hist)
        counts = [hist[v] for v in values]
        total = sum(counts)
        identical = hist.get(0, 0) / total if total else 0.0
        ax.bar(values, counts, width=0.8, color=["tab:green" if v == 0 else "tab:red" for v in values])
        if counts and max(counts) > 0:
            ax.set_yscale("log")
        ax.set_title(f"{name}: device - emulation in LSB ({identical:.2%} bit-identical)", fontsize=10)
        ax.set_xlabel("difference (LSB)")
        ax.set_ylabel("elements")
        ax.grid(True, axis="y", alpha=0.3)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no device vs emulation comparison", ha="center", va="center")
        axes[0, 0].set_axis_off()
    return _save(fig, path)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def layer_noise_plot(noise: Sequence[LayerNoise], path: Path, top: int = 20) -> Path:
    """The ``top`` noisiest layers (lowest SNR) as horizontal bars, noisiest at the top; outputs drawn in orange."""
    ranked = sorted(noise, key=lambda n: (n.snr_db, n.layer))[:top]
    fig, ax = plt.subplots(figsize=(8.0, 0.8 + 0.32 * max(len(ranked), 1)), dpi=100)
    if ranked:
        ys = range(len(ranked))
        ax.barh(list(ys), [n.snr_db for n in ranked], color=["tab:orange" if n.kind == "output" else "tab:blue" for n in ranked])
        ax.set_yticks(list(ys), [_short(n.layer) for n in ranked], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("SNR vs float (dB), lower = noisier")
        ax.grid(True, axis="x", alpha=0.3)
        handles = [Patch(color="tab:blue", label="activation"), Patch(color="tab:orange", label="model output")]
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no per-layer noise analysis", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"Per-layer noise: the {len(ranked)} noisiest layers")
    return _save(fig, path)
