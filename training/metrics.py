"""Classification metrics (numpy only).

Balanced accuracy (BACC) is the ISIC 2018 Task 3 headline metric: the mean of per-class recall.
Classes absent from ``y_true`` have no defined recall (NaN) and are left out of the mean, so a
small validation split that lacks a rare class is scored on the classes it has.
"""
from __future__ import annotations

import numpy as np

from lesionserve.spec import NUM_CLASSES


def _labels(name: str, values, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{name} holds values outside 0..{num_classes - 1}")
    return array


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``num_classes`` x ``num_classes`` int64 counts; row = true class, column = predicted class."""
    t = _labels("y_true", y_true, num_classes)
    p = _labels("y_pred", y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def recall_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class recall from a confusion matrix; NaN for classes with no true samples."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1).astype(np.float64)
    recall = np.full(cm.shape[0], np.nan)
    np.divide(np.diag(cm).astype(np.float64), support, out=recall, where=support > 0)
    return recall


def per_class_recall(y_true, y_pred, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Recall of each class (float64, length ``num_classes``); NaN where the class is absent from y_true."""
    return recall_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def balanced_accuracy(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    """Mean recall over the classes present in ``y_true``. Raises ValueError if y_true is empty."""
    recall = per_class_recall(y_true, y_pred, num_classes)
    present = ~np.isnan(recall)
    if not present.any():
        raise ValueError("balanced accuracy is undefined for an empty y_true")
    return float(recall[present].mean())
