"""The model script (``.alls``) of one trial, generated from its settings. Pure text work: no SDK import.

Why a generator: the script is the DFC's only interface to the knobs a sweep turns, and it is logged as the trial's
artifact, so it must be deterministic, readable and complete. Command shapes are those seen in Hailo's own scripts
(hailo-api.md §2, MZ ``cfg/alls``):

    normalization1 = normalization([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])   # mean, std in raw scale
    model_optimization_flavor(optimization_level=2, compression_level=2)
    model_optimization_config(calibration, batch_size=4, calibset_size=64)
    quantization_param(output_layer1, precision_mode=a16_w16)
    quantization_param(conv45, precision_mode=a16_w16)      # a noisy hidden layer (noisy_layers_16bit)
    pre_quantization_optimization(equalization, policy=disabled)                       # algorithm knobs
    pre_quantization_optimization(activation_clipping, layers=[conv1], mode=percentile, clipping_values=[0.01, 99.99])
    post_quantization_optimization(bias_correction, policy=enabled)
    post_quantization_optimization(finetune, policy=disabled)
    quantization_param({*}, precision_mode=a16_w16)          # all_16bit: all

Layer names are validated against the HN (``check_layer_names``) before the script is handed to the DFC.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from hailo_sweep.backends.base import Normalization
from hailo_sweep.errors import UnsupportedSetting, UserInputError
from hailo_sweep.settings import Settings

SCRIPT_NAME = "model_script.alls"
NORMALIZATION_LAYER = "normalization1"
EXTRA_KEY = "hailo.extra_model_script"

# Commands an extra line may not contain: the sweep owns these knobs, and a second normalization would normalize
# the data twice (hailo-api.md §1.4: "Data might be normalized twice").
_OWNED = (
    (re.compile(r"\bnormalization\s*\("), "normalization is the normalization_placement knob (and a second one would normalize twice)"),
    (re.compile(r"\bmodel_optimization_flavor\s*\("), "optimization_level and compression_level are swept knobs"),
    (re.compile(r"\bmodel_optimization_config\s*\(\s*calibration\b"), "calibset_size is a swept knob"),
)
_OUTPUT_LAYER = re.compile(r"^(?:[\w.-]+/)?output_layer\d+$")

# Where model-script commands name layers: the first argument of these commands, and ``layers=[...]`` /
# ``loss_layer_names=[...]`` keyword lists (hailo-api.md §2).
_FIRST_ARG_COMMANDS = re.compile(r"^\s*(?:[\w/, ]+=\s*)?(quantization_param|change_output_activation)\s*\(\s*(\[[^\]]*\]|\{[^}]*\}|[^,)]+)")
_LAYER_LISTS = re.compile(r"\b(?:layers|loss_layer_names)\s*=\s*\[([^\]]*)\]")


def format_values(values: Sequence[float]) -> str:
    """``[0.5, 255.0]``: Python float reprs, exact and short, as in MZ scripts (``[0.0, 0.0, 0.0]``)."""
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def sixteen_bit_layers(output_16bit: Sequence[str], output_layers: Mapping[str, str]) -> list[str]:
    """HN output layers to promote to a16_w16, for the settings' ONNX output names; refuse unknown outputs."""
    unknown = [name for name in output_16bit if name not in output_layers]
    if unknown:
        raise UnsupportedSetting(
            f"output_16bit names {', '.join(repr(n) for n in unknown)}, which is not an output of the model; "
            f"valid outputs: {', '.join(sorted(output_layers))}",
            key="search.output_16bit",
            fix="use the ONNX output names exactly as in the model, or none/all",
        )
    return [output_layers[name] for name in sorted(output_16bit)]


def check_extra_lines(lines: Sequence[str]) -> None:
    """Refuse extra lines that would override a swept knob or normalize the data a second time."""
    for number, line in enumerate(lines, 1):
        for pattern, why in _OWNED:
            if pattern.search(line):
                raise UserInputError(
                    f"line {number} ({line.strip()!r}) sets something the sweep controls: {why}",
                    key=EXTRA_KEY,
                    fix="remove the line; set the knob through the sweep's search space instead",
                )
        sets_precision = _first_arg_command(line) == "quantization_param" and "precision_mode" in line
        if sets_precision and any(_OUTPUT_LAYER.match(name) for name in _named_layers(line)):
            raise UserInputError(
                f"line {number} ({line.strip()!r}) sets the precision of an output layer, which is the output_16bit knob",
                key=EXTRA_KEY,
                fix="remove the line and list the output under search.output_16bit instead",
            )


def _first_arg_command(line: str) -> str | None:
    match = _FIRST_ARG_COMMANDS.match(line)
    return match.group(1) if match else None


def _named_layers(line: str) -> list[str]:
    """Layer names a script line refers to; wildcard forms (``{conv*}``) are left to the DFC."""
    groups: list[str] = []
    match = _FIRST_ARG_COMMANDS.match(line)
    if match:
        groups.append(match.group(2))
    groups.extend(m.group(1) for m in _LAYER_LISTS.finditer(line))
    names: list[str] = []
    for group in groups:
        group = group.strip()
        if group.startswith("{") or "*" in group:
            continue
        names.extend(part.strip() for part in group.strip("[]").split(",") if part.strip())
    return names


def check_layer_names(script: str, has_layer: Callable[[str], bool], known: Sequence[str]) -> None:
    """Every layer a script line names must exist in the HN, so a typo fails here, clearly, not inside the DFC."""
    for line in script.splitlines():
        missing = [name for name in _named_layers(line) if not has_layer(name)]
        if missing:
            raise UserInputError(
                f"model script line {line.strip()!r} names layer(s) {', '.join(missing)} that the translated model "
                f"does not have; its output layers are: {', '.join(known)}",
                key=EXTRA_KEY,
                fix="use layer names from the HN (e.g. output_layer1, conv3), scoped or not",
            )


def check_noisy_layers(noisy_layers: Sequence[str], k: int) -> None:
    """At most ``k`` hidden layers, none of them an output (outputs are the output_16bit knob's)."""
    if len(noisy_layers) > k:
        raise ValueError(f"{len(noisy_layers)} noisy layers given for noisy_layers_16bit={k}")
    outputs = [name for name in noisy_layers if _OUTPUT_LAYER.match(name)]
    if outputs:
        raise ValueError(f"output layer(s) {', '.join(outputs)} cannot be promoted as noisy layers; that is output_16bit")


def model_script(
    settings: Settings,
    *,
    normalization: Normalization | None,
    output_layers: Mapping[str, str],
    extra_lines: Sequence[str] = (),
    noisy_layers: Sequence[str] = (),
    clipping_layers: Sequence[str] | None = None,
) -> str:
    """The trial's model script.

    ``output_layers`` maps ONNX output names to HN output layer names (``naming.HnGraph.script_names``).
    The normalization line appears only with placement "model": then the calibration set and every input are fed in
    the raw domain and the chip normalizes; with placement "host" the data arrive normalized and the script has none.
    ``noisy_layers`` are the HN layers ``settings.noisy_layers_16bit`` promotes (chosen by the backend from its
    once-per-sweep noise ranking, noisiest first); each gets its own ``quantization_param(..., a16_w16)`` line, after
    the 16-bit outputs and before the user's extra lines. The algorithm knobs follow (``algorithm_lines``);
    ``clipping_layers`` are the HN layers ``settings.clipping_scope`` names (None: every layer).
    """
    check_extra_lines(extra_lines)
    check_extra_lines_against_knobs(settings, extra_lines)
    check_noisy_layers(noisy_layers, settings.noisy_layers_16bit)
    lines: list[str] = []
    if settings.normalization_placement == "model" and normalization is not None:
        lines.append(f"{NORMALIZATION_LAYER} = normalization({format_values(normalization.mean)}, {format_values(normalization.std)})")
    lines.append(
        f"model_optimization_flavor(optimization_level={settings.optimization_level}, "
        f"compression_level={settings.compression_level})"
    )
    lines.append(f"model_optimization_config(calibration, calibset_size={settings.calibset_size})")
    for layer in sixteen_bit_layers(settings.output_16bit, output_layers):
        lines.append(f"quantization_param({layer}, precision_mode=a16_w16)")
    for layer in noisy_layers:
        lines.append(f"quantization_param({layer}, precision_mode=a16_w16)")
    lines.extend(algorithm_lines(settings, clipping_layers))
    lines.extend(line.rstrip("\n") for line in extra_lines)
    return "\n".join(lines) + "\n"


# -- algorithm knobs (KNOBS.md): one model-script line per knob that is set; unset = the level's default, no line ----

#: the commands each algorithm knob writes; an extra line with the same command would contradict a swept knob
_KNOB_COMMANDS = {
    "equalization": re.compile(r"\bpre_quantization_optimization\s*\(\s*equalization\b"),
    "bias_correction": re.compile(r"\bpost_quantization_optimization\s*\(\s*bias_correction\b"),
    "finetune": re.compile(r"\bpost_quantization_optimization\s*\(\s*finetune\b"),
    "calibration_method": re.compile(r"\bpre_quantization_optimization\s*\(\s*activation_clipping\b"),
    "all_16bit": re.compile(r"\bquantization_param\s*\(\s*\{\s*\*\s*\}.*precision_mode"),
}
DEFAULT_PERCENTILE = 99.999


def _percentile_text(value: float) -> str:
    """``99.99`` -> ``99.99``; ``100 - 99.99`` -> ``0.01`` (rounded: 100 - 99.999 is 0.0010000000000047748 in floats)."""
    return repr(round(float(value), 6))


def algorithm_lines(settings: Settings, clipping_layers: Sequence[str] | None = None) -> list[str]:
    """The model-script lines of the algorithm knobs (hailo-api.md §2 command shapes).

    - equalization / bias_correction / finetune: ``..._optimization(<algorithm>, policy=enabled|disabled)``.
    - calibration_method percentile: ``pre_quantization_optimization(activation_clipping, layers=[...],
      mode=percentile, clipping_values=[100 - p, p])`` on the scoped layers (``{*}`` when the scope is all layers:
      the wildcard form of ``quantization_param``; UNVERIFIED for ``layers=``). minmax writes no line (the DFC clips
      activations only when told to); entropy is refused by the backend (no DFC equivalent).
    - all_16bit all: ``quantization_param({*}, precision_mode=a16_w16)``; none writes no line (8-bit is the default).
    - weights_granularity per_channel writes no line (the DFC's weights are per channel); per_tensor is refused.
    """
    lines: list[str] = []
    if settings.equalization is not None:
        lines.append(f"pre_quantization_optimization(equalization, policy={settings.equalization})")
    if settings.calibration_method == "percentile":
        p = settings.clipping_percentile or DEFAULT_PERCENTILE
        layers = "{*}" if clipping_layers is None else "[" + ", ".join(clipping_layers) + "]"
        lines.append(
            f"pre_quantization_optimization(activation_clipping, layers={layers}, mode=percentile, "
            f"clipping_values=[{_percentile_text(100.0 - p)}, {_percentile_text(p)}])"
        )
    if settings.bias_correction is not None:
        lines.append(f"post_quantization_optimization(bias_correction, policy={settings.bias_correction})")
    if settings.finetune is not None:
        lines.append(f"post_quantization_optimization(finetune, policy={settings.finetune})")
    if settings.all_16bit == "all":
        lines.append("quantization_param({*}, precision_mode=a16_w16)")
    return lines


def check_extra_lines_against_knobs(settings: Settings, lines: Sequence[str]) -> None:
    """An extra line may set an algorithm the sweep leaves alone, never one a trial's knob sets."""
    for knob, value in settings.algorithm_knobs().items():
        pattern = _KNOB_COMMANDS.get(knob)
        if pattern is None:
            continue
        for number, line in enumerate(lines, 1):
            if pattern.search(line):
                raise UserInputError(
                    f"line {number} ({line.strip()!r}) sets what the swept knob {knob} (= {value}) sets",
                    key=EXTRA_KEY,
                    fix=f"remove the line, or remove {knob} from the search space",
                )
