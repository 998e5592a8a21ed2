"""Classification metrics (numpy only).

Balanced accuracy (BACC) is the ISIC 2018 Task 3 headline metric: the mean of per-class recall.
Classes absent from ``y_true`` have no defined recall (NaN) and are left out of the mean, so a
small validation split that lacks a rare class is scored on the classes it has.

Also here: one-vs-rest sensitivity/specificity, malignant BACC (mean sensitivity of MEL, BCC and
AKIEC), rank-based ROC AUC and ROC curves (no sklearn), and a vectorised percentile bootstrap.
"""
from __future__ import annotations

import numpy as np

from lesionserve.spec import CLASS_NAMES, NUM_CLASSES


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


# ------------------------------------------------------------------------------ clinical metrics

#: The malignant classes of ISIC 2018 Task 3, whose mean sensitivity is the "malignant BACC".
MALIGNANT_CLASSES: tuple[str, ...] = ("MEL", "BCC", "AKIEC")


def sensitivity_specificity_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest (sensitivity, specificity) per class; NaN where a class has no positives / negatives."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    positives = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    negatives = total - positives
    true_negatives = total - positives - predicted + tp
    sensitivity = recall_from_confusion(cm)
    specificity = np.full(cm.shape[0], np.nan)
    np.divide(true_negatives, negatives, out=specificity, where=negatives > 0)
    return sensitivity, specificity


def malignant_indices() -> list[int]:
    """Column indices of MALIGNANT_CLASSES in CLASS_NAMES order."""
    return [CLASS_NAMES.index(name) for name in MALIGNANT_CLASSES]


def malignant_from_recall(recall: np.ndarray) -> float:
    """Mean recall over MEL, BCC, AKIEC present (non-NaN); NaN if none is present."""
    values = np.asarray(recall, dtype=np.float64)[..., malignant_indices()]
    present = ~np.isnan(values)
    if not present.any():
        return float("nan")
    return float(values[present].mean())


def malignant_balanced_accuracy(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    """Mean sensitivity of MEL, BCC and AKIEC (those present in ``y_true``); ValueError if none is."""
    value = malignant_from_recall(per_class_recall(y_true, y_pred, num_classes))
    if np.isnan(value):
        raise ValueError("malignant balanced accuracy is undefined: y_true has no MEL, BCC or AKIEC")
    return value


def rankdata(values) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata 'average')."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], x.size]
    average = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = average[run]
    return ranks


def binary_auc(scores, positive) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic; ties count one half.

    NaN if ``positive`` has no positives or no negatives.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    if s.shape != pos.shape:
        raise ValueError(f"scores and positive differ in length ({s.size} vs {pos.size})")
    n_pos = int(pos.sum())
    n_neg = s.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = rankdata(s)[pos].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def one_vs_rest_auc(y_true, probs, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """AUC of each class's probability column against the rest; NaN for a class absent from (or all of) y_true."""
    t = _labels("y_true", y_true, num_classes)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (t.size, num_classes):
        raise ValueError(f"probs must have shape ({t.size}, {num_classes}), got {p.shape}")
    return np.array([binary_auc(p[:, c], t == c) for c in range(num_classes)])


def macro_auc(y_true, probs, num_classes: int = NUM_CLASSES) -> float:
    """Mean one-vs-rest AUC over the classes where it is defined; NaN if it is defined for none."""
    auc = one_vs_rest_auc(y_true, probs, num_classes)
    return float(np.nanmean(auc)) if (~np.isnan(auc)).any() else float("nan")


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) for ``score > theta`` over every distinct threshold.

    Starts at (0, 0) and ends at (1, 1); ties move both rates together (a diagonal step), so the
    trapezoid area equals ``binary_auc``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, pos = s[order], pos[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(pos)[last_of_run]
    fp = np.cumsum(~pos)[last_of_run]
    n_pos, n_neg = max(int(pos.sum()), 1), max(int((~pos).sum()), 1)
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def bootstrap_confusions(y_true, y_pred, n_boot: int, seed: int = 0, num_classes: int = NUM_CLASSES,
                         chunk: int = 200) -> np.ndarray:
    """``n_boot`` x C x C confusion matrices of resamples (with replacement, same size) of the pairs.

    Seeded, so two calls with the same seed and length resample the same indices: rows of a report
    scored with one seed are compared on the same resamples (a paired bootstrap).
    """
    t = _labels("y_true", y_true, num_classes)
    p = _labels("y_pred", y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    if t.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    rng = np.random.default_rng(seed)
    cells = t * num_classes + p
    out = np.empty((n_boot, num_classes, num_classes), dtype=np.int64)
    size = num_classes * num_classes
    for start in range(0, n_boot, chunk):  # chunks bound memory at chunk x N indices
        k = min(chunk, n_boot - start)
        idx = rng.integers(0, t.size, size=(k, t.size))
        flat = cells[idx] + (np.arange(k) * size)[:, None]
        out[start:start + k] = np.bincount(flat.ravel(), minlength=k * size).reshape(k, num_classes, num_classes)
    return out


def recall_from_confusions(cms: np.ndarray) -> np.ndarray:
    """Per-class recall of a stack of confusion matrices (... x C x C); NaN where a class is absent."""
    cms = np.asarray(cms, dtype=np.float64)
    support = cms.sum(axis=-1)
    diag = np.diagonal(cms, axis1=-2, axis2=-1)
    recall = np.full(support.shape, np.nan)
    np.divide(diag, support, out=recall, where=support > 0)
    return recall


def percentile_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (NaN replicates ignored)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(v, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_balanced_accuracy_ci(y_true, y_pred, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
                                   num_classes: int = NUM_CLASSES) -> tuple[float, float]:
    """Percentile bootstrap interval of balanced accuracy (resampling images, classes present per resample)."""
    recall = recall_from_confusions(bootstrap_confusions(y_true, y_pred, n_boot, seed, num_classes))
    with np.errstate(all="ignore"):
        baccs = np.nanmean(recall, axis=1)
    return percentile_interval(baccs, confidence)
