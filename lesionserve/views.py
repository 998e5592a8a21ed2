"""Deterministic test-time augmentation: prefixes of the 8 dihedral views of a square image.

Written once for numpy arrays (CPU pipeline) and torch tensors (GPU variants) alike.
"""
from __future__ import annotations

from typing import Any

from lesionserve.arrays import array_ops
from lesionserve.spec import check_views


def _dihedral(x: Any, k: int) -> Any:
    """View k (0..7) of an ... x H x W array; H == W. Order chosen so prefixes 1/2/4 are useful."""
    xp = array_ops(x)
    t = lambda a: xp.swapaxes(a, -1, -2)  # noqa: E731
    ops = (
        lambda a: a,  # identity
        lambda a: xp.flip(a, -1),  # horizontal flip
        lambda a: xp.flip(a, -2),  # vertical flip
        lambda a: xp.flip(a, (-2, -1)),  # rotate 180
        lambda a: t(a),  # transpose
        lambda a: xp.flip(t(a), -1),  # rotate 90 clockwise
        lambda a: xp.flip(t(a), -2),  # rotate 90 counter-clockwise
        lambda a: xp.flip(t(a), (-2, -1)),  # anti-transpose
    )
    return ops[k](x)


def make_views(batch: Any, views: int) -> Any:
    """N x C x H x W -> (N*views) x C x H x W, image-major: row n*views + k is view k of image n.

    ``batch`` is a numpy array or a torch tensor; the result is of the same kind, on the same device.
    """
    check_views(views)
    if batch.ndim != 4 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"expected N x C x S x S square images, got shape {tuple(batch.shape)}")
    xp = array_ops(batch)
    stacked = xp.stack([_dihedral(batch, k) for k in range(views)], axis=1)
    return xp.contiguous(stacked.reshape(-1, *batch.shape[1:]))


#: The view that undoes view k: flips, rot180 and both transposes undo themselves; the two rot90s swap.
INVERSE_VIEW: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 5, 7)


def invert_views(views_batch: Any, views: int) -> Any:
    """(N*views) x ... x H x W maps in view geometry -> the same rows back in image geometry
    (row n*views + k undone by view k's inverse): what make_views did, undone."""
    check_views(views)
    xp = array_ops(views_batch)
    rows = [_dihedral(views_batch[i], INVERSE_VIEW[i % views]) for i in range(views_batch.shape[0])]
    return xp.contiguous(xp.stack(rows, axis=0))
