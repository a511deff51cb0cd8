"""How the device's outputs were read: left quantized, or 16-bit outputs read as 8-bit."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hailo_sweep.backends.base import QuantParams
from hailo_sweep.diagnose.finding import Finding
from hailo_sweep.diagnose.stats import FAR_NMAE, EXPLAINS_FACTOR, nmae, integral


# -- 4. dequantization ------------------------------------------------------------------------------------------------


def check_dequantized(
    candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], quant: Mapping[str, QuantParams]
) -> list[Finding]:
    """Raw device outputs compared with float references without dequantization (hailo-api.md 4.3, forum t/6719).

    Per output present in all three mappings (same shape): flagged when the compared values are whole numbers
    inside the raw dtype's range (e.g. 0..255 for uint8), their nmae against the reference exceeds ``FAR_NMAE``
    (0.5), and ``quant[name].dequantize(candidate)`` brings the nmae down by at least ``EXPLAINS_FACTOR`` (4x).
    Correctly dequantized outputs are not whole numbers (unless the scale is 1, when dequantizing again only moves
    them away), so they are never flagged.
    """
    found: list[Finding] = []
    for name, values in candidate.items():
        if name not in reference or name not in quant:
            continue
        cand = np.asarray(values)
        ref = np.asarray(reference[name])
        q = quant[name]
        if cand.shape != ref.shape or cand.size == 0 or not integral(cand):
            continue
        info = np.iinfo(np.dtype(q.dtype))
        if float(cand.min()) < info.min or float(cand.max()) > info.max:
            continue
        err_raw = nmae(ref, cand)
        err_deq = nmae(ref, cand, q.dequantize)
        if err_raw <= FAR_NMAE or err_deq * EXPLAINS_FACTOR > err_raw:
            continue
        found.append(
            Finding(
                code="not_dequantized",
                title=f"'{name}': raw device outputs compared without dequantization",
                message=(
                    f"The compared '{name}' values are integers in [{cand.min():.0f}, {cand.max():.0f}] ({q.dtype} range) "
                    f"and differ from the float reference by nmae {err_raw:.4g}; dequantized with scale {q.scale:.6g} and "
                    f"zero point {q.zero_point:g} they match it with nmae {err_deq:.4g}."
                ),
                fix=(
                    f"Dequantize before comparing: x = (q - {q.zero_point:g}) * {q.scale:.6g} (HailoRT: the output vstream's "
                    "quant_info qp_zp / qp_scale), or request FLOAT32 output so HailoRT dequantizes."
                ),
                severity="error",
                output=name,
                evidence={"nmae_as_compared": err_raw, "nmae_dequantized": err_deq, "scale": q.scale, "zero_point": q.zero_point, "raw_dtype": q.dtype},
            )
        )
    return found


# -- 5. 16-bit outputs ------------------------------------------------------------------------------------------------


def _as_uint16_pairs(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> np.ndarray | None:
    """A byte buffer of twice the elements reinterpreted as little-endian 16-bit values of ``shape``, if it fits."""
    if raw.itemsize != 1 or raw.size != 2 * int(np.prod(shape)):
        return None
    return np.ascontiguousarray(raw).view(np.dtype(dtype).newbyteorder("<")).reshape(shape)


def check_output_bits(
    raw: Mapping[str, np.ndarray], quant: Mapping[str, QuantParams], reference: Mapping[str, np.ndarray] | None = None
) -> list[Finding]:
    """A 16-bit output read as 8-bit (hailo-api.md 4.4: 16-bit outputs are UINT16 with their own scale/zero point).

    Per output whose quantization is 16-bit:

    - the raw buffer has 1-byte elements: read with an 8-bit format or truncated; with a reference of half the
      element count, the buffer is also re-read as little-endian 16-bit pairs and the resulting nmae reported;
    - the raw buffer is 16-bit but every value fits in 0..255 while dequantizing it is far from the reference
      (nmae > ``FAR_NMAE``): 8-bit values widened to 16 bits. Needs ``reference``; a 16-bit output that really lies
      in 0..255 and matches the reference is not flagged.
    """
    found: list[Finding] = []
    for name, values in raw.items():
        q = quant.get(name)
        if q is None or q.bits != 16:
            continue
        arr = np.asarray(values)
        ref = None if reference is None or name not in reference else np.asarray(reference[name])
        evidence: dict[str, float | str] = {"raw_dtype": str(arr.dtype), "quant_dtype": q.dtype, "raw_elements": float(arr.size)}
        if arr.itemsize == 1:
            detail = f"The raw '{name}' buffer holds {arr.dtype} values ({arr.size} elements), but the output is quantized to {q.dtype}"
            if ref is not None:
                evidence["reference_elements"] = float(ref.size)
                pairs = _as_uint16_pairs(arr, ref.shape, q.dtype)
                if pairs is not None:
                    err = nmae(ref, pairs, q.dequantize)
                    evidence["nmae_as_16bit_pairs"] = err
                    detail += (
                        f"; it has twice the reference's {ref.size} elements, and read as {q.dtype} byte pairs it "
                        f"matches the reference with nmae {err:.4g}"
                    )
                elif arr.shape == ref.shape:
                    detail += "; the element count matches, so the 16-bit values were truncated to 8 bits"
        elif arr.itemsize == 2 and ref is not None and arr.shape == ref.shape and integral(arr) and float(arr.max()) <= 255:
            err = nmae(ref, arr, q.dequantize)
            if err <= FAR_NMAE:
                continue
            evidence["nmae_dequantized"] = err
            detail = (
                f"The raw '{name}' values are 16-bit but all lie in [{arr.min():.0f}, {arr.max():.0f}], and dequantized "
                f"with the 16-bit scale {q.scale:.6g} / zero point {q.zero_point:g} they are far from the reference "
                f"(nmae {err:.4g}): 8-bit reads widened to 16 bits"
            )
        else:
            continue
        found.append(
            Finding(
                code="16bit_read_as_8bit",
                title=f"'{name}': 16-bit output read as 8-bit",
                message=detail + ".",
                fix=(
                    f"Read '{name}' as {q.dtype} (HailoRT: format type UINT16 or FLOAT32 for this output; UINT8 is "
                    f"refused for 16-bit outputs) and dequantize with scale {q.scale:.6g} and zero point {q.zero_point:g}."
                ),
                severity="error",
                output=name,
                evidence=evidence,
            )
        )
    return found
