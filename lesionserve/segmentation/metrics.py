"""Segmentation metrics: per-image IoU (Jaccard) and Dice, and ISIC 2018 Task 1's thresholded Jaccard."""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: ISIC 2018 Task 1: a per-image IoU below this counts as 0 (a failed segmentation).
TASK1_CUT = 0.65


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape; two empty masks agree perfectly (1.0)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction is {pred.shape[1]}x{pred.shape[0]}, the mask {truth.shape[1]}x{truth.shape[0]}")
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); two empty masks agree perfectly (1.0)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction is {pred.shape[1]}x{pred.shape[0]}, the mask {truth.shape[1]}x{truth.shape[0]}")
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def thresholded_jaccard(ious: Sequence[float], cut: float = TASK1_CUT) -> float:
    """Mean of the per-image IoUs with those below ``cut`` set to 0 (the Task 1 score)."""
    values = np.asarray(ious, np.float64)
    return float(np.where(values >= cut, values, 0.0).mean())


def summary(ious: Sequence[float], dices: Sequence[float]) -> dict[str, float]:
    """Mean Jaccard, thresholded Jaccard, mean Dice, the share of images below the cut, and the count."""
    values = np.asarray(ious, np.float64)
    return {"jaccard": float(values.mean()), "thresholded_jaccard": thresholded_jaccard(values),
            "dice": float(np.mean(dices)), "failed_fraction": float((values < TASK1_CUT).mean()), "images": len(values)}
