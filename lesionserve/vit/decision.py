"""From a head's logits to what a clinician reads, the same in the reference and the server:
softmax probabilities, the decision at the head's operating threshold on P(melanoma), and an
attention map at the image's own size scaled to [0, 1] as the Grad-CAM maps are (explain.upsample_map:
least attended patch 0, most 1; rollout keeps a large floor from the residual mixing, which divided
by its maximum alone paints every pixel hot)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lesionserve.explain import upsample_map

from lesionserve.vit.spec import Head


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def decide(probs: np.ndarray, head: Head, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, melanoma flags) of N x k probabilities: the positive class when P(positive) >=
    ``threshold``, else the most probable of the other classes."""
    probs = np.asarray(probs, np.float32)
    pos = head.positive_index
    melanoma = probs[:, pos] >= threshold
    others = probs.copy()
    others[:, pos] = -1.0
    labels = np.where(melanoma, pos, others.argmax(axis=1))
    return np.array([head.class_names[i] for i in labels], dtype=object), melanoma


#: Per-head outputs of the post step (and the ensemble), each named ``<what>_<head>``.
HEAD_OUTPUTS = ("probs", "label", "melanoma", "threshold")


def melanoma_of_batch(logits: Mapping[str, np.ndarray], heads: Sequence[Head], thresholds: Mapping[str, float],
                      grid_maps: np.ndarray, image_sizes: np.ndarray, failed: np.ndarray) -> dict[str, np.ndarray]:
    """The served post-processing step's outputs for N images: per head ``probs_<head>`` (N x k),
    ``label_<head>`` (N x 1 bytes), ``melanoma_<head>`` (N x 1 bool) and ``threshold_<head>`` (N x 1,
    the operating threshold used); ``attention`` (N x Hmax x
    Wmax float32, each image's map in the top-left corner of its own size). A ``failed`` row (its
    image could not be read) gets zeros, an empty label and no map."""
    n = len(grid_maps)
    sizes = np.asarray(image_sizes, np.int64).reshape(n, 2)
    failed = np.asarray(failed, bool).reshape(n)
    out: dict[str, np.ndarray] = {}
    for head in heads:
        probs = softmax(logits[head.name])
        labels, melanoma = decide(probs, head, thresholds[head.name])
        probs[failed], melanoma[failed] = 0.0, False
        column = np.empty((n, 1), dtype=np.object_)
        column[:, 0] = [b"" if failed[i] else str(labels[i]).encode() for i in range(n)]
        out[f"probs_{head.name}"], out[f"label_{head.name}"], out[f"melanoma_{head.name}"] = probs, column, melanoma.reshape(n, 1)
        out[f"threshold_{head.name}"] = np.full((n, 1), thresholds[head.name], np.float32)
    height, width = max(1, int(sizes[:, 1].max(initial=1))), max(1, int(sizes[:, 0].max(initial=1)))
    canvas = np.zeros((n, height, width), np.float32)
    for i in range(n):
        if not failed[i]:
            w, h = int(sizes[i, 0]), int(sizes[i, 1])
            canvas[i, :h, :w] = upsample_map(np.asarray(grid_maps[i], np.float32), w, h)
    out["attention"] = canvas
    return out
