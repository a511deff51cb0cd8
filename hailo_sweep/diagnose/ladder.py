"""The error ladder: how much of a stage's error each step between stages adds, and which step dominates.

The stages of a trial are measured against the same float reference (the float ONNX model, error 0 by definition):
float-optimized emulation, quantized emulation, bit-exact emulation (where the backend has it) and the device. The
step between two neighbouring stages is named after what changes there, so a user reads "the compile/runtime step
costs 85 % of the device error" instead of five numbers. Metric keys are the pipeline's ``<stage>.<output>.<metric>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hailo_sweep.metrics import direction_of

#: ladder steps in order: (step name, stage before, stage after); "float_onnx" is the reference with error 0
STEPS: tuple[tuple[str, str, str], ...] = (
    ("fp_optimization", "float_onnx", "fp_optimized"),
    ("quantization", "fp_optimized", "emulated"),
    ("bit_exact", "emulated", "bit_exact"),
    ("compile_runtime", "bit_exact", "device"),
)
#: a step smaller than this share of the added error is reported as "no difference"
NEGLIGIBLE_SHARE = 0.01
STAGES: tuple[str, ...] = ("float_onnx", "fp_optimized", "emulated", "bit_exact", "device")
STEP_LABELS = {
    "fp_optimization": "float optimization cost",
    "quantization": "quantization cost",
    "bit_exact": "bit-exact cost",
    "compile_runtime": "compile/runtime cost",
}
STAGE_LABELS = {
    "float_onnx": "float ONNX",
    "fp_optimized": "float optimized",
    "emulated": "quantized emulation",
    "bit_exact": "bit-exact emulation",
    "device": "device",
}


def stage_errors(metrics: Mapping[str, float], output: str, metric: str = "nmae") -> dict[str, float]:
    """Error of each stage present in ``metrics`` for one output, in ladder order; the float ONNX reference is 0."""
    if direction_of(metric) != "minimize":
        raise ValueError(f"the ladder needs an error metric (lower is better, 0 at the reference), got {metric!r}")
    errors = {"float_onnx": 0.0}
    for stage in STAGES[1:]:
        key = f"{stage}.{output}.{metric}"
        if key in metrics:
            errors[stage] = float(metrics[key])
    return errors


def _steps_of(errors: Mapping[str, float]) -> dict[str, float]:
    """Cost of each step whose end stage is present, measured from the nearest earlier stage that is present."""
    steps: dict[str, float] = {}
    for name, _, after in STEPS:
        if after not in errors:
            continue
        before = [s for s in STAGES[: STAGES.index(after)] if s in errors][-1]
        steps[name] = errors[after] - errors[before]
    return steps


def ladder_steps(metrics: Mapping[str, float], outputs: Sequence[str], metric: str = "nmae") -> dict[str, float]:
    """``ladder.<output>.<step>_cost`` for every step whose stages were measured.

    fp_optimization_cost = fp_optimized error (vs float ONNX); quantization_cost = emulated - fp_optimized;
    bit_exact_cost = bit_exact - emulated (only with bit-exact metrics); compile_runtime_cost = device - (bit_exact,
    or emulated without it). A stage that is missing is skipped and the next step is measured from the nearest
    earlier stage present. Costs may be negative (a later stage happened to be closer to the reference).
    """
    out: dict[str, float] = {}
    for output in outputs:
        for step, cost in _steps_of(stage_errors(metrics, output, metric)).items():
            out[f"ladder.{output}.{step}_cost"] = cost
    return out


def dominant_step(metrics: Mapping[str, float], outputs: Sequence[str], metric: str = "nmae") -> dict[str, str]:
    """Per output, the step that adds the most error; "none" when no step adds any (or nothing was measured)."""
    result: dict[str, str] = {}
    for output in outputs:
        steps = _steps_of(stage_errors(metrics, output, metric))
        positive = {k: v for k, v in steps.items() if v > 0}
        result[output] = max(positive, key=lambda k: positive[k]) if positive else "none"
    return result


_STEP_PHRASES = {
    "fp_optimization": "the float optimizations before quantization (float-optimized emulation vs float ONNX)",
    "quantization": "quantization (quantized vs float-optimized emulation)",
    "bit_exact": "the hardware arithmetic as bit-exact emulation models it (bit-exact vs quantized emulation)",
    "compile_runtime": "the compile/runtime step (device vs {emulation})",
}


def _contrast(top: str, steps: Mapping[str, float], added: float) -> str:
    """The second half of the sentence: what the dominant step is *not*, or what else contributes."""
    if top == "fp_optimization":
        return ", before any quantization: check the pre-/post-processing split and the input normalization first"
    if top == "quantization":
        device = steps.get("compile_runtime")
        if device is None:
            return "; the device was not measured"
        if abs(device) <= NEGLIGIBLE_SHARE * added:
            return f"; the device matches the emulation's error ({device:+.3g})"
        if device < 0:
            return f"; the device is closer to the float model than the emulation ({device:+.3g})"
        return f"; the device adds {_percent(device, added)} on top of the emulation"
    return ", not from quantization"


def _percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole > 0 else "0%"


def explain(metrics: Mapping[str, float], outputs: Sequence[str], metric: str = "nmae") -> list[str]:
    """One plain-English sentence per output naming the step that costs most, with its share of the error.

    Shares are of the sum of the positive step costs, which equals the last stage's error when no step is
    negative (when negative steps remove more than ``NEGLIGIBLE_SHARE`` of it, the sentence speaks of "the error
    added on the way" instead). Example: "logits: 85% of the device error comes from the compile/runtime step (device vs emulation),
    not from quantization."
    """
    sentences: list[str] = []
    for output in outputs:
        errors = stage_errors(metrics, output, metric)
        steps = _steps_of(errors)
        last = [s for s in STAGES if s in errors][-1]
        last_label = "device" if last == "device" else STAGE_LABELS[last]
        if not steps:
            sentences.append(f"{output}: no stage was measured, so there is nothing to explain.")
            continue
        added = sum(v for v in steps.values() if v > 0)
        if added <= 0:
            sentences.append(f"{output}: no step adds error; the {last_label} output matches the float reference ({metric} {errors[last]:.3g}).")
            continue
        top = max((k for k in steps if steps[k] > 0), key=lambda k: steps[k])
        emulation = "bit-exact emulation" if "bit_exact" in errors else "emulation"
        phrase = _STEP_PHRASES[top].format(emulation=emulation)
        contrast = _contrast(top, steps, added)
        removed = -sum(v for v in steps.values() if v < 0)
        whole = f"the {last_label} error" if removed <= NEGLIGIBLE_SHARE * added else f"the error added on the way to the {last_label}"
        sentences.append(f"{output}: {_percent(steps[top], added)} of {whole} ({metric} {errors[last]:.3g}) comes from {phrase}{contrast}.")
    return sentences
