"""Deterministic "depth-camera-like" frames built from scikit-learn's bundled 8x8 digits.

Why: the test suite and the quick-start need a real trained model with real data, offline, and byte-identical on
every machine (so cached content hashes and recorded sweeps stay comparable). scikit-learn ships ``load_digits``
inside the wheel, so nothing is downloaded. Each 8x8 digit is upsampled to 80x80 with bilinear interpolation done
in exact integer arithmetic (no BLAS, no float rounding differences between machines), placed at a random offset on
a 96x128 canvas, brightened to strokes of about 220 on a background of 20, and given Gaussian noise (sigma 8).

Usage: ``python -m hailo_sweep.examples.digits OUT_DIR`` writes ``calib.npy`` (uint8, NHWC) and ``eval.npz``
(``x`` uint8 NHWC, ``y`` int64 labels).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 96, 128
DIGIT_SIZE = 80
N_FRAMES = 1797
N_TRAIN = 1257
N_TEST = N_FRAMES - N_TRAIN

BACKGROUND = 20
NOISE_SIGMA = 8.0

# Normalization constants in the raw 0..255 domain: model input = (x - MEAN) / STD.
# Computed once from split(0)["train"] frames (all pixels) and frozen here; tests re-check them.
MEAN: float = 51.7531
STD: float = 56.4203

_SOURCE_SIZE = 8
_UPSAMPLE = DIGIT_SIZE // _SOURCE_SIZE  # 10
_WEIGHT_DENOM = 2 * _UPSAMPLE  # bilinear weights are exact multiples of 1/20
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _bilinear_matrix() -> np.ndarray:
    """Integer (80, 8) interpolation matrix; each row sums to 20.

    Half-pixel-centre bilinear: output pixel o samples source coordinate (o + 0.5) / 10 - 0.5 = (2o - 9) / 20,
    clamped to the image. Kept integer so the upsampled digit is exact on every machine.
    """
    matrix = np.zeros((DIGIT_SIZE, _SOURCE_SIZE), dtype=np.int64)
    for out in range(DIGIT_SIZE):
        pos = min(max(2 * out - (_UPSAMPLE - 1), 0), (_SOURCE_SIZE - 1) * _WEIGHT_DENOM)
        left, frac = divmod(pos, _WEIGHT_DENOM)
        right = min(left + 1, _SOURCE_SIZE - 1)
        matrix[out, left] += _WEIGHT_DENOM - frac
        matrix[out, right] += frac
    return matrix


def _upsampled_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits upsampled to 80x80 as exact integers (0..16*400), with their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images).astype(np.int64)  # values are already integers 0..16
    matrix = _bilinear_matrix()
    upsampled = matrix @ images @ matrix.T  # integer matmul: exact, no BLAS
    return upsampled, np.asarray(bunch.target, dtype=np.int64)


def make_frames(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 frames, uint8 (1797, 96, 128), and their int64 labels, fully determined by ``seed``."""
    upsampled, labels = _upsampled_digits()
    frame_seq, _ = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(frame_seq)
    count = len(labels)
    offsets_y = rng.integers(0, HEIGHT - DIGIT_SIZE + 1, size=count)
    offsets_x = rng.integers(0, WIDTH - DIGIT_SIZE + 1, size=count)
    # 16 * 400 -> 200 above background: the factor 200 / 6400 = 1/32 is exact in binary floating point.
    strokes = upsampled.astype(np.float64) / 32.0
    frames = np.empty((count, HEIGHT, WIDTH), dtype=np.uint8)
    for index in range(count):
        canvas = np.full((HEIGHT, WIDTH), float(BACKGROUND))
        top, left = int(offsets_y[index]), int(offsets_x[index])
        canvas[top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] += strokes[index]
        canvas += rng.normal(0.0, NOISE_SIGMA, size=(HEIGHT, WIDTH))
        frames[index] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return frames, labels


def _permutation(seed: int) -> np.ndarray:
    """The fixed train/test permutation; its own stream so it does not depend on how frames consume randomness."""
    _, split_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(split_seq).permutation(N_FRAMES)


def split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (frames, labels) of 1257, "test": (frames, labels) of 540}."""
    frames, labels = make_frames(seed)
    order = _permutation(seed)
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return {"train": (frames[train], labels[train]), "test": (frames[test], labels[test])}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz that np.load reads, written with fixed zip timestamps.

    np.savez stamps each member with the current time, so two builds would differ; this writes the same zip layout
    (stored, zip64 members) with a constant date so the bytes depend only on the arrays.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            with archive.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_if_changed(path: Path, content: bytes) -> None:
    """Atomic write (temp file in the same folder, then os.replace), skipped when the file already has these bytes."""
    if _sha256_file(path) == hashlib.sha256(content).hexdigest():
        return
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(content)
            temp.flush()
            os.fsync(temp.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes 0600; data files are meant to be shared
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def build(out_dir: Path, *, n_calib: int = 1024, n_eval: int = 300) -> dict[str, Path]:
    """Write calib.npy (first ``n_calib`` train frames) and eval.npz (first ``n_eval`` test frames + labels).

    Both are uint8 NHWC (N, 96, 128, 1), the layout of the user story. Idempotent: a file that already holds the
    expected bytes is left untouched (same mtime), so callers may run it before every sweep.
    """
    if not 1 <= n_calib <= N_TRAIN:
        raise ValueError(f"n_calib must be in 1..{N_TRAIN}, got {n_calib}")
    if not 1 <= n_eval <= N_TEST:
        raise ValueError(f"n_eval must be in 1..{N_TEST}, got {n_eval}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = split()
    calib = parts["train"][0][:n_calib, :, :, None]
    eval_x = parts["test"][0][:n_eval, :, :, None]
    eval_y = parts["test"][1][:n_eval].astype(np.int64)
    paths = {"calibration": out_dir / "calib.npy", "evaluation": out_dir / "eval.npz"}
    _write_if_changed(paths["calibration"], _npy_bytes(np.ascontiguousarray(calib)))
    _write_if_changed(paths["evaluation"], _npz_bytes({"x": eval_x, "y": eval_y}))
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: build into OUT_DIR and print the two paths."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hailo_sweep.examples.digits OUT_DIR", file=sys.stderr)
        return 2
    for role, path in build(Path(args[0])).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
