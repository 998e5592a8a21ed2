"""Deterministic test-time augmentation: prefixes of the 8 dihedral views of a square image."""
from __future__ import annotations

import numpy as np

from lesionserve.spec import check_views


def _dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """View k (0..7) of an ... x H x W array; H == W. Order chosen so prefixes 1/2/4 are useful."""
    ops = (
        lambda a: a,  # identity
        lambda a: a[..., ::-1],  # horizontal flip
        lambda a: a[..., ::-1, :],  # vertical flip
        lambda a: a[..., ::-1, ::-1],  # rotate 180
        lambda a: np.swapaxes(a, -1, -2),  # transpose
        lambda a: np.swapaxes(a, -1, -2)[..., ::-1],  # rotate 90 clockwise
        lambda a: np.swapaxes(a, -1, -2)[..., ::-1, :],  # rotate 90 counter-clockwise
        lambda a: np.swapaxes(a, -1, -2)[..., ::-1, ::-1],  # anti-transpose
    )
    return ops[k](x)


def make_views(batch: np.ndarray, views: int) -> np.ndarray:
    """N x C x H x W -> (N*views) x C x H x W, image-major: row n*views + k is view k of image n."""
    check_views(views)
    if batch.ndim != 4 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"expected N x C x S x S square images, got shape {batch.shape}")
    stacked = np.stack([_dihedral(batch, k) for k in range(views)], axis=1)
    return np.ascontiguousarray(stacked.reshape(-1, *batch.shape[1:]))
