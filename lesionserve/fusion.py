"""Fusion of backbone outputs: softmax per view, mean over views, weighted sum over backbones."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (computed in float64, returned float32)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fuse(
    logits: Sequence[np.ndarray], weights: Sequence[float], views: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-backbone logits of shape (N*views) x C.

    Returns (probs N x C, backbone_probs N x B x C) where backbone_probs are each backbone's
    view-averaged probabilities and probs their weighted sum.
    """
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} logit tensors but {len(weights)} weights")
    rows = {x.shape[0] for x in logits}
    if len(rows) != 1 or next(iter(rows)) % views:
        raise ValueError(f"logit rows {sorted(rows)} are not one common multiple of views={views}")
    per_backbone = [softmax(x).reshape(-1, views, x.shape[-1]).mean(axis=1) for x in logits]
    backbone_probs = np.stack(per_backbone, axis=1)
    w = np.asarray(weights, dtype=np.float32)
    probs = np.tensordot(backbone_probs, w, axes=([1], [0]))
    return probs.astype(np.float32), backbone_probs.astype(np.float32)
