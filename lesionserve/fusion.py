"""Fusion of backbone outputs: softmax per view, mean over views, weighted sum over backbones.

Written once for numpy arrays (CPU pipeline) and torch tensors (GPU variants) alike.
"""
from __future__ import annotations

from typing import Any, Sequence

from lesionserve.arrays import array_ops


def softmax(logits: Any) -> Any:
    """Numerically stable softmax over the last axis (computed in float64, returned float32)."""
    xp = array_ops(logits)
    z = xp.astype(logits, "float64")
    z = z - xp.max(z, axis=-1, keepdims=True)  # not in place: torch's .to() may return the input itself
    e = xp.exp(z)
    return xp.astype(e / xp.sum(e, axis=-1, keepdims=True), "float32")


def fuse(logits: Sequence[Any], weights: Sequence[float] | Any, views: int) -> tuple[Any, Any]:
    """Fuse per-backbone logits of shape (N*views) x C.

    Returns (probs N x C, backbone_probs N x B x C) where backbone_probs are each backbone's
    view-averaged probabilities and probs their weighted sum. numpy in, numpy out; torch tensors
    in, torch tensors out on the logits' device.
    """
    if len(logits) != len(weights):
        raise ValueError(f"{len(logits)} logit tensors but {len(weights)} weights")
    rows = {int(x.shape[0]) for x in logits}
    if len(rows) != 1 or next(iter(rows)) % views:
        raise ValueError(f"logit rows {sorted(rows)} are not one common multiple of views={views}")
    xp = array_ops(logits[0])
    per_backbone = [xp.mean(softmax(x).reshape(-1, views, x.shape[-1]), axis=1) for x in logits]
    backbone_probs = xp.stack(per_backbone, axis=1)
    w = xp.asarray(weights, "float32", like=logits[0])
    probs = xp.tensordot(backbone_probs, w, axes=([1], [0]))
    return xp.astype(probs, "float32"), xp.astype(backbone_probs, "float32")
