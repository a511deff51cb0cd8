"""Keeping ONNX Runtime's quantization tools quiet."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

log = logging.getLogger("hailo_sweep.backends.onnxruntime")


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress to stdout and advice on the root logger for every call
    (pitfall P14). Both are captured; what they said goes to our debug log instead of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        root.setLevel(level)
        if captured.getvalue():
            log.debug("onnxruntime.quantization said:\n%s", captured.getvalue())
