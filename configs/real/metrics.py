"""Task metrics of the corpus's sequence readers (configs/real/*.yaml, `metrics:`), called by hailo-sweep per stage
as ``function(reference, outputs, labels)`` with batch-first arrays; each returns one number per sample."""

from __future__ import annotations

import numpy as np


def _greedy_ctc(logits: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Best path per sample of (N, T, C) scores: the argmax per step, repeats merged, blanks dropped."""
    best = logits.argmax(axis=-1)
    decoded = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(c) for c in row[keep] if c != blank))
    return decoded


def captcha_agreement(reference, outputs, labels):
    """1 per sample whose decoded string equals the float model's (captcha-whisperer: blank 36)."""
    return np.array([a == b for a, b in zip(_greedy_ctc(outputs["logits"], 36), _greedy_ctc(reference["logits"], 36))], float)


def captcha_accuracy(reference, outputs, labels):
    """1 per sample whose decoded string equals the drawn text (labels: class indices padded with -1)."""
    truth = [tuple(int(c) for c in row if c >= 0) for row in labels]
    return np.array([a == b for a, b in zip(_greedy_ctc(outputs["logits"], 36), truth)], float)


def ddddocr_agreement(reference, outputs, labels):
    """1 per sample whose decoded string equals the float model's (ddddocr: class 0 is the blank)."""
    return np.array([a == b for a, b in zip(_greedy_ctc(outputs["387"], 0), _greedy_ctc(reference["387"], 0))], float)


#: rapidocr's DBPostProcess: a pixel is text where the probability map exceeds ``thresh`` (config.yaml Det.thresh: 0.3;
#: ch_ppocr_det/utils.py:113-114, ``segmentation = pred > self.thresh``); boxes are then traced on that mask
DB_THRESH = 0.3


def text_map_iou(reference, outputs, labels):
    """IoU per sample of the text masks (probability > 0.3) of the quantized and the float DBNet map (PP-OCRv4 det);
    1.0 for a sample where neither finds text. (The wheel also dilates the mask 2x2 before tracing boxes; not here.)"""
    ref = reference["sigmoid_0.tmp_0"] > DB_THRESH
    out = outputs["sigmoid_0.tmp_0"] > DB_THRESH
    axes = tuple(range(1, ref.ndim))
    inter = (ref & out).sum(axis=axes)
    union = (ref | out).sum(axis=axes)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
