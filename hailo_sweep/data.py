"""Calibration and evaluation data: safe loading (never unpickles), checks against the model, and the feed.

Arrays leave this module in the model's layout (NCHW) and in the *raw* value domain declared by the config.
``feed()`` turns a raw batch into what a trial's model takes: normalized float32 when normalization runs on the host,
raw values (uint8 for 0-255 data) when normalization is inside the model.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hailo_sweep.backends.base import ModelIO, Normalization
from hailo_sweep.config import DATA_FILE_FIX, SweepConfig, check_file
from hailo_sweep.errors import UserInputError
from hailo_sweep.settings import Placement

UINT8_DOMAIN = (0.0, 255.0)


@dataclass(frozen=True)
class Dataset:
    calibration: np.ndarray  # NCHW, raw domain
    evaluation: np.ndarray  # NCHW, raw domain
    labels: np.ndarray | None  # class indices (N,), for the accuracy metrics; None when the labels are not class ids
    calibration_sha256: str
    evaluation_sha256: str
    task_labels: np.ndarray | None = None  # the labels array as stored (any shape, first axis = samples), for task metrics

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.calibration_sha256 + self.evaluation_sha256).encode()).hexdigest()


def load_dataset(config: SweepConfig, model_io: ModelIO) -> Dataset:
    """Load both data sets and check them against the model and the config; raise ``UserInputError`` on problems."""
    cfg = config.data
    calib = load_array(cfg.calibration, cfg.inputs_key, config_file=config.source, config_key="data.calibration")
    evaluation = load_array(cfg.evaluation, cfg.inputs_key, config_file=config.source, config_key="data.evaluation")
    labels = task_labels = None
    if cfg.labels_key is not None:
        task_labels = load_labels(cfg.evaluation, cfg.labels_key, config_file=config.source, any_array=bool(config.metrics))
        labels = task_labels.astype(np.int64) if is_class_ids(task_labels) else None
        if len(task_labels) != len(evaluation):
            raise UserInputError(
                f"{len(task_labels)} labels for {len(evaluation)} evaluation samples",
                file=config.source,
                key="data.labels_key",
                fix=f"store one label per sample in '{cfg.labels_key}' of {cfg.evaluation}",
            )
    calib_nchw = to_model_layout(calib, cfg.layout, model_io, source=cfg.calibration, config_file=config.source)
    eval_nchw = to_model_layout(evaluation, cfg.layout, model_io, source=cfg.evaluation, config_file=config.source)
    for arr, path, key in ((calib_nchw, cfg.calibration, "data.calibration"), (eval_nchw, cfg.evaluation, "data.evaluation")):
        check_values(arr, cfg.domain, source=path, config_file=config.source, key=key)
    return Dataset(
        calibration=calib_nchw,
        evaluation=eval_nchw,
        labels=labels,
        calibration_sha256=array_sha256(calib_nchw),
        evaluation_sha256=array_sha256(eval_nchw) if task_labels is None else _sha_pair(eval_nchw, task_labels),
        task_labels=task_labels,
    )


def is_class_ids(labels: np.ndarray) -> bool:
    return labels.ndim == 1 and labels.dtype.kind in "iu"


def array_sha256(arr: np.ndarray) -> str:
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _sha_pair(x: np.ndarray, y: np.ndarray) -> str:
    return hashlib.sha256((array_sha256(x) + array_sha256(y)).encode()).hexdigest()


def _open_npy_or_npz(path: Path, *, config_file: Path | None, config_key: str) -> np.ndarray | np.lib.npyio.NpzFile:
    check_file(path, what="data file", fix=DATA_FILE_FIX, config_file=config_file, key=config_key)
    if path.suffix not in (".npy", ".npz"):
        raise UserInputError(
            f"{path.name}: unsupported data format '{path.suffix}'", file=config_file, key=config_key, fix="save the data with numpy.save (.npy) or numpy.savez (.npz)"
        )
    check_headers(path, config_file=config_file, config_key=config_key)
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: a pickled file can run code
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _refusal(path, exc, config_file, config_key) from None


def open_data_file(path: Path, *, config_file: Path | None, config_key: str) -> np.ndarray | np.lib.npyio.NpzFile:
    """A .npy array or an open .npz, after every header was checked against the file (see ``check_headers``)."""
    return _open_npy_or_npz(path, config_file=config_file, config_key=config_key)


#: the most one byte of DEFLATE data can expand to (RFC 1951's longest match, 258 bytes, in about 2 bits): a zip member
#: that claims more is forged, whatever its ZipInfo says
_DEFLATE_MAX_RATIO = 1032


def check_headers(path: Path, *, config_file: Path | None, config_key: str) -> None:
    """Refuse a .npy (or each array of a .npz) whose header claims more data than the file holds, before anything is
    allocated: numpy allocates the whole claimed array first, so a 100-byte file claiming a petabyte raised MemoryError.
    Object (pickled) arrays are refused here too, from the header alone."""
    try:
        if path.suffix == ".npy":
            with path.open("rb") as fh:
                _check_npy_header(fh, path.stat().st_size, path.name)
            return
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = f"{path.name} (array '{info.filename.removesuffix('.npy')}')"
                limit = info.compress_size * (_DEFLATE_MAX_RATIO if info.compress_type != zipfile.ZIP_STORED else 1) + 1024
                if info.file_size > limit:
                    raise _HeaderLies(f"{name}: the archive claims {info.file_size} bytes for {info.compress_size} stored bytes")
                with zf.open(info) as fh:
                    _check_npy_header(fh, info.file_size, name)
    except _HeaderLies as exc:
        raise UserInputError(str(exc), file=config_file, key=config_key, fix="the file is truncated or forged: re-save the data with numpy.save / numpy.savez") from None
    except _Pickled as exc:
        raise _refusal(path, ValueError(f"{exc}: pickle"), config_file, config_key) from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise _refusal(path, exc, config_file, config_key) from None


class _HeaderLies(Exception):
    pass


class _Pickled(Exception):
    pass


def _check_npy_header(fh: Any, size: int, name: str) -> None:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"{name}: .npy format version {version[0]}.{version[1]} is not read here")
    if dtype.hasobject:
        raise _Pickled(name)
    claimed = math.prod(int(d) for d in shape) * dtype.itemsize  # Python ints: no overflow for any claim
    held = size - fh.tell()
    if claimed > held:
        raise _HeaderLies(f"{name}: the header claims an array of shape {tuple(shape)} {dtype} ({claimed} bytes), but the file holds {max(held, 0)} bytes of data")


def _refusal(path: Path, exc: Exception, config_file: Path | None, config_key: str) -> UserInputError:
    if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
        return UserInputError(
            f"{path.name} holds a pickled (object) array; it was refused and not loaded, because unpickling can run arbitrary code",
            file=config_file,
            key=config_key,
            fix="save a numeric array instead: numpy.save(path, np.asarray(x, dtype=np.uint8 or np.float32))",
        )
    return UserInputError(f"cannot read {path}: {exc}", file=config_file, key=config_key, fix="re-save the data with numpy.save / numpy.savez")


def load_array(path: Path, key: str, *, config_file: Path | None, config_key: str) -> np.ndarray:
    """Load one numeric array from .npy, or the array ``key`` from .npz. Pickled content is refused, never loaded."""
    loaded = _open_npy_or_npz(path, config_file=config_file, config_key=config_key)
    if isinstance(loaded, np.ndarray):
        arr = loaded
    else:
        with loaded:
            if key not in loaded.files:
                raise UserInputError(
                    f"{path.name} has no array '{key}' (it has: {', '.join(loaded.files) or 'nothing'})",
                    file=config_file,
                    key="data.inputs_key",
                    fix="set data.inputs_key to the name of the input array in the .npz",
                )
            try:
                arr = loaded[key]
            except ValueError as exc:
                raise _refusal(path, exc, config_file, config_key) from None
    if arr.dtype.kind not in "uif":
        raise UserInputError(f"{path.name}: dtype {arr.dtype} is not numeric", file=config_file, key=config_key, fix="store uint8 or float32 images")
    if arr.size == 0 or len(arr) == 0:
        raise UserInputError(f"{path.name} is empty (shape {arr.shape})", file=config_file, key=config_key, fix="provide at least one sample")
    return arr


def load_labels(path: Path, key: str, *, config_file: Path | None, any_array: bool = False) -> np.ndarray:
    """The labels array; class indices (1-D integers) unless ``any_array`` (task metrics read them as they are)."""
    if path.suffix != ".npz":
        raise UserInputError(
            f"labels were requested (data.labels_key: {key}) but {path.name} is a .npy file and holds no labels",
            file=config_file,
            key="data.labels_key",
            fix="save the evaluation set as .npz with the inputs and a labels array, or remove data.labels_key",
        )
    loaded = _open_npy_or_npz(path, config_file=config_file, config_key="data.evaluation")
    with loaded:
        if key not in loaded.files:
            raise UserInputError(
                f"labels were requested (data.labels_key: {key}) but {path.name} has no array '{key}' (it has: {', '.join(loaded.files)})",
                file=config_file,
                key="data.labels_key",
                fix="add the labels to the .npz under that name, or remove data.labels_key",
            )
        try:
            labels = loaded[key]
        except ValueError as exc:
            raise _refusal(path, exc, config_file, "data.evaluation") from None
    if any_array:
        if labels.ndim == 0 or labels.dtype.kind not in "biuf":
            raise UserInputError(
                f"labels '{key}' must be a numeric array with one entry per sample on axis 0, got {labels.dtype} {labels.shape}",
                file=config_file,
                key="data.labels_key",
            )
        return labels
    if not is_class_ids(labels):
        raise UserInputError(
            f"labels '{key}' must be a 1-D integer array of class indices, got {labels.dtype} {labels.shape}",
            file=config_file,
            key="data.labels_key",
            fix="store class indices, or name a task metric (metrics: in the config) that reads labels of any shape",
        )
    return labels.astype(np.int64)


def to_model_layout(arr: np.ndarray, layout: str, model_io: ModelIO, *, source: Path, config_file: Path | None) -> np.ndarray:
    """Check the sample shape against the model input and return NCHW; name NCHW/NHWC mix-ups explicitly."""
    c = int(model_io.input_shape[1])
    sample = tuple(arr.shape[1:])
    # a dynamic height/width of the model takes the data's (the sample's own size in the declared layout)
    h, w = (_fixed_or(model_io.input_shape[a], sample, layout, a) for a in (2, 3))
    nchw, nhwc = (c, h, w), (h, w, c)
    expected = nchw if layout == "NCHW" else nhwc
    if arr.ndim == 4 and sample == expected:
        return np.ascontiguousarray(arr if layout == "NCHW" else arr.transpose(0, 3, 1, 2))
    other = "NHWC" if layout == "NCHW" else "NCHW"
    if arr.ndim == 4 and sample == (nhwc if layout == "NCHW" else nchw):
        raise UserInputError(
            f"{source.name} has samples of shape {sample}, which is {other} for the model input {model_io.input_name} "
            f"{list(model_io.input_shape)}, but data.layout says {layout}",
            file=config_file,
            key="data.layout",
            fix=f"set data.layout: {other} (or transpose the arrays)",
        )
    raise UserInputError(
        f"{source.name} has shape {arr.shape}; the model input '{model_io.input_name}' {list(model_io.input_shape)} "
        f"needs batches of {layout} samples of shape {expected}",
        file=config_file,
        key="data.layout",
        fix="store the data as (N, " + ", ".join(str(d) for d in expected) + f") with data.layout: {layout}",
    )


def _fixed_or(dim: int | str, sample: tuple[int, ...], layout: str, axis: int) -> int:
    if isinstance(dim, int):
        return dim
    index = axis - 1 if layout == "NCHW" else axis - 2  # sample axes: (C, H, W) or (H, W, C)
    return int(sample[index]) if len(sample) == 3 else -1


def check_values(arr: np.ndarray, domain: tuple[float, float], *, source: Path, config_file: Path | None, key: str) -> None:
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argwhere(bad.reshape(len(arr), -1).any(axis=1))[0, 0])
            raise UserInputError(
                f"{source.name} contains {int(bad.sum())} NaN/inf values (first in sample {first})",
                file=config_file,
                key=key,
                fix="remove or repair the broken samples before sweeping",
            )
    lo, hi = float(arr.min()), float(arr.max())
    if lo < domain[0] or hi > domain[1]:
        raise UserInputError(
            f"{source.name} has values in [{lo:g}, {hi:g}], outside data.domain [{domain[0]:g}, {domain[1]:g}]",
            file=config_file,
            key="data.domain",
            fix="set data.domain to the raw value range of the data (e.g. [0, 255] for pixels, [0, 1] for scaled images)",
        )
    if lo == hi:
        raise UserInputError(
            f"{source.name} is constant: every value of its {len(arr)} samples is {lo:g}, so it carries no range to calibrate or measure on",
            file=config_file, key=key, fix="point it at real samples (a constant array is usually a failed export or a placeholder)",
        )
    if len(arr) > 1 and bool(np.all(arr == arr[:1])):
        raise UserInputError(
            f"{source.name} holds {len(arr)} copies of one sample", file=config_file, key=key,
            fix="point it at distinct, representative samples",
        )


def check_label_range(labels: np.ndarray, classes: dict[str, int], *, source: Path, config_file: Path | None, key: str) -> None:
    """Labels that feed the built-in accuracy metrics of logits outputs must be class indices of every such output."""
    if not classes or labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    for name, n in classes.items():
        if lo < 0 or hi >= n:
            first = int(np.argwhere((labels < 0) | (labels >= n)).reshape(-1)[0])
            raise UserInputError(
                f"labels in {source.name} range over [{lo}, {hi}], but output '{name}' has {n} classes (indices 0-{n - 1}); "
                f"the first bad label is {int(labels.reshape(-1)[first])} (sample {first})",
                file=config_file, key=key, fix=f"store class indices in [0, {n - 1}] (e.g. map -1/ignored samples out of the evaluation set)",
            )


def is_uint8_domain(domain: tuple[float, float], arr: np.ndarray) -> bool:
    return tuple(map(float, domain)) == UINT8_DOMAIN and (arr.dtype == np.uint8 or bool(np.all(arr == np.round(arr))))


def feed(raw: np.ndarray, placement: Placement, normalization: Normalization | None, domain: tuple[float, float]) -> np.ndarray:
    """What a trial's model is fed: host-normalized float32, or raw values when normalization is in the model."""
    if placement == "host":
        return normalization.apply(raw) if normalization is not None else raw.astype(np.float32)
    if is_uint8_domain(domain, raw):
        return raw.astype(np.uint8)
    return raw.astype(np.float32)


def is_frozen(array: np.ndarray) -> bool:
    """Whether ``array`` and every array it is a view of are read-only (so its values cannot change)."""
    node: object = array
    while isinstance(node, np.ndarray):
        if node.flags.writeable:
            return False
        node = node.base
    return True
