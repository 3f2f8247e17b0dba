"""Segmentation metrics: a confusion matrix per image (summed over the split), matching predicted ids to classes
(Hungarian or majority), and mIoU, pixel accuracy and per-class IoU."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

MAX_PRED = 256  # predictions are 8-bit PNGs


def confusion(pred: np.ndarray, gt: np.ndarray, n_gt: int, ignore: int) -> np.ndarray:
    """(MAX_PRED, n_gt) pixel counts over the valid pixels of one image."""
    valid = gt != ignore
    idx = pred[valid].astype(np.int64) * n_gt + gt[valid].astype(np.int64)
    return np.bincount(idx, minlength=MAX_PRED * n_gt).reshape(MAX_PRED, n_gt)


def match(conf: np.ndarray, matching: str = "hungarian") -> np.ndarray:
    """Predicted id -> GT class (-1: unmatched). conf: (n_pred, n_gt)."""
    mapping = np.full(conf.shape[0], -1, np.int64)
    if matching == "majority":
        used = conf.sum(1) > 0
        mapping[used] = conf[used].argmax(1)
        return mapping
    if matching != "hungarian":
        raise ValueError(f"unknown matching {matching!r}; use hungarian or majority")
    rows, cols = linear_sum_assignment(-conf)
    mapping[rows] = cols
    return mapping


def scores(conf: np.ndarray, mapping: np.ndarray, names: list[str]) -> dict:
    n_gt = conf.shape[1]
    matched = np.zeros((n_gt, n_gt), np.int64)  # (predicted-as class, gt class)
    for p, g in enumerate(mapping):
        if g >= 0:
            matched[g] += conf[p]
    tp = np.diag(matched).astype(np.float64)
    gt_total = conf.sum(0).astype(np.float64)
    pred_total = matched.sum(1).astype(np.float64)
    union = gt_total + pred_total - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    present = gt_total > 0  # classes absent from the split's ground truth do not count
    per_class = {
        (names[c] if c < len(names) else str(c)): (round(float(iou[c]) * 100, 4) if present[c] else None)
        for c in range(n_gt)
    }
    return {
        "miou": round(float(np.nanmean(np.where(present, iou, np.nan))) * 100, 4),
        "pixel_accuracy": round(float(tp.sum() / max(gt_total.sum(), 1)) * 100, 4),
        "per_class_iou": per_class,
        "assignment": {str(p): int(g) for p, g in enumerate(mapping) if conf[p].sum() > 0},
    }
