"""The Dataflow Compiler stages, written to ``hailo_sdk_client.ClientRunner`` as Hailo's own code calls it.

Call shapes (hailo-api.md §1; sources there):
    ClientRunner(hw_arch=..., har=...)                       MZ main_driver.py; LUX exporter.py
    runner.translate_onnx_model(path, net_name=..., start_node_names=..., end_node_names=..., net_input_shapes=...)
    runner.get_hn() -> dict;  runner.save_har(path)
    runner.load_model_script(text);  runner.optimize(calib_nhwc)   MZ main_utils.py, LUX exporter.py
    with runner.infer_context(InferenceContext.X) as ctx: runner.infer(ctx, x_nhwc)   LUX inferer.py, forum t/13760
    runner.compile() -> bytes                                  MZ main_utils.py, LUX exporter.py
    runner.analyze_noise(data, data_count=..., batch_size=...[, analyze_mode="advanced"])   third-party (§1.8)
    runner.get_params_statistics()                             ACE diag inspectors (§1.6, §1.8)

Why the log capture: the DFC silently lowers the optimization level when data are short or there is no GPU and only
says so in its log ("Reducing optimization level to N ...", hailo-api.md §2). The sweep must record the level that
was actually used, so the log of every optimize call is captured, kept and parsed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from hailo_sweep.atomic import atomic_write_text
from hailo_sweep.backends.base import EmulationContext

#: EmulationContext -> InferenceContext member name (hailo-api.md §1.7)
INFERENCE_CONTEXT = {
    EmulationContext.FP_OPTIMIZED: "SDK_FP_OPTIMIZED",
    EmulationContext.QUANTIZED: "SDK_QUANTIZED",
    EmulationContext.BIT_EXACT: "SDK_BIT_EXACT",
}

_CACHE_FORMAT = "hailo-sweep-har-v1"
T = TypeVar("T")
_LOG = logging.getLogger(__name__)


# -- translate, cached --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranslateRequest:
    """Everything that changes the translated HAR; its hash names the cache entry."""

    model_path: Path
    target: str
    net_name: str
    input_shapes: dict[str, list[int]]  # ONNX (NCHW) shape by input name, batch 1
    start_node_names: tuple[str, ...] | None = None
    end_node_names: tuple[str, ...] | None = None

    def cache_key(self, onnx_bytes: bytes) -> str:
        digest = hashlib.sha256()
        digest.update(onnx_bytes)
        facts = {
            "format": _CACHE_FORMAT,
            "target": self.target,
            "net_name": self.net_name,
            "input_shapes": self.input_shapes,
            "start": list(self.start_node_names) if self.start_node_names is not None else None,
            "end": list(self.end_node_names) if self.end_node_names is not None else None,
        }
        digest.update(json.dumps(facts, sort_keys=True).encode())
        return digest.hexdigest()


def new_runner(dfc: ModuleType, target: str, har: Path | None = None) -> Any:
    if har is None:
        return dfc.ClientRunner(hw_arch=target)
    return dfc.ClientRunner(hw_arch=target, har=str(har))


def save_har_atomic(runner: Any, path: Path) -> Path:
    """``runner.save_har`` to a temp name in the same directory, then ``os.replace``: never a half-written HAR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.har")
    try:
        runner.save_har(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def translate_cached(dfc: ModuleType, request: TranslateRequest, cache_dir: Path) -> tuple[Path, str, bool]:
    """The parsed HAR for ``request``: from the cache, or translated once and written atomically.

    Returns (har_path, cache_key, cache_hit).
    """
    key = request.cache_key(request.model_path.read_bytes())
    har = cache_dir / f"parsed-{key[:24]}.har"
    if har.is_file():
        return har, key, True
    runner = new_runner(dfc, request.target)
    kwargs: dict[str, Any] = {"net_name": request.net_name, "net_input_shapes": request.input_shapes}
    if request.start_node_names is not None:
        kwargs["start_node_names"] = list(request.start_node_names)
    if request.end_node_names is not None:
        kwargs["end_node_names"] = list(request.end_node_names)
    # the parser is chatty; its messages matter only when it fails, and then they go into the error
    run_captured("translate_onnx_model", lambda: runner.translate_onnx_model(str(request.model_path), **kwargs))
    save_har_atomic(runner, har)
    return har, key, False


def read_hn(runner: Any) -> dict[str, Any]:
    hn = runner.get_hn()
    return json.loads(hn) if isinstance(hn, (str, bytes)) else dict(hn)


# -- capturing the DFC's output -----------------------------------------------------------------------------------
class _RecordList(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(level=logging.NOTSET)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.append(f"[{record.levelname.lower()}] {record.getMessage()}")
        except Exception:  # never let logging break the optimize call
            self.sink.append(f"[{record.levelname.lower()}] {record.msg!r}")


@dataclass
class CapturedOutput:
    records: list[str] = field(default_factory=list)  # from Python logging
    streams: str = ""  # what was written to sys.stdout / sys.stderr

    @property
    def text(self) -> str:
        parts = [*self.records]
        if self.streams:
            parts.append(self.streams.rstrip("\n"))
        return "\n".join(parts) + ("\n" if parts else "")


def _console_handlers(logger: logging.Logger, streams: set[int]) -> list[logging.Handler]:
    """The handlers of ``logger`` that write to a console stream (file handlers, e.g. ``pyhailort.log``, stay)."""
    return [
        h for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and id(getattr(h, "stream", None)) in streams
    ]


@contextlib.contextmanager
def captured_output() -> Iterator[CapturedOutput]:
    """Capture what the SDK says: log records (root logger and every non-propagating logger) and stdout/stderr.

    The SDK logs through Python ``logging`` with its own console handler: HailoRT's ``default_logger`` adds
    ``logging.StreamHandler(sys.stdout)``, which holds the stream it was created with (``hailo_platform/common/logger/
    logger.py``), so redirecting ``sys.stdout`` alone does not silence it. While capturing, such console handlers are
    detached (and put back after), so the SDK's ``[info]`` lines reach the capture and never the console (or the Rich
    display); the DFC's logger is closed source, so both propagation cases are covered. Output written by C/C++ code
    directly to file descriptor 1/2 is not captured.
    """
    captured = CapturedOutput()
    handler = _RecordList(captured.records)
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [lg for lg in list(logging.root.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    detached = {id(lg): (lg, _console_handlers(lg, streams)) for lg in loggers}
    for lg, handlers in detached.values():
        for h in handlers:
            lg.removeHandler(h)
    listening = [lg for lg in loggers if lg is logging.getLogger() or not lg.propagate]
    for lg in listening:
        lg.addHandler(handler)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield captured
    finally:
        for lg in listening:
            lg.removeHandler(handler)
        for lg, handlers in detached.values():
            for h in handlers:
                lg.addHandler(h)
        captured.streams = buffer.getvalue()


class DfcError(RuntimeError):
    """A Dataflow Compiler call failed; the message carries the call, the SDK's error and the end of its output."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run_captured(what: str, call: Callable[[], T]) -> tuple[T, CapturedOutput]:
    """Run an SDK call with its output captured; on failure raise ``DfcError`` with the output's last lines."""
    captured: CapturedOutput | None = None
    try:
        with captured_output() as captured:
            result = call()
    except Exception as exc:
        text = captured.text if captured is not None else ""
        _LOG.debug("%s failed; the SDK said:\n%s", what, text)
        tail = f"\n--- SDK output (last lines) ---\n{_tail(text)}" if text.strip() else ""
        raise DfcError(f"{what} failed: {type(exc).__name__}: {exc}{tail}", output=text) from exc
    if captured.text:
        _LOG.debug("%s: the SDK said:\n%s", what, captured.text.rstrip("\n"))  # the log, never the console
    return result, captured


# -- optimize -----------------------------------------------------------------------------------------------------
_REDUCED = re.compile(r"Reducing optimization level to (-?\d+)(.*)")
_CALIB_ENTRIES = re.compile(r"Using dataset with (\d+) entries for calibration")


@dataclass(frozen=True)
class OptimizeFacts:
    """What the DFC actually did, read from its log."""

    effective_optimization_level: int
    effective_compression_level: int
    lowered: bool
    calibration_entries: int | None
    reduce_message: str | None


def parse_optimize_log(text: str, optimization_level: int, compression_level: int) -> OptimizeFacts:
    """The effective levels: the requested ones unless the DFC says it reduced them.

    The DFC's message (hailo-api.md §2) is e.g. "Reducing optimization level to 0 (the accuracy won't be optimized
    and compression won't be used) because there's less data than the recommended amount (1024), and there's no
    available GPU"; the last such message wins, and "compression won't be used" means compression level 0.
    """
    matches = list(_REDUCED.finditer(text))
    entries = _CALIB_ENTRIES.findall(text)
    calibration_entries = int(entries[-1]) if entries else None
    if not matches:
        return OptimizeFacts(optimization_level, compression_level, False, calibration_entries, None)
    last = matches[-1]
    level = int(last.group(1))
    compression = 0 if "compression won't be used" in last.group(2) else compression_level
    return OptimizeFacts(level, compression, level != optimization_level, calibration_entries, last.group(0).strip())


def optimize(runner: Any, script: str, calibration_nhwc: np.ndarray) -> CapturedOutput:
    """Load the script (replacing any previous one) and quantize; returns everything the DFC said."""
    run_captured("load_model_script", lambda: runner.load_model_script(script))
    _, captured = run_captured("optimize", lambda: runner.optimize(calibration_nhwc))
    return captured


# -- emulate, compile ---------------------------------------------------------------------------------------------
def has_context(dfc: ModuleType, context: EmulationContext) -> bool:
    return hasattr(dfc.InferenceContext, INFERENCE_CONTEXT[context])


def emulate(dfc: ModuleType, runner: Any, context: EmulationContext, x_nhwc: np.ndarray) -> list[np.ndarray]:
    """Outputs of the emulator in HN output order (float32, NHWC / (N, C)); always a list."""
    target = getattr(dfc.InferenceContext, INFERENCE_CONTEXT[context])

    def infer() -> Any:
        with runner.infer_context(target) as ctx:
            return runner.infer(ctx, x_nhwc)

    result, _ = run_captured(f"emulation in {INFERENCE_CONTEXT[context]}", infer)
    if isinstance(result, np.ndarray):
        return [result]
    return [np.asarray(r) for r in result]


def compile_hef(runner: Any, log_path: Path | None = None) -> bytes:
    """``runner.compile()``; what the compiler said is written to ``log_path`` (also when it fails)."""
    try:
        hef, captured = run_captured("compile", runner.compile)
    except DfcError as exc:
        if log_path is not None:
            atomic_write_text(log_path, exc.output)
        raise
    if log_path is not None:
        atomic_write_text(log_path, captured.text)
    if not isinstance(hef, (bytes, bytearray)):
        raise TypeError(f"ClientRunner.compile() returned {type(hef).__name__}, expected the HEF as bytes")
    return bytes(hef)


# -- layer noise analysis -----------------------------------------------------------------------------------------
NOISE_MAX_BATCH = 8


def noise_batch_size(samples: int) -> int:
    """The largest batch of at most ``NOISE_MAX_BATCH`` that divides ``samples``: public calls pair ``batch_size`` 2
    or 16 with a ``data_count`` it divides (hailo-api.md §1.8), and whether the DFC accepts a ragged last batch is
    not public."""
    return max(b for b in range(1, min(NOISE_MAX_BATCH, max(samples, 1)) + 1) if samples % b == 0)


def accepts_keyword(func: Any, name: str) -> bool:
    """True when ``func``'s signature names the keyword ``name`` (False when it cannot be inspected or takes **kwargs
    only: an unknown keyword would make the DFC raise)."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get(name)
    return param is not None and param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def has_noise_analysis(dfc: ModuleType) -> bool:
    return callable(getattr(dfc.ClientRunner, "analyze_noise", None)) and callable(getattr(dfc.ClientRunner, "get_params_statistics", None))


def analyze_noise(runner: Any, data_nhwc: np.ndarray) -> Any:
    """Run the DFC's layer noise analysis on ``data_nhwc`` (calibration domain) and return its statistics object.

    ``data_count``/``batch_size`` are keywords of third-party call sites (**UNVERIFIED** against Hailo's docs).
    ``analyze_mode="advanced"`` (the per-layer cumulative SNR, key ``layer_noise_analysis/snr``) is passed only when
    the installed ``analyze_noise`` names that keyword in its signature; otherwise the DFC's default mode runs and
    ``noise.read_layer_snr`` falls back to ``partial_snr``. The call's return value is ignored: a third-party report
    says it is None, and the results live in ``get_params_statistics()`` (hailo-api.md §1.8).
    """
    samples = len(data_nhwc)
    if samples < 1:
        raise ValueError("the layer noise analysis needs at least one sample")
    kwargs: dict[str, Any] = {"data_count": samples, "batch_size": noise_batch_size(samples)}
    if accepts_keyword(runner.analyze_noise, "analyze_mode"):
        kwargs["analyze_mode"] = "advanced"
    run_captured("analyze_noise", lambda: runner.analyze_noise(data_nhwc, **kwargs))
    stats, _ = run_captured("get_params_statistics", runner.get_params_statistics)
    return stats
