"""Comparing outputs: float reference vs a stage's outputs, and emulation vs device in units of the quantization step.

Kept apart from execution (as Polygraphy keeps its comparators apart from its runners): backends produce arrays,
this module turns pairs of arrays into named scalar metrics (``hailo_sweep.lsb_metrics``: emulation vs device in LSB).
Nothing here knows about Optuna, MLflow or a toolchain.

Conventions
- Axis 0 is the batch (sample) axis of every output.
- Outputs arrive batch-first: runners move a declared ``batch_axis`` to the front (``hailo_sweep.onnx_runner``).
- For ``kind="logits"`` the class axis is the last axis; argmax/softmax are taken over it. ``kind="probabilities"``
  (the model ends in softmax) gets the same class metrics with the probabilities compared as they are (``prob_mae``,
  ``prob_label_mae``), never a second softmax.
- Every returned value is a finite python ``float``; accumulation is done in float64.
- Metric keys are ``"<output>.<metric>"`` and ``"total.<metric>"``; ``METRIC_DIRECTIONS`` / ``direction_of`` say
  whether lower or higher is better for each metric base name (the part after the last dot, so output names may
  contain dots, as ONNX names often do).

Edge cases, chosen so that every metric stays finite and comparable across trials:
- ``nmae`` divides by ``mean(|reference|)``, or by 1 when the reference is all zeros.
- ``snr_db`` is clamped to ``[-SNR_CAP_DB, SNR_CAP_DB]``: identical outputs give ``+SNR_CAP_DB``; a reference that is
  all zeros with a nonzero error gives ``-SNR_CAP_DB`` (no signal at all, only noise).
- ``cosine`` of two zero vectors is 1.0 (identical), of exactly one zero vector 0.0 (no shared direction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

SNR_CAP_DB = 200.0

OutputKind = Literal["tensor", "logits", "probabilities"]
OUTPUT_KINDS: tuple[str, ...] = ("tensor", "logits", "probabilities")
CLASS_KINDS: tuple[str, ...] = ("logits", "probabilities")
Direction = Literal["minimize", "maximize"]

METRIC_DIRECTIONS: dict[str, Direction] = {
    # against the float reference
    "mae": "minimize",
    "max_abs": "minimize",
    "rmse": "minimize",
    "nmae": "minimize",
    "snr_db": "maximize",
    "cosine": "maximize",
    # classification logits
    "top1_agreement": "maximize",
    "softmax_mae": "minimize",
    "softmax_label_mae": "minimize",
    "accuracy": "maximize",
    "accuracy_ref": "maximize",
    "accuracy_drop": "minimize",
    # class probabilities (kind probabilities): compared as given
    "prob_mae": "minimize",
    "prob_label_mae": "minimize",
    # emulation vs device, in LSB
    "lsb_max": "minimize",
    "lsb_mean": "minimize",
    "lsb_p99": "minimize",
    "identical_share": "maximize",
}

# Metrics aggregated into "total.<metric>" by stage_metrics: over all weighted outputs, and over logits outputs only.
_TOTAL_ALL = ("nmae", "snr_db", "cosine")
_TOTAL_LOGITS = ("top1_agreement", "softmax_mae", "accuracy", "accuracy_ref", "accuracy_drop", "softmax_label_mae", "prob_mae", "prob_label_mae")

#: the output kinds that have each class metric (other metrics exist for every output)
METRIC_KINDS: dict[str, tuple[str, ...]] = {
    **{base: CLASS_KINDS for base in ("top1_agreement", "accuracy", "accuracy_ref", "accuracy_drop")},
    "softmax_mae": ("logits",),
    "softmax_label_mae": ("logits",),
    "prob_mae": ("probabilities",),
    "prob_label_mae": ("probabilities",),
}


@dataclass(frozen=True)
class OutputSpec:
    """How one model output is compared: its ONNX name, its weight in the totals, and what it holds."""

    name: str
    weight: float = 1.0
    kind: OutputKind = "tensor"
    batch_axis: int = 0  # the axis of the model's output that holds the samples; runners move it to axis 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("output name must not be empty")
        if not np.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"output {self.name!r}: weight must be a finite number >= 0, got {self.weight}")
        if self.kind not in OUTPUT_KINDS:
            raise ValueError(f"output {self.name!r}: kind must be one of {OUTPUT_KINDS}, got {self.kind!r}")


def direction_of(metric_key: str) -> str:
    """Direction of a metric key such as ``"logits.softmax_mae"`` or ``"total.snr_db"``, from its base name."""
    base = metric_key.rsplit(".", 1)[-1]
    try:
        return METRIC_DIRECTIONS[base]
    except KeyError:
        known = sorted(METRIC_DIRECTIONS)
        raise KeyError(f"unknown metric {metric_key!r} (base name {base!r}); known: {known}") from None


# -- input checks and blocking ----------------------------------------------------------------------------------------

# Work on blocks of rows of about this many elements (256 kB in float64). Whole-array float64 temporaries of a few MB
# each cost milliseconds in fresh-page faults when several are alive at once; small blocks stay in reused memory.
_BLOCK_ELEMENTS = 32768


def check_pair(
    reference: np.ndarray, candidate: np.ndarray, names: tuple[str, str] = ("reference", "candidate")
) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (N, -1) views after checking the shapes match exactly and the batch is non-empty; ``names`` are
    the two arrays' roles in the error message."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: {names[0]} {ref.shape} vs {names[1]} {cand.shape}")
    if ref.ndim == 0 or ref.size == 0:
        raise ValueError(f"need a non-empty batch with axis 0 = samples, got shape {ref.shape}")
    n = ref.shape[0]
    return ref.reshape(n, -1), cand.reshape(n, -1)


def block_rows(n_rows: int, row_size: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, row_size))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _finite_block(ref: np.ndarray, cand: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """One block of rows as float64, refusing NaN/inf (the candidate is checked first: it is the usual culprit)."""
    c = cand[rows].astype(np.float64)
    if not np.isfinite(c).all():
        raise ValueError("candidate contains NaN/inf")
    r = ref[rows].astype(np.float64)
    if not np.isfinite(r).all():
        raise ValueError("reference contains NaN/inf")
    return r, c


@dataclass(frozen=True)
class _RowStats:
    """Per-sample sums from one pass over a (reference, candidate) pair; every tensor metric derives from these."""

    row_size: int
    abs_err: np.ndarray  # sum |c - r|
    max_err: np.ndarray  # max |c - r|
    sq_err: np.ndarray  # sum (c - r)^2
    abs_ref: np.ndarray  # sum |r|
    sq_ref: np.ndarray  # sum r^2
    sq_cand: np.ndarray  # sum c^2
    dot: np.ndarray  # sum r * c


def _row_stats(reference: np.ndarray, candidate: np.ndarray) -> _RowStats:
    ref, cand = check_pair(reference, candidate)
    n, size = ref.shape
    names = ("abs_err", "max_err", "sq_err", "abs_ref", "sq_ref", "sq_cand", "dot")
    acc = {k: np.empty(n, np.float64) for k in names}
    for rows in block_rows(n, size):
        r, c = _finite_block(ref, cand, rows)
        acc["sq_ref"][rows] = np.einsum("ij,ij->i", r, r)
        acc["sq_cand"][rows] = np.einsum("ij,ij->i", c, c)
        acc["dot"][rows] = np.einsum("ij,ij->i", r, c)
        np.abs(r, out=r)
        acc["abs_ref"][rows] = r.sum(axis=1)
        np.subtract(c, ref[rows], out=c)  # c now holds the error
        acc["sq_err"][rows] = np.einsum("ij,ij->i", c, c)
        np.abs(c, out=c)
        acc["abs_err"][rows] = c.sum(axis=1)
        acc["max_err"][rows] = c.max(axis=1)
    return _RowStats(row_size=size, **acc)


def _labels(labels: np.ndarray, expected_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Integer class indices of the argmax's shape; integral floats are accepted (.npz files often hold them)."""
    lab = np.asarray(labels)
    if lab.shape != expected_shape:
        raise ValueError(f"labels shape {lab.shape} does not match the logits' argmax shape {expected_shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.issubdtype(lab.dtype, np.floating) or not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError(f"labels must be integer class indices, got dtype {lab.dtype} with non-integral values")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got range [{lab.min()}, {lab.max()}]")
    return lab


# -- single output ---------------------------------------------------------------------------------------------------


def _softmax_inplace(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a float64 block, in place, shifted by the max so large logits do not overflow."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def _snr_db(signal_power: float, noise_power: float) -> float:
    if noise_power == 0.0:
        return SNR_CAP_DB
    if signal_power == 0.0:
        return -SNR_CAP_DB
    return float(np.clip(10.0 * np.log10(signal_power / noise_power), -SNR_CAP_DB, SNR_CAP_DB))


def _mean_cosine(stats: _RowStats) -> float:
    """Mean over samples of the cosine of the flattened sample vectors (1 for two zero vectors, 0 for one)."""
    denom = np.sqrt(stats.sq_ref) * np.sqrt(stats.sq_cand)  # two roots: the product of squares may overflow
    both_zero = (stats.sq_ref == 0) & (stats.sq_cand == 0)
    safe = np.where(denom > 0, denom, 1.0)
    cos = np.where(denom > 0, stats.dot / safe, np.where(both_zero, 1.0, 0.0))
    return float(np.clip(cos, -1.0, 1.0).mean())


def _tensor_metrics(stats: _RowStats) -> dict[str, float]:
    count = stats.abs_err.size * stats.row_size
    mae = float(stats.abs_err.sum()) / count
    ref_level = float(stats.abs_ref.sum()) / count
    noise_power = float(stats.sq_err.sum())
    return {
        "mae": mae,
        "max_abs": float(stats.max_err.max()),
        "rmse": float(np.sqrt(noise_power / count)),
        "nmae": mae / (ref_level if ref_level > 0 else 1.0),
        "snr_db": _snr_db(float(stats.sq_ref.sum()), noise_power),
        "cosine": _mean_cosine(stats),
    }


def _logits_metrics(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, probabilities: bool = False
) -> dict[str, float]:
    """Classification metrics over the last axis; positions (all leading axes) are processed in blocks.

    With ``probabilities`` the values already are class probabilities: they are compared as given (prob_* keys).

    Expects inputs already checked by ``_row_stats`` (same shape, finite).
    """
    ref_in = np.asarray(reference)
    if ref_in.ndim < 2:
        raise ValueError(f"logits need shape (N, ..., classes), got {ref_in.shape}")
    num_classes = ref_in.shape[-1]
    ref = ref_in.reshape(-1, num_classes)
    cand = np.asarray(candidate).reshape(-1, num_classes)
    lab = None if labels is None else _labels(labels, ref_in.shape[:-1], num_classes).reshape(-1)
    positions = ref.shape[0]
    agree = correct = correct_ref = 0
    softmax_err = label_err = 0.0
    for rows in block_rows(positions, num_classes):
        r = ref[rows].astype(np.float64)  # finiteness was checked by _row_stats
        c = cand[rows].astype(np.float64)
        arg_r = r.argmax(axis=-1)
        arg_c = c.argmax(axis=-1)
        agree += int(np.count_nonzero(arg_r == arg_c))
        p_c = c if probabilities else _softmax_inplace(c)
        if lab is not None:
            block_lab = lab[rows]
            correct += int(np.count_nonzero(arg_c == block_lab))
            correct_ref += int(np.count_nonzero(arg_r == block_lab))
            # |p - onehot| = sum|p| - p[label] + (1 - p[label]) per position, without building the one-hot
            p_label = np.take_along_axis(p_c, block_lab[:, None], axis=-1)[:, 0]
            label_err += float(p_c.sum() - 2.0 * p_label.sum() + p_label.size)
        p_r = r if probabilities else _softmax_inplace(r)
        np.subtract(p_r, p_c, out=p_r)
        np.abs(p_r, out=p_r)
        softmax_err += float(p_r.sum())
    prefix = "prob" if probabilities else "softmax"
    out = {
        # for (N, C) logits this is the share of samples; for (N, ..., C) the share of positions
        "top1_agreement": agree / positions,
        f"{prefix}_mae": softmax_err / ref.size,
    }
    if lab is not None:
        accuracy = correct / positions
        accuracy_ref = correct_ref / positions
        out.update(
            accuracy=accuracy,
            accuracy_ref=accuracy_ref,
            accuracy_drop=accuracy_ref - accuracy,
        )
        out[f"{prefix}_label_mae"] = max(label_err, 0.0) / ref.size
    return out


def output_metrics(
    reference: np.ndarray, candidate: np.ndarray, kind: str = "tensor", labels: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics of one output against its float reference.

    Always: mae, max_abs, rmse, nmae, snr_db, cosine. For ``kind="logits"`` also top1_agreement and softmax_mae,
    and with integer ``labels`` (shape = logits shape without the class axis) the three-way test: accuracy of the
    candidate, accuracy of the reference, their difference, and the candidate's softmax error against the one-hot label.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    out = _tensor_metrics(_row_stats(reference, candidate))
    if kind in CLASS_KINDS:
        out.update(_logits_metrics(reference, candidate, labels, probabilities=kind == "probabilities"))
    return out


def per_sample_error(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Mean absolute error of each sample, shape (N,): shows which samples a quantization hurts most."""
    stats = _row_stats(reference, candidate)
    return stats.abs_err / stats.row_size


# -- several outputs -------------------------------------------------------------------------------------------------


def weighted_specs(outputs: Sequence[OutputSpec]) -> list[OutputSpec]:
    """The outputs that count in totals; refuses duplicate names and a set without any positive weight."""
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate output names: {names}")
    weighted = [o for o in outputs if o.weight > 0]
    if not weighted:
        given = [(o.name, o.weight) for o in outputs]
        raise ValueError(f"at least one output needs a weight > 0 to form totals, got {given}")
    return weighted


def get_output(arrays: Mapping[str, np.ndarray], name: str, what: str) -> np.ndarray:
    try:
        return arrays[name]
    except KeyError:
        raise KeyError(f"output {name!r} missing from {what} (has {sorted(arrays)})") from None


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    w = np.asarray(weights, np.float64)
    return float((np.asarray(values, np.float64) * w).sum() / w.sum())


def stage_metrics(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    outputs: Sequence[OutputSpec],
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of one stage's outputs against the float reference, per output and as weighted totals.

    Keys are ``"<output>.<metric>"`` for every output, and ``"total.<metric>"`` for nmae, snr_db and cosine (weighted
    mean over outputs with weight > 0, weights normalized). Logits metrics (top1_agreement, softmax_mae and, with
    labels, accuracy, accuracy_ref, accuracy_drop, softmax_label_mae) get totals over the weighted logits outputs
    only, and only when there are such outputs. ``labels`` apply to every logits output.
    """
    weighted = weighted_specs(outputs)
    per_output: dict[str, dict[str, float]] = {}
    out: dict[str, float] = {}
    for spec in outputs:
        metrics = output_metrics(
            get_output(reference, spec.name, "reference"),
            get_output(candidate, spec.name, "candidate"),
            kind=spec.kind,
            labels=labels if spec.kind in CLASS_KINDS else None,
        )
        per_output[spec.name] = metrics
        out.update({f"{spec.name}.{k}": v for k, v in metrics.items()})
    for metric in _TOTAL_ALL:
        out[f"total.{metric}"] = weighted_mean(
            [per_output[o.name][metric] for o in weighted], [o.weight for o in weighted]
        )
    for metric in _TOTAL_LOGITS:
        having = [o for o in weighted if metric in per_output[o.name]]
        if having:
            out[f"total.{metric}"] = weighted_mean([per_output[o.name][metric] for o in having], [o.weight for o in having])
    return out


def sample_weighted_error(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], outputs: Sequence[OutputSpec]
) -> np.ndarray:
    """Per-sample error (N,) over all weighted outputs, each normalized like nmae so outputs of any scale mix fairly.

    For each output: ``per_sample_error / mean(|reference|)`` (divisor 1 for an all-zero reference); then the weighted
    mean over outputs with weight > 0. Useful to find the evaluation samples a setting hurts most.
    """
    weighted = weighted_specs(outputs)
    rows = []
    for spec in weighted:
        stats = _row_stats(get_output(reference, spec.name, "reference"), get_output(candidate, spec.name, "candidate"))
        level = float(stats.abs_ref.sum()) / (stats.abs_ref.size * stats.row_size)
        rows.append(stats.abs_err / stats.row_size / (level if level > 0 else 1.0))
    sizes = {r.shape[0] for r in rows}
    if len(sizes) != 1:
        counts = [(o.name, r.shape[0]) for o, r in zip(weighted, rows)]
        raise ValueError(f"outputs disagree on the number of samples: {counts}")
    w = np.asarray([o.weight for o in weighted], np.float64)
    return np.einsum("k,kn->n", w / w.sum(), np.stack(rows))


def per_sample_metric(
    metric: str, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], outputs: Sequence[OutputSpec]
) -> np.ndarray:
    """Per-sample values (N,) whose mean tracks the error metric ``"<output>.<base>"`` (or ``"total.<base>"``).

    Used for statistical pruning: the samples pair up across trials. ``softmax_mae`` gives each sample's mean
    |softmax difference|; ``nmae``/``mae`` the sample's mean |difference| (nmae scaled by the reference level);
    ``total.*`` the weighted, normalized per-sample error over all outputs. Other metrics fall back to the output's
    per-sample mean absolute error, which moves with them.
    """
    output, _, base = metric.rpartition(".")
    if output == "total" or output not in {o.name for o in outputs}:
        return sample_weighted_error(reference, candidate, outputs)
    ref, cand = check_pair(get_output(reference, output, "reference"), get_output(candidate, output, "candidate"))
    if base == "softmax_mae":
        diff = np.abs(_softmax_inplace(ref.astype(np.float64)) - _softmax_inplace(cand.astype(np.float64)))
        return diff.reshape(len(diff), -1).mean(axis=1)
    if base == "prob_mae":
        return np.abs(ref.astype(np.float64) - cand.astype(np.float64)).mean(axis=1)
    err = per_sample_error(ref, cand)
    if base == "nmae":
        level = float(np.abs(ref).mean())
        return err / (level if level > 0 else 1.0)
    return err
