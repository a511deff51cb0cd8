"""Metric tests against hand-computed values (worked out in the comments), plus independent numpy cross-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hailo_sweep.backends.base import QuantParams
from hailo_sweep.lsb_metrics import agreement_metrics, lsb_difference
from hailo_sweep.metrics import (
    METRIC_DIRECTIONS,
    SNR_CAP_DB,
    OutputSpec,
    direction_of,
    output_metrics,
    per_sample_error,
    sample_weighted_error,
    stage_metrics,
)

LN3 = math.log(3.0)

# A tensor pair used throughout:
#   ref  = [[1, 2],   [3, 4]]
#   cand = [[1, 2.5], [2, 4]]
#   cand - ref = [[0, 0.5], [-1, 0]]
REF_T = np.array([[1.0, 2.0], [3.0, 4.0]])
CAND_T = np.array([[1.0, 2.5], [2.0, 4.0]])

# A logits pair (2 samples, 2 classes):
#   ref  = [[0, ln3], [ln3, 0]] -> softmax [[0.25, 0.75], [0.75, 0.25]], argmax [1, 0]
#   cand = [[ln3, 0], [ln3, 0]] -> softmax [[0.75, 0.25], [0.75, 0.25]], argmax [0, 0]
REF_L = np.array([[0.0, LN3], [LN3, 0.0]])
CAND_L = np.array([[LN3, 0.0], [LN3, 0.0]])
LABELS = np.array([1, 1])


# -- tensor metrics ---------------------------------------------------------------------------------------------------


def test_tensor_metrics_hand_computed() -> None:
    m = output_metrics(REF_T, CAND_T)
    # mae = (0 + 0.5 + 1 + 0) / 4 = 0.375
    assert m["mae"] == pytest.approx(0.375)
    # max |diff| = 1
    assert m["max_abs"] == pytest.approx(1.0)
    # rmse = sqrt((0 + 0.25 + 1 + 0) / 4) = sqrt(0.3125)
    assert m["rmse"] == pytest.approx(math.sqrt(0.3125))
    # mean |ref| = 10 / 4 = 2.5 -> nmae = 0.375 / 2.5 = 0.15
    assert m["nmae"] == pytest.approx(0.15)
    # signal = 1 + 4 + 9 + 16 = 30, noise = 0.25 + 1 = 1.25 -> 10 log10(24)
    assert m["snr_db"] == pytest.approx(10 * math.log10(24.0))
    # sample 1: [1,2].[1,2.5] = 6, |r| = sqrt(5), |c| = sqrt(7.25) -> 6 / sqrt(36.25)
    # sample 2: [3,4].[2,4] = 22, |r| = 5, |c| = sqrt(20)          -> 22 / (5 sqrt(20))
    assert m["cosine"] == pytest.approx((6 / math.sqrt(36.25) + 22 / (5 * math.sqrt(20))) / 2)
    assert set(m) == {"mae", "max_abs", "rmse", "nmae", "snr_db", "cosine"}
    assert all(type(v) is float and math.isfinite(v) for v in m.values())


def test_per_sample_error_hand_computed() -> None:
    # sample 1: (0 + 0.5) / 2 = 0.25; sample 2: (1 + 0) / 2 = 0.5
    np.testing.assert_allclose(per_sample_error(REF_T, CAND_T), [0.25, 0.5])
    # samples of shape (2, 2) are flattened: sample 1 |diff| = [1, 0, 0, 0] -> 0.25, sample 2 all 0
    ref = np.zeros((2, 2, 2))
    cand = ref.copy()
    cand[0, 0, 0] = 1.0
    np.testing.assert_allclose(per_sample_error(ref, cand), [0.25, 0.0])


def test_snr_simple_ratios() -> None:
    ref = np.array([[10.0, 0.0], [0.0, 10.0]])  # signal power 200
    noise = np.array([[1.0, 0.0], [0.0, -1.0]])  # noise power 2 -> ratio 100 -> 20 dB
    assert output_metrics(ref, ref + noise)["snr_db"] == pytest.approx(20.0)
    # noise power 20 -> ratio 10 -> 10 dB
    assert output_metrics(ref, ref + math.sqrt(10) * noise)["snr_db"] == pytest.approx(10.0)
    # noise power 200 -> ratio 1 -> 0 dB
    assert output_metrics(ref, ref + 10 * noise)["snr_db"] == pytest.approx(0.0)


def test_snr_cap_and_zero_reference() -> None:
    assert SNR_CAP_DB == 200.0
    m = output_metrics(REF_T, REF_T.copy())
    assert m["snr_db"] == SNR_CAP_DB
    assert m["mae"] == 0.0 and m["rmse"] == 0.0 and m["cosine"] == pytest.approx(1.0)
    zeros = np.zeros((2, 3))
    # all-zero reference, nonzero error: no signal, only noise -> -cap; nmae falls back to divisor 1 -> nmae == mae
    bad = output_metrics(zeros, np.full((2, 3), 0.5))
    assert bad["snr_db"] == -SNR_CAP_DB
    assert bad["nmae"] == pytest.approx(0.5)
    # both zero: identical -> +cap
    assert output_metrics(zeros, zeros)["snr_db"] == SNR_CAP_DB


def test_cosine_cases() -> None:
    def cos(a: list, b: list) -> float:
        return output_metrics(np.array(a, float), np.array(b, float))["cosine"]

    assert cos([[1, 0]], [[0, 1]]) == pytest.approx(0.0)  # orthogonal
    assert cos([[1, 2]], [[1, 2]]) == pytest.approx(1.0)  # same
    assert cos([[1, 2]], [[3, 6]]) == pytest.approx(1.0)  # scaled
    assert cos([[1, 2]], [[-1, -2]]) == pytest.approx(-1.0)  # opposite
    assert cos([[0, 0]], [[0, 0]]) == 1.0  # two zero vectors: defined as 1
    assert cos([[0, 0]], [[1, 0]]) == 0.0  # one zero vector: defined as 0
    assert cos([[1, 0]], [[0, 0]]) == 0.0
    # mean over samples: orthogonal (0) and same direction (1) -> 0.5
    assert cos([[1, 0], [1, 0]], [[0, 1], [2, 0]]) == pytest.approx(0.5)
    # a sample of shape (2, 2) is flattened: [1,0,0,1] vs [1,0,0,-1] -> dot 0 -> 0
    assert cos([[[1, 0], [0, 1]]], [[[1, 0], [0, -1]]]) == pytest.approx(0.0)


# -- logits metrics ---------------------------------------------------------------------------------------------------


def test_logits_metrics_hand_computed() -> None:
    m = output_metrics(REF_L, CAND_L, kind="logits", labels=LABELS)
    # argmax ref [1, 0], cand [0, 0] -> 1 of 2 agree
    assert m["top1_agreement"] == pytest.approx(0.5)
    # |softmax diff| = [[0.5, 0.5], [0, 0]] -> 1 / 4
    assert m["softmax_mae"] == pytest.approx(0.25)
    # labels [1, 1]: cand argmax [0, 0] -> 0 correct; ref argmax [1, 0] -> 1 correct
    assert m["accuracy"] == pytest.approx(0.0)
    assert m["accuracy_ref"] == pytest.approx(0.5)
    assert m["accuracy_drop"] == pytest.approx(0.5)
    # |softmax(cand) - onehot| = [[0.75, 0.75], [0.75, 0.75]] -> 0.75
    assert m["softmax_label_mae"] == pytest.approx(0.75)
    # tensor metrics come too: diff = [[ln3, -ln3], [0, 0]] -> mae = ln3 / 2
    assert m["mae"] == pytest.approx(LN3 / 2)


def test_logits_without_labels_has_no_accuracy() -> None:
    m = output_metrics(REF_L, CAND_L, kind="logits")
    assert "top1_agreement" in m and "softmax_mae" in m
    assert not {"accuracy", "accuracy_ref", "accuracy_drop", "softmax_label_mae"} & set(m)
    assert "top1_agreement" not in output_metrics(REF_L, CAND_L)  # kind="tensor"


def test_softmax_is_numerically_stable() -> None:
    # logits shifted by 1000: softmax([1000, 1000 + ln3]) = [0.25, 0.75], softmax([1000, 1000]) = [0.5, 0.5]
    ref = np.array([[1000.0, 1000.0 + LN3]])
    cand = np.array([[1000.0, 1000.0]])
    m = output_metrics(ref, cand, kind="logits", labels=np.array([1]))
    assert m["softmax_mae"] == pytest.approx(0.25)
    # |[0.5, 0.5] - [0, 1]| = [0.5, 0.5] -> 0.5
    assert m["softmax_label_mae"] == pytest.approx(0.5)
    # float32 input near its own overflow limit
    big = np.array([[80.0, 80.0 + LN3]], np.float32) * np.float32(1.0)
    assert output_metrics(big, big, kind="logits")["softmax_mae"] == 0.0


def test_logits_three_classes_and_spatial_positions() -> None:
    # 4 samples, 3 classes; ref argmax [0, 1, 2, 2], cand argmax [0, 1, 1, 2], labels [0, 2, 2, 2]
    ref = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 1, 5]], float)
    cand = np.array([[4, 1, 0], [0, 6, 1], [0, 5, 1], [1, 0, 3]], float)
    m = output_metrics(ref, cand, kind="logits", labels=np.array([0, 2, 2, 2]))
    assert m["top1_agreement"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(2 / 4)  # cand hits samples 0 and 3
    assert m["accuracy_ref"] == pytest.approx(3 / 4)  # ref hits samples 0, 2, 3
    assert m["accuracy_drop"] == pytest.approx(1 / 4)
    # (N, H, C) logits: argmax per position, labels of shape (N, H); the same 4 rows as 2 samples x 2 positions
    m2 = output_metrics(ref.reshape(2, 2, 3), cand.reshape(2, 2, 3), kind="logits", labels=np.array([[0, 2], [2, 2]]))
    for key in ("top1_agreement", "accuracy", "accuracy_ref", "softmax_mae", "softmax_label_mae"):
        assert m2[key] == pytest.approx(m[key])


def test_labels_validation() -> None:
    # integral floats (as .npz files often hold) are accepted
    m = output_metrics(REF_L, CAND_L, kind="logits", labels=np.array([1.0, 1.0]))
    assert m["accuracy_ref"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels"):
        output_metrics(REF_L, CAND_L, kind="logits", labels=np.array([0, 2]))  # class 2 of 2
    with pytest.raises(ValueError, match="labels"):
        output_metrics(REF_L, CAND_L, kind="logits", labels=np.array([0, 1, 1]))  # wrong shape
    with pytest.raises(ValueError, match="labels"):
        output_metrics(REF_L, CAND_L, kind="logits", labels=np.array([0.5, 1.0]))  # not integral
    with pytest.raises(ValueError, match="logits"):
        output_metrics(np.zeros(3), np.zeros(3), kind="logits")  # no class axis


def test_blocked_computation_matches_plain_numpy() -> None:
    """Many samples and many classes cross the internal block size; compare with straightforward numpy."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(130, 700)).astype(np.float32)
    cand = (ref + rng.normal(scale=0.3, size=ref.shape)).astype(np.float32)
    labels = rng.integers(0, 700, size=130)
    m = output_metrics(ref, cand, kind="logits", labels=labels)
    r, c = ref.astype(np.float64), cand.astype(np.float64)

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    expected = {
        "mae": np.abs(c - r).mean(),
        "max_abs": np.abs(c - r).max(),
        "rmse": np.sqrt(((c - r) ** 2).mean()),
        "nmae": np.abs(c - r).mean() / np.abs(r).mean(),
        "snr_db": 10 * np.log10((r**2).sum() / ((c - r) ** 2).sum()),
        "cosine": np.mean((r * c).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1))),
        "top1_agreement": np.mean(r.argmax(1) == c.argmax(1)),
        "softmax_mae": np.abs(softmax(r) - softmax(c)).mean(),
        "accuracy": np.mean(c.argmax(1) == labels),
        "accuracy_ref": np.mean(r.argmax(1) == labels),
        "softmax_label_mae": np.abs(softmax(c) - np.eye(700)[labels]).mean(),
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    np.testing.assert_allclose(per_sample_error(ref, cand), np.abs(c - r).mean(axis=1), rtol=1e-12)


# -- input errors -----------------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        output_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 2\)"):
        per_sample_error(np.zeros(4), np.zeros((2, 2)))  # same size, different shape


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_candidate_is_refused(bad: float) -> None:
    cand = CAND_T.copy()
    cand[1, 1] = bad
    with pytest.raises(ValueError, match="candidate contains NaN/inf"):
        output_metrics(REF_T, cand)
    ref = REF_T.copy()
    ref[0, 0] = bad
    with pytest.raises(ValueError, match="reference contains NaN/inf"):
        output_metrics(ref, CAND_T)


def test_other_input_errors() -> None:
    with pytest.raises(ValueError):
        output_metrics(np.zeros((0, 3)), np.zeros((0, 3)))  # empty batch
    with pytest.raises(ValueError):
        output_metrics(np.float64(1.0), np.float64(1.0))  # no batch axis
    with pytest.raises(ValueError, match="kind"):
        output_metrics(REF_T, CAND_T, kind="boxes")  # probabilities is a kind now (tests/test_structural.py)
    with pytest.raises(ValueError, match="weight"):
        OutputSpec("x", weight=-1.0)
    with pytest.raises(ValueError, match="kind"):
        OutputSpec("x", kind="boxes")  # type: ignore[arg-type]


# -- several outputs --------------------------------------------------------------------------------------------------


def _stage_arrays() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # "z" has a huge error but weight 0 in the specs below
    reference = {"t": REF_T, "l": REF_L, "z": np.ones((2, 2))}
    candidate = {"t": CAND_T, "l": CAND_L, "z": np.full((2, 2), 100.0)}
    return reference, candidate


SPECS = [OutputSpec("t", weight=3.0), OutputSpec("l", weight=1.0, kind="logits"), OutputSpec("z", weight=0.0)]


def test_stage_metrics_weighted_totals() -> None:
    reference, candidate = _stage_arrays()
    m = stage_metrics(reference, candidate, SPECS, labels=LABELS)
    # per output keys, including the weight-0 output
    assert m["t.mae"] == pytest.approx(0.375)
    assert m["l.softmax_mae"] == pytest.approx(0.25)
    assert m["z.mae"] == pytest.approx(99.0)
    # nmae: t = 0.15; l: mae = ln3/2, mean|ref| = ln3/2 -> 1.0; weights 3:1 -> (0.45 + 1) / 4
    assert m["total.nmae"] == pytest.approx(0.3625)
    # snr: t = 10 log10(24); l: signal 2 ln3^2 = noise 2 ln3^2 -> 0 dB
    assert m["total.snr_db"] == pytest.approx(3 * 10 * math.log10(24.0) / 4)
    # cosine: l sample 1 [0,ln3].[ln3,0] = 0, sample 2 identical = 1 -> 0.5
    t_cos = (6 / math.sqrt(36.25) + 22 / (5 * math.sqrt(20))) / 2
    assert m["l.cosine"] == pytest.approx(0.5)
    assert m["total.cosine"] == pytest.approx((3 * t_cos + 0.5) / 4)
    # logits totals come from the logits output only
    assert m["total.top1_agreement"] == pytest.approx(0.5)
    assert m["total.accuracy"] == pytest.approx(0.0)
    assert m["total.accuracy_drop"] == pytest.approx(0.5)
    assert all(type(v) is float and math.isfinite(v) for v in m.values())


def test_stage_weights_are_normalized() -> None:
    reference, candidate = _stage_arrays()
    scaled = [OutputSpec(s.name, weight=s.weight * 7.0, kind=s.kind) for s in SPECS]
    a = stage_metrics(reference, candidate, SPECS, labels=LABELS)
    b = stage_metrics(reference, candidate, scaled, labels=LABELS)
    for key in ("total.nmae", "total.snr_db", "total.cosine", "total.accuracy_drop"):
        assert b[key] == pytest.approx(a[key])
    # equal weights change the total: (0.15 + 1.0) / 2
    equal = [OutputSpec("t"), OutputSpec("l", kind="logits")]
    assert stage_metrics(reference, candidate, equal)["total.nmae"] == pytest.approx(0.575)


def test_stage_without_logits_or_labels() -> None:
    reference, candidate = _stage_arrays()
    m = stage_metrics(reference, candidate, [OutputSpec("t")])
    assert m["total.nmae"] == pytest.approx(0.15)
    assert not any(k.startswith("total.") and k.split(".")[1] in ("top1_agreement", "accuracy_drop") for k in m)
    m2 = stage_metrics(reference, candidate, SPECS)  # logits but no labels
    assert "total.top1_agreement" in m2 and "total.accuracy_drop" not in m2 and "l.accuracy" not in m2


def test_stage_errors() -> None:
    reference, candidate = _stage_arrays()
    del candidate["l"]
    with pytest.raises(KeyError, match="'l'"):
        stage_metrics(reference, candidate, SPECS)
    reference, candidate = _stage_arrays()
    with pytest.raises(ValueError, match="weight"):
        stage_metrics(reference, candidate, [OutputSpec("t", weight=0.0)])
    with pytest.raises(ValueError, match="duplicate"):
        stage_metrics(reference, candidate, [OutputSpec("t"), OutputSpec("t")])


def test_sample_weighted_error_hand_computed() -> None:
    reference, candidate = _stage_arrays()
    # t: per-sample [0.25, 0.5] / mean|ref| 2.5 -> [0.1, 0.2]
    # l: per-sample [(ln3 + ln3)/2, 0] = [ln3, 0] / mean|ref| (ln3/2) -> [2, 0]
    # weights 3:1 (z has weight 0): [(0.3 + 2) / 4, (0.6 + 0) / 4]
    np.testing.assert_allclose(sample_weighted_error(reference, candidate, SPECS), [0.575, 0.15])


# -- emulation vs device ----------------------------------------------------------------------------------------------


def test_lsb_difference_uint8_rounding_and_clipping() -> None:
    q = QuantParams(scale=0.5, zero_point=10, dtype="uint8")
    # x / 0.5 + 10:  0.25 -> 10.5 -> 10 (half to even); 0.75 -> 11.5 -> 12 (half to even); 1.0 -> 12
    #               -6 -> -2 -> clipped 0;  123 -> 256 -> clipped 255;  -5 -> 0
    emulated = np.array([[0.25, 0.75, 1.0], [-6.0, 123.0, -5.0]], np.float32)
    raw = np.array([[11, 12, 12], [3, 250, 0]], np.uint8)
    diff = lsb_difference(emulated, raw, q)
    assert diff.dtype == np.int64
    np.testing.assert_array_equal(diff, [[1, 0, 0], [3, -5, 0]])


def test_lsb_difference_uint16_no_wraparound() -> None:
    q = QuantParams(scale=0.25, zero_point=32768, dtype="uint16")
    # 1.0 -> 32772; 0.125 -> 32768.5 -> 32768; 0.375 -> 32769.5 -> 32770; -9000 -> clipped 0; 9000 -> clipped 65535
    emulated = np.array([[1.0, 0.125, 0.375, -9000.0, 9000.0]])
    raw = np.array([[32772, 32769, 32770, 65535, 0]], np.uint16)
    # the last two would wrap around in uint16 arithmetic; int64 keeps the sign
    np.testing.assert_array_equal(lsb_difference(emulated, raw, q), [[0, 1, 0, 65535, -65535]])


def test_lsb_difference_errors() -> None:
    q = QuantParams(scale=1.0, zero_point=0, dtype="uint8")
    with pytest.raises(ValueError, match="shape"):
        lsb_difference(np.zeros((1, 3)), np.zeros((1, 4), np.uint8), q)
    with pytest.raises(ValueError, match="integer"):
        lsb_difference(np.zeros((1, 3)), np.zeros((1, 3), np.float32), q)
    with pytest.raises(ValueError, match="NaN"):
        lsb_difference(np.array([[np.nan, 0, 0]]), np.zeros((1, 3), np.uint8), q)


def test_agreement_metrics_hand_computed() -> None:
    q8 = QuantParams(scale=1.0, zero_point=0, dtype="uint8")
    q16 = QuantParams(scale=1.0, zero_point=0, dtype="uint16")
    emulated = {"a": np.array([[0.0, 1.0], [2.0, 3.0]]), "b": np.array([[100.0], [200.0]]), "c": np.zeros((1, 2))}
    raw = {
        "a": np.array([[0, 1], [2, 5]], np.uint8),  # diffs [0, 0, 0, 2]
        "b": np.array([[101], [199]], np.uint16),  # diffs [1, -1]
        "c": np.array([[7, 0]], np.uint8),  # diffs [7, 0], weight 0
    }
    quant = {"a": q8, "b": q16, "c": q8}
    specs = [OutputSpec("a", weight=3.0), OutputSpec("b", weight=1.0), OutputSpec("c", weight=0.0)]
    m = agreement_metrics(emulated, raw, quant, specs)
    assert m["a.lsb_max"] == 2.0
    assert m["a.lsb_mean"] == pytest.approx(0.5)  # (0 + 0 + 0 + 2) / 4
    assert m["a.identical_share"] == pytest.approx(0.75)
    # sorted |diff| [0, 0, 0, 2]; position 3 * 0.99 = 2.97 -> 0 + 0.97 * (2 - 0) = 1.94
    assert m["a.lsb_p99"] == pytest.approx(1.94)
    assert (m["b.lsb_max"], m["b.lsb_mean"], m["b.identical_share"], m["b.lsb_p99"]) == pytest.approx((1, 1, 0, 1))
    assert m["c.lsb_max"] == 7.0  # measured ...
    assert m["total.lsb_max"] == 2.0  # ... but excluded from totals
    assert m["total.identical_share"] == pytest.approx((3 * 0.75 + 1 * 0.0) / 4)
    assert all(type(v) is float for v in m.values())


def test_agreement_p99_and_missing_output() -> None:
    q = QuantParams(scale=1.0, zero_point=0, dtype="uint8")
    emulated = np.zeros((100, 1))
    raw = np.zeros((100, 1), np.uint8)
    raw[42, 0] = 5  # sorted |diff|: 99 zeros then 5; position 99 * 0.99 = 98.01 -> 0 + 0.01 * 5 = 0.05
    m = agreement_metrics({"o": emulated}, {"o": raw}, {"o": q}, [OutputSpec("o")])
    assert m["o.lsb_p99"] == pytest.approx(0.05)
    assert m["o.lsb_mean"] == pytest.approx(0.05)
    assert m["o.identical_share"] == pytest.approx(0.99)
    with pytest.raises(KeyError, match="'o'"):
        agreement_metrics({"o": emulated}, {"o": raw}, {}, [OutputSpec("o")])


def test_agreement_wide_differences_match_numpy() -> None:
    """32-bit raw outputs spread too wide for the histogram path; the fallback must give the same definitions."""
    rng = np.random.default_rng(2)
    q = QuantParams(scale=1.0, zero_point=0, dtype="int32")
    emulated = rng.normal(scale=1e6, size=(20, 30)).round()
    raw = (emulated + rng.integers(-300_000, 300_000, size=emulated.shape)).astype(np.int32)
    diff = np.abs(raw.astype(np.int64) - emulated.astype(np.int64))
    m = agreement_metrics({"o": emulated}, {"o": raw}, {"o": q}, [OutputSpec("o")])
    assert m["o.lsb_max"] == float(diff.max())
    assert m["o.lsb_mean"] == pytest.approx(diff.mean())
    assert m["o.lsb_p99"] == pytest.approx(np.percentile(diff, 99))


# -- directions -------------------------------------------------------------------------------------------------------


def test_direction_of() -> None:
    assert direction_of("logits.softmax_mae") == "minimize"
    assert direction_of("total.snr_db") == "maximize"
    assert direction_of("output.1.cosine") == "maximize"  # ONNX output names may contain dots
    assert direction_of("total.identical_share") == "maximize"
    assert direction_of("cls.accuracy_drop") == "minimize"
    with pytest.raises(KeyError):
        direction_of("total.latency_fun")


def test_every_produced_key_has_a_direction() -> None:
    keys = set(output_metrics(REF_L, CAND_L, kind="logits", labels=LABELS))
    reference, candidate = _stage_arrays()
    keys |= set(stage_metrics(reference, candidate, SPECS, labels=LABELS))
    q = QuantParams(scale=1.0, zero_point=0, dtype="uint8")
    emulated, raw = {"o": np.zeros((1, 2))}, {"o": np.zeros((1, 2), np.uint8)}
    keys |= set(agreement_metrics(emulated, raw, {"o": q}, [OutputSpec("o")]))
    for key in keys:
        assert direction_of(key) in ("minimize", "maximize"), key
    assert set(METRIC_DIRECTIONS.values()) == {"minimize", "maximize"}


@pytest.mark.parametrize("dtype,spread", [("uint8", 3), ("uint16", 40), ("int32", 400_000)])
def test_the_lsb_histogram_counts_every_signed_difference_across_blocks(dtype: str, spread: int) -> None:
    """Counted block by block (bincount, or unique for a wide spread), the histogram is that of the whole difference
    array, and the agreement metrics read off it are numpy's own definitions over the absolute differences."""
    from hailo_sweep.lsb_metrics import histogram_metrics, lsb_histogram
    from hailo_sweep.metrics import block_rows

    rng = np.random.default_rng(spread)
    q = QuantParams(scale=0.5, zero_point=7 if dtype != "int32" else 0, dtype=dtype)
    emulated = rng.uniform(0, 60, size=(900, 7, 11)) if dtype != "int32" else rng.normal(scale=1e6, size=(900, 7, 11))
    noise = rng.integers(-spread, spread + 1, size=emulated.shape) * (rng.random(emulated.shape) < 0.3)
    info = np.iinfo(np.dtype(dtype))
    raw = np.clip(q.quantize(emulated).astype(np.int64) + noise, info.min, info.max).astype(dtype)
    assert len(block_rows(900, 77)) == 3  # several blocks, so the merge is exercised
    diff = lsb_difference(emulated, raw, q).ravel()
    values, counts = np.unique(diff, return_counts=True)
    histogram = lsb_histogram(emulated, raw, q)
    assert histogram == dict(zip(values.tolist(), counts.tolist())) and list(histogram) == sorted(histogram)
    m = histogram_metrics(histogram)
    absolute = np.abs(diff)
    assert m["lsb_max"] == float(absolute.max()) and m["lsb_mean"] == pytest.approx(absolute.mean())
    assert m["lsb_p99"] == pytest.approx(np.percentile(absolute, 99)) and m["identical_share"] == pytest.approx(np.mean(absolute == 0))
