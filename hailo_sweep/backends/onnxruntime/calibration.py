"""Activation ranges for the embedded backend: one calibration pass per (model, data, method), cached, bounded memory.

ONNX Runtime's own calibrators are used for what they do well, and not where they fail at sweep scale (both read in
the installed ``onnxruntime/quantization/calibrate.py``):

- MinMax: ``create_calibrator(MinMax)`` as ``quantize_static`` itself uses it; its augmented model outputs one
  ReduceMin/ReduceMax pair per tensor, so memory stays small. ``CalibMaxIntermediateOutputs`` is *not* used: in this
  version ``MinMaxCalibrater.collect_data`` clears the collected outputs every N runs without merging them, so the
  ranges would come from the last partial chunk only (``tests/test_ort_knobs.py`` shows it).
- Percentile / Entropy: ORT's ``HistogramCalibrater.collect_data`` keeps every run's full intermediate outputs until
  the reader ends (pitfall P17: 9.9 GB on a 1.7 M-parameter 224x224 classifier with 256 samples), and when fed in
  chunks its histograms are re-binned against an edge array (``np.histogram(bins=array)`` sorts every block: about
  10x slower). Here the augmented model is ORT's (``create_calibrator(...).infer_session``) but each run's outputs are
  folded at once into a fixed-range histogram per tensor (the range is the MinMax pass's, so every run uses the same
  uniform bins, counted by ``np.bincount``) and dropped. The thresholds are then computed by ORT's own ``HistogramCollector``
  from those histograms, as a single all-in-memory pass would bin them (up to elements within float rounding of a bin
  edge, see ``_bin``). Memory: one inference batch.

Histograms are cached (``.npz``, no pickle), so every percentile value of a sweep comes from one pass. Ranges of the
clipped tensors (``clipping_scope``) are merged into the MinMax table: one table per trial, written as the
``calibration_cache_path`` of ``quantize_static``, which then does no calibration at all.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import (
    HistogramCollector,
    TensorData,
    TensorsData,
    create_calibrator,
    load_tensors_data,
    save_tensors_data,
)

from hailo_sweep.atomic import atomic_write
from hailo_sweep.backends.onnxruntime.quiet import quiet_quantizer
from hailo_sweep.onnx_runner import batches, chunk_size

#: histogram bins: ORT's Percentile default (2048); for Entropy ORT's default 128/128 equals MinMax exactly (pitfall
#: P3: the KL search then has one candidate), so the histogram gets 256 bins for 128 quantized bins: 65 candidate
#: thresholds from half to the full range. ORT's search is a Python loop over bins per candidate and tensor, so its
#: cost grows with both (512/255 took 4x longer for the same candidate ratio).
PERCENTILE_BINS = 2048
ENTROPY_BINS = 256
ENTROPY_QUANTIZED_BINS = 128
BATCH_BYTES = 192 * 2**20  # intermediate outputs of one histogram run at most this large
MAX_BATCH = 32
MINMAX_BATCH = 8  # rows per MinMax run at most (fewer for large inputs, see minmax): the session's buffers grow with the batch
CACHE_VERSION = b"calibration-v4"  # v3: histograms binned by _bin; v4: keys chained over segments
SEGMENT = 32  # rows per cached MinMax prefix step (see Calibrator.minmax)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Reader(CalibrationDataReader):
    """Feeds ``data`` in batches of ``batch`` rows, or of the model's fixed batch (the last one padded by repeating a
    sample: duplicates change no min/max)."""

    def __init__(self, data: np.ndarray, input_name: str, batch: int, fixed: int | None):
        self.data, self.input_name, self.batch, self.fixed = data, input_name, batch, fixed
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = ({self.input_name: part} for part, _ in batches(self.data, self.fixed, self.batch))


class Calibrator:
    """Calibration tables of one model + calibration set, computed once per method and cached under ``cache_dir``."""

    def __init__(self, model: onnx.ModelProto, data: np.ndarray, input_name: str, cache_dir: Path, fixed_batch: int | None = None):
        self.model = model
        self.model_bytes = model.SerializeToString()
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.input_name = input_name
        self.cache_dir = cache_dir
        self.fixed = fixed_batch  # the model's fixed batch size (every run has exactly that many rows), or None
        self.passes: list[str] = []  # calibration passes this object actually ran (not served from the cache)
        # the data hashed segment by segment, each key chained to the one before: prefix_keys[i] names the model with
        # the first (i + 1) * segment rows, so a MinMax table of any leading part of the set can be found and extended
        # (the hashes read the buffer: tobytes would copy 150-250 MB for 256 frames of 224x224 or 64 of 480x640)
        self.segment = segment_rows(fixed_batch)
        key = sha(b"|".join([CACHE_VERSION, sha(self.model_bytes).encode(), input_name.encode()]))
        self.prefix_keys: list[str] = []
        for start in range(0, len(self.data), self.segment):
            rows = self.data[start : start + self.segment]
            key = sha(key.encode() + hashlib.sha256(memoryview(rows).cast("B")).digest())
            if len(rows) == self.segment:
                self.prefix_keys.append(key[:24])
        self.key = key[:24]  # the model with the whole set

    # -- tables ----------------------------------------------------------------------------------------------
    def minmax(self) -> TensorsData:
        """The MinMax table of the whole set. A table of a leading part of the set, cached by an earlier trial with a
        smaller (or larger) calibration size, is extended with the rows after it: the minimum and maximum over all rows
        are those of the two parts, so the table is the one a single pass gives. Every segment boundary crossed is
        cached in turn, so a sweep over calibration sizes 64..1024 runs MinMax over each row once."""
        path = self._minmax_path(self.key)
        if path.is_file():
            return load_tensors_data(path)
        done = next((i + 1 for i in reversed(range(len(self.prefix_keys))) if self._minmax_path(self.prefix_keys[i]).is_file()), 0)
        prefix = load_tensors_data(self._minmax_path(self.prefix_keys[done - 1])) if done else None
        start = done * self.segment
        with self._scratch() as (model_path, tmp):
            calibrator = create_calibrator(model_path, augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax)
            # at most MINMAX_BATCH rows and about CALL_ELEMENTS input values per run: 8 frames of 480x640 took the
            # session past 9 GB, one frame per run stays near 1 GB (the reductions' outputs are scalars)
            chunk = chunk_size(self.data, MINMAX_BATCH)
            for i, first in enumerate(range(start, len(self.data), self.segment), start=done):
                rows = self.data[first : first + self.segment]
                calibrator.collect_data(_Reader(rows, self.input_name, chunk, self.fixed))
                table = calibrator.compute_data()  # the rows since ``start`` so far (collect_data merges each call's)
                whole = union(prefix, table) if prefix is not None else table
                self._save(self.prefix_keys[i] if len(rows) == self.segment else self.key, whole)
            del calibrator
        self.passes.append(f"minmax from row {start}" if done else "minmax")
        return load_tensors_data(path)

    def _minmax_path(self, key: str) -> Path:
        return self.cache_dir / f"minmax-{key}.json"

    def _save(self, key: str, table: TensorsData) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._minmax_path(key), lambda t: save_tensors_data(table, t))

    def percentile(self, percentile: float) -> TensorsData:
        histograms = self._histograms("percentile")
        collector = HistogramCollector("percentile", True, PERCENTILE_BINS, 0, percentile, "same")
        collector.histogram_dict = histograms
        with quiet_quantizer():
            thresholds = collector.compute_collection_result()
        return TensorsData(CalibrationMethod.Percentile, {k: _pair(v) for k, v in thresholds.items()})

    def entropy(self) -> TensorsData:
        path = self.cache_dir / f"entropy-{self.key}-{ENTROPY_BINS}-{ENTROPY_QUANTIZED_BINS}.json"
        if not path.is_file():
            collector = HistogramCollector("entropy", False, ENTROPY_BINS, ENTROPY_QUANTIZED_BINS, 0.0, "same")
            collector.histogram_dict = self._histograms("entropy")
            with quiet_quantizer():
                thresholds = collector.compute_collection_result()
            table = TensorsData(CalibrationMethod.Entropy, {k: _pair(v) for k, v in thresholds.items()})
            atomic_write(path, lambda t: save_tensors_data(table, t))
        return load_tensors_data(path)

    def table(self, method: str, percentile: float) -> TensorsData:
        if method == "minmax":
            return self.minmax()
        if method == "percentile":
            return self.percentile(percentile)
        if method == "entropy":
            return self.entropy()
        raise ValueError(f"unknown calibration method {method!r}")

    # -- histograms (one bounded-memory pass per kind) ---------------------------------------------------------
    def _histograms(self, kind: str) -> dict[str, tuple[np.ndarray, ...]]:
        path = self.cache_dir / f"hist-{kind}-{self.key}.npz"
        if not path.is_file():
            ranges = self.minmax()
            hist = self._collect(kind, ranges)
            arrays: dict[str, np.ndarray] = {}
            names = sorted(hist)
            for i, name in enumerate(names):
                for j, part in enumerate(hist[name]):
                    arrays[f"t{i}_{j}"] = np.asarray(part)
            arrays["names"] = np.array(json.dumps(names))
            def save(tmp: Path) -> None:
                with tmp.open("wb") as fh:
                    np.savez(fh, **arrays)

            atomic_write(path, save)
        with np.load(path, allow_pickle=False) as npz:
            names = json.loads(str(npz["names"]))
            parts = 4 if kind == "percentile" else 5
            return {name: tuple(npz[f"t{i}_{j}"] for j in range(parts)) for i, name in enumerate(names)}

    def _collect(self, kind: str, ranges: TensorsData) -> dict[str, tuple[np.ndarray, ...]]:
        bins = PERCENTILE_BINS if kind == "percentile" else ENTROPY_BINS
        with self._scratch() as (model_path, tmp):
            method = CalibrationMethod.Percentile if kind == "percentile" else CalibrationMethod.Entropy
            calibrator = create_calibrator(model_path, augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=method)
            session = calibrator.infer_session
            wanted = set(calibrator.tensors_to_calibrate)
            names = [o.name for o in session.get_outputs()]
            fetch = [n for n in names if n in wanted and n in ranges.data]
            lows = {n: _scalar(ranges[n].range_value[0]) for n in fetch}
            highs = {n: _scalar(ranges[n].range_value[1]) for n in fetch}
            tops = {n: max(abs(float(lows[n])), abs(float(highs[n]))) for n in fetch}
            counts: dict[str, np.ndarray] = {}
            edges: dict[str, np.ndarray] = {}
            batch = self.fixed or self._batch(session, fetch)
            for part, valid in batches(self.data, self.fixed, batch):
                outputs = session.run(fetch, {self.input_name: part})
                for name, value in zip(fetch, outputs, strict=True):
                    if valid < len(part) and value.ndim and value.shape[0] == len(part):
                        value = value[:valid]  # a padded fixed batch: the repeated rows are not counted twice
                    h = _bin(value.reshape(-1), kind, tops[name] or 1.0, bins)
                    counts[name] = counts[name] + h if name in counts else h
                    edges.setdefault(name, _edges(kind, tops[name] or 1.0, bins))
                del outputs
            del session, calibrator
        self.passes.append(kind)
        out: dict[str, tuple[np.ndarray, ...]] = {}
        for name in fetch:
            if kind == "percentile":
                out[name] = (counts[name], edges[name], lows[name], highs[name])
            else:
                out[name] = (counts[name], edges[name], lows[name], highs[name], np.float32(tops[name]))
        return out

    def _batch(self, session: object, fetch: list[str]) -> int:
        """Rows per histogram run so that one run's intermediate outputs stay under ``BATCH_BYTES``."""
        probe = session.run(fetch, {self.input_name: next(batches(self.data[:1], self.fixed))[0]})  # type: ignore[attr-defined]
        per_sample = max(1, sum(int(p.nbytes) for p in probe))
        return int(max(1, min(MAX_BATCH, BATCH_BYTES // per_sample)))

    def _scratch(self) -> _Scratch:
        return _Scratch(self.model, self.cache_dir)


class _Scratch:
    """A private directory holding the model file a calibrator loads (never the current directory, P21)."""

    def __init__(self, model: onnx.ModelProto, parent: Path):
        self.model, self.parent = model, parent

    def __enter__(self) -> tuple[str, Path]:
        self.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="calib-", dir=self.parent)
        tmp = Path(self._tmp.name)
        path = tmp / "model.onnx"
        onnx.save(self.model, str(path))
        self._quiet = quiet_quantizer()
        self._quiet.__enter__()
        return str(path), tmp

    def __exit__(self, *exc: object) -> None:
        self._quiet.__exit__(*exc)
        self._tmp.cleanup()


def _bin(flat: np.ndarray, kind: str, top: float, bins: int) -> np.ndarray:
    """Counts of ``flat`` (overwritten: a run's output, used once) in ``bins`` uniform bins: |x| over [0, top] for
    percentile (ORT's symmetric percentile), x over [-top, top] for entropy; values on the top edge go in the last bin.

    ``np.histogram`` with a range gives the same counts up to elements within float rounding of a bin edge (it
    re-checks every element against the edges array: about 2x slower, and binning is half of a histogram pass)."""
    if kind == "percentile":
        scaled = np.abs(flat, out=flat)
    else:
        scaled = np.add(flat, np.float32(top), out=flat)
        top *= 2.0
    scaled *= np.float32(bins / top)
    index = scaled.astype(np.intp)
    np.clip(index, 0, bins - 1, out=index)
    return np.bincount(index, minlength=bins).astype(np.int64)


def _edges(kind: str, top: float, bins: int) -> np.ndarray:
    return np.linspace(0.0 if kind == "percentile" else -top, top, bins + 1).astype(np.float32)


def _scalar(value: np.ndarray) -> np.float32:
    return np.float32(np.asarray(value).reshape(-1)[0])


def _pair(value: tuple[np.ndarray, ...]) -> TensorData:
    return TensorData(lowest=np.asarray(value[0], np.float32), highest=np.asarray(value[1], np.float32))


def segment_rows(fixed_batch: int | None) -> int:
    """Rows per cached MinMax segment: ``SEGMENT`` (a multiple of the model's fixed batch, so that no segment pads)."""
    if not fixed_batch:
        return SEGMENT
    return max(fixed_batch, SEGMENT // fixed_batch * fixed_batch)


def union(a: TensorsData, b: TensorsData) -> TensorsData:
    """The MinMax table of two sets of rows from the tables of each (NaN ignored, as ORT's ``nanmin``/``nanmax``)."""
    data = {}
    for name, x in a.data.items():
        y = b.data[name]
        data[name] = TensorData(lowest=np.fmin(np.asarray(x.range_value[0]), np.asarray(y.range_value[0])),
                                highest=np.fmax(np.asarray(x.range_value[1]), np.asarray(y.range_value[1])))
    return TensorsData(CalibrationMethod.MinMax, data)


def merge(base: TensorsData, clipped: TensorsData, tensors: set[str] | None) -> TensorsData:
    """``base`` (MinMax) ranges, with those of ``tensors`` (all when None) taken from ``clipped``."""
    data: dict[str, TensorData] = {}
    for name, value in base.data.items():
        source = clipped.data.get(name) if (tensors is None or name in tensors) else None
        data[name] = _pair((source or value).range_value)
    return TensorsData(CalibrationMethod.MinMax, data)


def write_table(table: TensorsData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_data(table, path)
    return path
