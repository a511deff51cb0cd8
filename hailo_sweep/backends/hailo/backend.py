"""``HailoBackend``: the trial's stages on Hailo's Dataflow Compiler and HailoRT.

Data convention (``hailo_sweep.backends.base``): every stage receives NCHW batches in the pipeline's feed domain —
host-normalized float32 with placement "host", the raw domain (uint8 0..255 frames for 0..255 data) with placement
"model". This backend transposes to NHWC itself and never normalizes: with placement "model" the model script's
``normalization`` layer does it on the chip (and in emulation), so calibration and inputs arrive raw; with placement
"host" they arrive normalized and the script has no normalization. One normalization, always, never two.

Per-layer noise: ``layer_noise`` runs Hailo's layer noise analysis on the trial's quantized HAR; with
``noisy_layers_16bit = k`` the k noisiest hidden layers of a level-0 quantization (ranked once per sweep, cached under
the sweep's work dir) are promoted to a16_w16 in the model script (``noise`` module).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from hailo_sweep.atomic import atomic_write_bytes, atomic_write_text
from hailo_sweep.backends.base import (
    Backend,
    BackendContext,
    CompiledModel,
    EmulationContext,
    LayerNoise,
    OptimizedModel,
)
from hailo_sweep.backends.hailo import compiler, noise
from hailo_sweep.backends.hailo._imports import DFC, HAILORT, import_dfc, import_hailort, importable, version_of
from hailo_sweep.backends.hailo.device import check_before_sweep
from hailo_sweep.backends.hailo.layout import to_nhwc, to_onnx_layout
from hailo_sweep.backends.hailo.naming import HnGraph, OnnxOutput, parse_hn, read_onnx_outputs, short_name
from hailo_sweep.backends.hailo.options import RECOMMENDED_CALIBSET, HailoOptions
from hailo_sweep.backends.hailo.device_spec import HailoDeviceSpec
from hailo_sweep.backends.hailo.runtime import DeviceOptions, OutputNaming
from hailo_sweep.backends.hailo.script import SCRIPT_NAME, check_extra_lines, check_layer_names, model_script
from hailo_sweep.errors import UnsupportedSetting
from hailo_sweep.settings import COMPRESSION_LEVELS, OPTIMIZATION_LEVELS, Settings

TARGETS = ("hailo8", "hailo8l", "hailo10h")

# Defaults the DFC uses when a script says nothing (hailo-api.md §2): optimization level 2 ("[info] Using default
# optimization level of 2", issue hailo-ai/Hailo-Application-Code-Examples#280) and 64 calibration entries ("Using
# dataset with 64 entries for calibration", same log). The default compression level is not in public code
# (hailo-api.md lists it as UNVERIFIED); 1 is the value this project assumes, recorded with every baseline trial.
DEFAULT_OPTIMIZATION_LEVEL = 2
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_CALIBSET_SIZE = 64
#: calibration samples the once-per-sweep noise ranking analyses (the DFC's default calibset_size, hailo-api.md §2)
RANKING_SAMPLES = 64
_RANKING_FORMAT = "hailo-sweep-noise-ranking-v1"


def default_net_name(model_path: Path) -> str:
    """A HN-friendly network name from the model file name (letters, digits, underscores)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", model_path.stem).strip("_") or "net"
    return name if not name[0].isdigit() else f"net_{name}"


@dataclass
class _Prepared:
    har: Path
    cache_key: str
    graph: HnGraph
    onnx_outputs: tuple[OnnxOutput, ...]


@dataclass
class HailoOptimized:
    """``OptimizedModel.handle``: the runner holding the quantized model, and where it was saved."""

    runner: Any
    har: Path
    log: Path
    graph: HnGraph
    extra: dict[str, Any] = field(default_factory=dict)


class HailoBackend(Backend):
    """Translate (cached), optimize, emulate and compile with the DFC; run the HEF on a locked device with HailoRT."""

    name: ClassVar[str] = "hailo"
    compiled_kind: ClassVar[str] = "hef"

    def __init__(self, context: BackendContext):
        super().__init__(context)
        self.options = HailoOptions.from_context(context)
        self.device_retries = self.options.device_retries
        check_extra_lines(self.options.extra_model_script)
        self._dfc: ModuleType | None = None
        self._prepared: _Prepared | None = None
        self._rankings: dict[str, noise.NoiseRanking] = {}  # placement -> ranking, once per backend instance

    # -- resources and facts -----------------------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        """True when the Dataflow Compiler imports; HailoRT is needed only by ``device()`` (checked there)."""
        return importable(DFC)

    @classmethod
    def is_complete(cls) -> bool:
        """Both packages import: what ``backend: auto`` requires before it picks this backend for a whole sweep."""
        return importable(DFC) and importable(HAILORT)

    @property
    def dfc(self) -> ModuleType:
        if self._dfc is None:
            self._dfc = import_dfc()
        return self._dfc

    def activate(self) -> None:
        _ = self.dfc

    def versions(self) -> dict[str, str]:
        return {"hailo_sdk_client": version_of(DFC), "hailo_platform": version_of(HAILORT)}

    def default_settings(self, calibset_size: int, output_names: tuple[str, ...]) -> Settings:
        return Settings(
            optimization_level=DEFAULT_OPTIMIZATION_LEVEL,
            compression_level=DEFAULT_COMPRESSION_LEVEL,
            calibset_size=max(1, min(DEFAULT_CALIBSET_SIZE, calibset_size)),
            normalization_placement="model",
            output_16bit=(),
        )

    def emulation_contexts(self) -> tuple[EmulationContext, ...]:
        contexts = [EmulationContext.FP_OPTIMIZED, EmulationContext.QUANTIZED]
        if compiler.has_context(self.dfc, EmulationContext.BIT_EXACT):
            contexts.append(EmulationContext.BIT_EXACT)
        return tuple(contexts)

    def validate(self, settings: Settings) -> None:
        """Refuse what the targeted DFC does not accept (hailo-api.md §2: levels 0..4 and 0..5; hw_arch values)."""
        if self.context.target not in TARGETS:
            raise UnsupportedSetting(
                f"target {self.context.target!r} is not supported by the hailo backend; use one of {', '.join(TARGETS)}",
                key="target",
            )
        if settings.optimization_level not in OPTIMIZATION_LEVELS:
            raise UnsupportedSetting(f"optimization_level {settings.optimization_level} is outside the DFC's 0..4", key="search.optimization_level")
        if settings.compression_level not in COMPRESSION_LEVELS:
            raise UnsupportedSetting(f"compression_level {settings.compression_level} is outside the DFC's 0..5", key="search.compression_level")
        if settings.calibset_size < 1:
            raise UnsupportedSetting(f"calibset_size must be >= 1, got {settings.calibset_size}", key="search.calibset_size")
        if settings.noisy_layers_16bit < 0:
            raise UnsupportedSetting(f"noisy_layers_16bit must be >= 0, got {settings.noisy_layers_16bit}", key="search.noisy_layers_16bit")
        if settings.noisy_layers_16bit > 0 and not compiler.has_noise_analysis(self.dfc):
            raise UnsupportedSetting(
                "noisy_layers_16bit needs the layer noise analysis (ClientRunner.analyze_noise / get_params_statistics), "
                "which the installed Dataflow Compiler does not have",
                key="search.noisy_layers_16bit",
                fix="remove noisy_layers_16bit from the search space, or install a Dataflow Compiler with analyze_noise",
            )
        refused = {
            ("weights_granularity", "per_tensor"): "the Dataflow Compiler quantizes weights per channel and has no public per-tensor switch",
            ("calibration_method", "entropy"): "the Dataflow Compiler has no entropy (KL) calibration; its activation clipping modes are percentile and manual",
        }
        for (knob, value), why in refused.items():
            if getattr(settings, knob) == value:
                raise UnsupportedSetting(f"{knob} {value}: {why}", key=f"search.{knob}", fix=f"drop {value!r} from search.{knob}, or use the onnxruntime backend")
        outputs = self.context.model_io.output_names
        unknown = [n for n in settings.output_16bit if n not in outputs]
        if unknown:
            raise UnsupportedSetting(
                f"output_16bit names {', '.join(map(repr, unknown))}, which is not an output of the model; "
                f"valid outputs: {', '.join(sorted(outputs))}",
                key="search.output_16bit",
            )

    def check_device(self) -> list[str]:
        """Before the first trial: the device is reachable, free, and runs the target (``device.check_before_sweep``).
        Without HailoRT on this machine nothing can be checked: a note says so and the device stage will say why."""
        if not importable(HAILORT):
            return [f"HailoRT ({HAILORT}) does not import here: the device was not checked before the sweep"]
        return check_before_sweep(import_hailort(), self._device_options(), self.context.target)

    def calibration_advice(self, entries: int, optimization_levels: Sequence[int]) -> str | None:
        """The DFC lowers optimization levels 2-4 by itself when given fewer than 1024 entries (hailo-api.md §2)."""
        lowered = sorted({level for level in optimization_levels if level >= 2})
        if entries >= RECOMMENDED_CALIBSET or not lowered:
            return None
        levels = ", ".join(map(str, lowered))
        return (
            f"the calibration file holds {entries} entries, fewer than the {RECOMMENDED_CALIBSET} the Dataflow Compiler "
            f"needs for optimization levels 2-4: it will lower level(s) {levels} of this sweep to 1 (to 0 without a GPU), "
            f"and those trials are recorded as not honoured. Give at least {RECOMMENDED_CALIBSET} calibration entries "
            "(and run on a machine with a GPU) to measure them"
        )

    def _device_options(self) -> DeviceOptions:
        lock_dir = self.options.lock_dir or Path(self.context.work_dir) / "locks"
        return DeviceOptions(
            device_id=self.options.device_id,
            timeout_ms=self.options.device_timeout_ms,
            lock_dir=lock_dir,
            wait_s=self.options.device_wait_s,
        )

    # -- stages ------------------------------------------------------------------------------------------------
    def _request(self) -> compiler.TranslateRequest:
        io = self.context.model_io
        shape = [1 if not isinstance(d, int) else int(d) for d in io.input_shape]
        shape[0] = 1
        return compiler.TranslateRequest(
            model_path=Path(self.context.model_path),
            target=self.context.target,
            net_name=self.options.net_name or default_net_name(Path(self.context.model_path)),
            input_shapes={io.input_name: shape},
            start_node_names=self.options.start_node_names,
            end_node_names=self.options.end_node_names,
        )

    def prepare(self) -> dict[str, str | float]:
        """Translate ONNX -> HAR once, cached under ``work_dir/hailo`` by content hash; map outputs; check scripts."""
        if self.context.target not in TARGETS:
            raise UnsupportedSetting(f"target {self.context.target!r} is not one of {', '.join(TARGETS)}", key="target")
        request = self._request()
        har, key, hit = compiler.translate_cached(self.dfc, request, Path(self.context.work_dir) / "hailo")
        onnx_outputs = read_onnx_outputs(request.model_path)
        runner = compiler.new_runner(self.dfc, self.context.target, har)
        graph = parse_hn(compiler.read_hn(runner), onnx_outputs)
        known = [o.script_name for o in graph.outputs]
        check_layer_names("\n".join(self.options.extra_model_script), graph.has_layer, known)
        self._prepared = _Prepared(har=har, cache_key=key, graph=graph, onnx_outputs=onnx_outputs)
        return {"cache_hit": "true" if hit else "false", "har_key": key[:16], "net_name": graph.net_name}

    def _ready(self) -> _Prepared:
        if self._prepared is None:
            self.prepare()
        assert self._prepared is not None
        return self._prepared

    def script_for(self, settings: Settings, noisy_layers: tuple[str, ...] = ()) -> str:
        """The model script of a trial, with every layer name checked against the HN.

        ``noisy_layers``: scoped HN layers to promote to a16_w16 (from ``noisy_layers``), written by their short names.
        """
        prepared = self._ready()
        script = model_script(
            settings,
            normalization=self.context.normalization,
            output_layers=prepared.graph.script_names(),
            extra_lines=self.options.extra_model_script,
            noisy_layers=[short_name(layer) for layer in noisy_layers],
            clipping_layers=prepared.graph.clipping_layers(settings.clipping_scope or "all"),
        )
        check_layer_names(script, prepared.graph.has_layer, [o.script_name for o in prepared.graph.outputs])
        return script

    def _nhwc(self, batch: np.ndarray, what: str) -> np.ndarray:
        x = to_nhwc(batch).astype(np.float32)
        expected = self._ready().graph.input_shape
        if expected is not None and tuple(x.shape[1:]) != tuple(expected):
            raise ValueError(f"{what} has NHWC frame shape {tuple(x.shape[1:])}; the HN input expects {tuple(expected)}")
        return x

    def optimize(self, settings: Settings, calibration: np.ndarray, work_dir: Path) -> OptimizedModel:
        self.validate(settings)
        prepared = self._ready()
        noisy = self.noisy_layers(settings, calibration)
        script = self.script_for(settings, noisy)
        calib = self._nhwc(calibration, "calibration data")
        work_dir = Path(work_dir)
        log_path = work_dir / "optimize.log"
        runner = compiler.new_runner(self.dfc, self.context.target, prepared.har)
        try:
            captured = compiler.optimize(runner, script, calib)
        except compiler.DfcError as exc:
            atomic_write_text(log_path, exc.output)
            raise
        atomic_write_text(log_path, captured.text)
        facts = compiler.parse_optimize_log(captured.text, settings.optimization_level, settings.compression_level)
        har = compiler.save_har_atomic(runner, work_dir / "model_quantized.har")
        params: dict[str, str | int | float] = {
            "effective_optimization_level": facts.effective_optimization_level,
            "effective_compression_level": facts.effective_compression_level,
            "hailo_net_name": prepared.graph.net_name,
            "calibration_entries_given": len(calib),
        }
        if facts.reduce_message:
            params["optimization_level_reason"] = facts.reduce_message
        if facts.calibration_entries is not None:
            params["calibration_entries_used"] = facts.calibration_entries
        if settings.noisy_layers_16bit:
            params["hailo.noisy_layers"] = ",".join(short_name(layer) for layer in noisy) or "none"
        flags = ["optimization_level_lowered"] if facts.lowered else []
        return OptimizedModel(
            settings=settings,
            script=script,
            script_name=SCRIPT_NAME,
            handle=HailoOptimized(runner=runner, har=har, log=log_path, graph=prepared.graph, extra={"reduce": facts.reduce_message}),
            params=params,
            flags=flags,
        )

    # -- per-layer noise ----------------------------------------------------------------------------------------
    def layer_noise(self, model: OptimizedModel, inputs: np.ndarray) -> list[LayerNoise]:
        """Hailo's layer noise analysis of the trial's quantized HAR on ``inputs`` (feed domain = calibration domain).

        Runs on a runner loaded from the HAR saved after optimize, like ``hailo analyze-noise q.har`` (hailo-api.md
        §4), so the trial's own runner is left as it is. Rows are named by HN layer; outputs by their ONNX name.
        SDK failures raise ``compiler.DfcError`` and an empty result ``noise.LayerNoiseError``, both saying why; a DFC
        without the analysis raises ``NotImplementedError`` (the pipeline records that as a note).
        """
        if not compiler.has_noise_analysis(self.dfc):
            raise NotImplementedError("the installed Dataflow Compiler has no ClientRunner.analyze_noise; no per-layer noise on the hailo backend")
        handle: HailoOptimized = model.handle
        x = self._nhwc(inputs, "layer noise inputs")
        runner = compiler.new_runner(self.dfc, self.context.target, handle.har)
        stats = compiler.analyze_noise(runner, x)
        return noise.to_layer_noise(noise.require_snr(stats, self._layers_of(runner, handle.graph)), handle.graph)

    @staticmethod
    def _layers_of(runner: Any, graph: HnGraph) -> list[str]:
        """The translated HN's layers plus any the model script added (e.g. normalization1) in the quantized HN."""
        return sorted(set(graph.layers) | set(compiler.read_hn(runner).get("layers", {})))

    def noisy_layers(self, settings: Settings, calibration: np.ndarray) -> tuple[str, ...]:
        """The ``settings.noisy_layers_16bit`` noisiest promotable layers (scoped HN names), noisiest first."""
        if settings.noisy_layers_16bit <= 0:
            return ()
        ranking = self.noise_ranking(settings.normalization_placement, calibration)
        return tuple(ranking.noisiest(settings.noisy_layers_16bit))

    def _ranking_path(self, placement: str) -> Path:
        """Cache file of the ranking: keyed by the HAR's cache key, the placement, and what else shapes the level-0
        model (normalization, the user's extra script lines)."""
        prepared = self._ready()
        norm = self.context.normalization
        facts = {
            "format": _RANKING_FORMAT,
            "har": prepared.cache_key,
            "placement": placement,
            "normalization": [list(map(float, norm.mean)), list(map(float, norm.std))] if norm is not None else None,
            "extra": list(self.options.extra_model_script),
        }
        key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]
        return Path(self.context.work_dir) / "hailo" / f"noise-ranking-{key}.json"

    def noise_ranking(self, placement: str, calibration: np.ndarray) -> noise.NoiseRanking:
        """Layers ranked by the SNR of a level-0 quantization, computed once per sweep and placement.

        Held per backend instance and cached as JSON under the sweep's work dir, so later trials and other workers
        reuse it. ``calibration`` is the first trial's calibration set; its first ``RANKING_SAMPLES`` are analysed.
        """
        if placement not in self._rankings:
            path = self._ranking_path(placement)
            if path.is_file():
                self._rankings[placement] = noise.NoiseRanking.from_json(path.read_text(encoding="utf-8"))
            else:
                ranking = self._rank_layers(placement, calibration[:RANKING_SAMPLES])
                atomic_write_text(path, ranking.to_json())
                self._rankings[placement] = ranking
        return self._rankings[placement]

    def _rank_layers(self, placement: str, calibration: np.ndarray) -> noise.NoiseRanking:
        """Quantize the cached HAR at optimization and compression level 0 and run the layer noise analysis on it."""
        prepared = self._ready()
        probe = Settings(0, 0, len(calibration), placement)  # type: ignore[arg-type]
        calib = self._nhwc(calibration, "calibration data for the noise ranking")
        runner = compiler.new_runner(self.dfc, self.context.target, prepared.har)
        compiler.optimize(runner, self.script_for(probe), calib)
        stats = compiler.analyze_noise(runner, calib)
        snrs = noise.require_snr(stats, self._layers_of(runner, prepared.graph))
        return noise.NoiseRanking.from_snrs(snrs, prepared.graph, len(calib))

    def emulate(self, model: OptimizedModel, inputs: np.ndarray, context: EmulationContext) -> dict[str, np.ndarray]:
        handle: HailoOptimized = model.handle
        if not compiler.has_context(self.dfc, context):
            raise UnsupportedSetting(
                f"the installed Dataflow Compiler has no InferenceContext.{compiler.INFERENCE_CONTEXT[context]}", key="emulation"
            )
        x = self._nhwc(inputs, "emulation inputs")
        outs = compiler.emulate(self.dfc, handle.runner, context, x)
        if len(outs) != len(handle.graph.outputs):
            raise RuntimeError(f"the emulator returned {len(outs)} outputs, the HN has {len(handle.graph.outputs)}")
        return {o.onnx_name: to_onnx_layout(outs[o.index], o.onnx_rank, len(x)).astype(np.float32) for o in handle.graph.outputs}

    def compile(self, model: OptimizedModel, work_dir: Path) -> CompiledModel:
        handle: HailoOptimized = model.handle
        hef = compiler.compile_hef(handle.runner, Path(work_dir) / "compile.log")
        path = atomic_write_bytes(Path(work_dir) / "model.hef", hef)
        return CompiledModel(
            path=path,
            size_bytes=len(hef),
            kind=self.compiled_kind,
            params={"hef_target": self.context.target, "hef_sha256": hashlib.sha256(hef).hexdigest()[:16]},
        )

    def device_spec(self, compiled: CompiledModel) -> HailoDeviceSpec:
        prepared = self._ready()
        return HailoDeviceSpec(
            hef_target=str(compiled.params.get("hef_target", self.context.target)),
            naming=OutputNaming(prepared.onnx_outputs, prepared.graph.vstream_to_onnx()),
            options=self._device_options(),
            retries=self.device_retries,
        )


__all__ = ["HailoBackend", "HailoOptimized", "HailoOptions", "default_net_name"]  # HailoOptions: re-exported
