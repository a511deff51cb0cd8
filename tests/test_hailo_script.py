"""Golden tests of the generated model scripts (``hailo_sweep.backends.hailo.script``).

The golden files in ``tests/golden/hailo/`` were written by hand from the command shapes in hailo-api.md §2 (MZ
``cfg/alls`` lines), not produced by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hailo_sweep.backends.base import Normalization
from hailo_sweep.backends.hailo.script import check_extra_lines, check_layer_names, model_script
from hailo_sweep.errors import UnsupportedSetting, UserInputError
from hailo_sweep.settings import Settings

GOLDEN = Path(__file__).parent / "golden" / "hailo"
OUTPUT_LAYERS = {"feat": "output_layer1", "logits": "output_layer2"}
GRAY = Normalization(mean=(100.0,), std=(50.0,))
RGB = Normalization(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
EXTRA = [
    "performance_param(compiler_optimization_level=max)",
    "pre_quantization_optimization(activation_clipping, layers=[conv1], mode=percentile, clipping_values=[0.01, 99.7])",
]

CASES = [
    # golden file, settings, normalization, extra lines
    ("model_default", Settings(2, 1, 64, "model"), GRAY, []),
    ("host_default", Settings(2, 1, 64, "host"), GRAY, []),
    ("host_default", Settings(2, 1, 64, "model"), None, []),  # placement model without normalization: nothing to add
    ("model_16bit_one", Settings(2, 1, 64, "model", ("logits",)), GRAY, []),
    ("model_16bit_all", Settings(2, 1, 64, "model", ("logits", "feat")), GRAY, []),
    ("host_l0_c5", Settings(0, 5, 1024, "host"), GRAY, []),
    ("model_l4_c0", Settings(4, 0, 2000, "model"), GRAY, []),
    ("model_extra_lines", Settings(2, 1, 64, "model"), GRAY, EXTRA),
    ("host_16bit_all_extra", Settings(3, 2, 256, "host", ("feat", "logits")), GRAY, EXTRA),
    ("model_rgb_16bit_one", Settings(1, 0, 8, "model", ("logits",)), RGB, []),
]


@pytest.mark.parametrize(("golden", "settings", "normalization", "extra"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_script_matches_golden(golden: str, settings: Settings, normalization: Normalization | None, extra: list[str]) -> None:
    expected = (GOLDEN / f"{golden}.alls").read_text()
    assert model_script(settings, normalization=normalization, output_layers=OUTPUT_LAYERS, extra_lines=extra) == expected


NOISY_CASES = [
    # golden file, settings (noisy_layers_16bit = k), the backend's choice of noisy layers (noisiest first), extra lines
    ("model_noisy_two", Settings(2, 1, 64, "model", ("logits",), 2), ["ew_mult1", "conv1"], []),
    ("host_noisy_one_extra", Settings(0, 0, 64, "host", (), 1), ["ew_mult1"], EXTRA),
    ("host_l0_c5", Settings(0, 5, 1024, "host", (), 3), [], []),  # nothing to promote: no line
]


@pytest.mark.parametrize(("golden", "settings", "noisy", "extra"), NOISY_CASES, ids=[c[0] for c in NOISY_CASES])
def test_noisy_layer_lines_match_golden(golden: str, settings: Settings, noisy: list[str], extra: list[str]) -> None:
    expected = (GOLDEN / f"{golden}.alls").read_text()
    script = model_script(settings, normalization=GRAY, output_layers=OUTPUT_LAYERS, extra_lines=extra, noisy_layers=noisy)
    assert script == expected


@pytest.mark.parametrize(
    ("noisy", "k", "match"),
    [(["conv1", "conv2"], 1, "2 noisy layers given for noisy_layers_16bit=1"), (["output_layer1"], 1, "output_16bit")],
)
def test_noisy_layers_beyond_k_or_on_outputs_are_refused(noisy: list[str], k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model_script(Settings(2, 1, 64, "model", (), k), normalization=GRAY, output_layers=OUTPUT_LAYERS, noisy_layers=noisy)


def test_normalization_line_only_with_placement_model() -> None:
    for placement, count in (("model", 1), ("host", 0)):
        script = model_script(Settings(2, 1, 64, placement), normalization=GRAY, output_layers=OUTPUT_LAYERS)  # type: ignore[arg-type]
        assert script.count("normalization(") == count


def test_unknown_16bit_output_is_refused_listing_valid_outputs() -> None:
    with pytest.raises(UnsupportedSetting) as info:
        model_script(Settings(2, 1, 64, "model", ("logit",)), normalization=GRAY, output_layers=OUTPUT_LAYERS)
    message = str(info.value)
    assert "'logit'" in message
    assert "valid outputs: feat, logits" in message


@pytest.mark.parametrize(
    "line",
    [
        "normalization2 = normalization([0.0], [255.0])",
        "model_optimization_flavor(optimization_level=4, compression_level=0)",
        "model_optimization_config(calibration, batch_size=8, calibset_size=1024)",
        "quantization_param(output_layer1, precision_mode=a16_w16)",
        "quantization_param([tiny/output_layer2, conv1], precision_mode=a8_w8)",
    ],
)
def test_extra_lines_that_override_a_swept_knob_are_refused(line: str) -> None:
    with pytest.raises(UserInputError) as info:
        check_extra_lines(["performance_param(compiler_optimization_level=max)", line])
    assert info.value.key == "hailo.extra_model_script"
    assert "line 2" in str(info.value)


def test_extra_lines_on_other_layers_are_allowed() -> None:
    check_extra_lines(
        [
            "quantization_param(conv1, precision_mode=a16_w16)",
            "model_optimization_config(globals, output_encoding_vector=enabled)",
            "post_quantization_optimization(finetune, policy=disabled)",
        ]
    )


def test_layer_names_are_checked_against_the_hn() -> None:
    layers = {"tiny/input_layer1", "tiny/conv1", "tiny/fc1", "tiny/output_layer1", "tiny/output_layer2"}

    def has_layer(name: str) -> bool:
        return name in layers or f"tiny/{name}" in layers

    good = "quantization_param(output_layer2, precision_mode=a16_w16)\nquantization_param({conv*}, bias_mode=double_scale_initialization)\n"
    check_layer_names(good + "quantization_param(tiny/conv1, precision_mode=a8_w4)\n", has_layer, ["output_layer1", "output_layer2"])
    with pytest.raises(UserInputError) as info:
        check_layer_names(
            good + "pre_quantization_optimization(activation_clipping, layers=[conv1, conv9], mode=manual, clipping_values=[0, 6])",
            has_layer,
            ["output_layer1", "output_layer2"],
        )
    assert "names layer(s) conv9 that" in str(info.value)  # conv1 exists, only conv9 is reported
    assert "output_layer1, output_layer2" in str(info.value)


# -------------------------------------------------------------------------------------------------------------
# algorithm knobs (KNOBS.md): one line per knob that is set, none for a knob left to the level's default
# -------------------------------------------------------------------------------------------------------------

KNOB_CASES = [
    # golden file, settings, clipping layers (None = every layer), extra lines
    (
        "host_knobs_all",
        Settings(2, 0, 64, "host", equalization="disabled", bias_correction="enabled", finetune="disabled",
                 calibration_method="percentile", clipping_percentile=99.99, all_16bit="all"),
        None,
        [],
    ),
    (
        "model_clip_first",
        Settings(3, 1, 128, "model", ("logits",), finetune="enabled", calibration_method="percentile", clipping_scope="first"),
        ["conv1"],
        [],
    ),
    # minmax: no clipping line (and its percentile/scope are dropped); per_channel and all_16bit none: no line
    (
        "host_minmax_equalize",
        Settings(0, 0, 64, "host", equalization="enabled", calibration_method="minmax", clipping_percentile=99.9,
                 weights_granularity="per_channel", all_16bit="none"),
        ["conv1"],
        ["performance_param(compiler_optimization_level=max)"],
    ),
]


@pytest.mark.parametrize(("golden", "settings", "clipping", "extra"), KNOB_CASES, ids=[c[0] for c in KNOB_CASES])
def test_algorithm_knob_lines_match_golden(golden: str, settings: Settings, clipping: list[str] | None, extra: list[str]) -> None:
    expected = (GOLDEN / f"{golden}.alls").read_text()
    script = model_script(settings, normalization=GRAY, output_layers=OUTPUT_LAYERS, extra_lines=extra, clipping_layers=clipping)
    assert script == expected


def test_unset_algorithm_knobs_write_no_line() -> None:
    script = model_script(Settings(3, 0, 64, "host"), normalization=GRAY, output_layers=OUTPUT_LAYERS)
    for command in ("equalization", "bias_correction", "finetune", "activation_clipping", "{*}"):
        assert command not in script


@pytest.mark.parametrize(
    ("knob", "line"),
    [
        ("equalization", "pre_quantization_optimization(equalization, policy=enabled)"),
        ("finetune", "post_quantization_optimization(finetune, policy=enabled, epochs=4)"),
        ("calibration_method", "pre_quantization_optimization(activation_clipping, layers=[conv9], mode=percentile, clipping_values=[0.01, 99.7])"),
        ("all_16bit", "quantization_param({*}, precision_mode=a8_w8)"),
    ],
)
def test_extra_line_contradicting_a_set_knob_is_refused(knob: str, line: str) -> None:
    values = {"equalization": "disabled", "finetune": "disabled", "calibration_method": "percentile", "all_16bit": "all"}
    settings = Settings(2, 0, 64, "host", **{knob: values[knob]})  # type: ignore[arg-type]
    with pytest.raises(UserInputError) as info:
        model_script(settings, normalization=GRAY, output_layers=OUTPUT_LAYERS, extra_lines=[line])
    assert info.value.key == "hailo.extra_model_script"
    assert knob in str(info.value)
    # the same line is the user's to write while the knob is left to the level's default
    model_script(Settings(2, 0, 64, "host"), normalization=GRAY, output_layers=OUTPUT_LAYERS, extra_lines=[line])
