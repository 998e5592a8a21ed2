"""Heatmap overlays for a viewer: the image under a JET-coloured map, a caption in the corner.

Pillow is needed here only (decoding the image and drawing the caption); the rest of the SDK works
without it.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

#: Share of the heatmap's colour in each overlay pixel.
ALPHA = 0.45


def jet(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> RGB uint8 in the JET colour map (dark blue, cyan, yellow, dark red)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


def _rgb(image: Any) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("overlays need Pillow: pip install pillow") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
        return image
    data = image if isinstance(image, (bytes, bytearray)) else open(os.fspath(image), "rb").read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def draw_overlay(image: Any, heatmap: np.ndarray, caption: str) -> np.ndarray:
    """HxWx3 uint8 RGB: ``image`` blended with ``jet(heatmap)`` (same height and width), ``caption``
    in white on black in the top-left corner."""
    from PIL import Image, ImageDraw

    rgb = _rgb(image)
    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap is {heatmap.shape[1]}x{heatmap.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
    blended = (rgb.astype(np.float32) * (1 - ALPHA) + jet(heatmap).astype(np.float32) * ALPHA).round().astype(np.uint8)
    canvas = Image.fromarray(blended)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((4, 4), caption)
    draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255))
    return np.asarray(canvas)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (inside pixels with a 4-neighbour outside), 2 px thick."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = mask.astype(bool) & ~inner
    grown = np.pad(edge, 1)
    return edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]


def draw_segmentation(image: Any, mask: np.ndarray, box: Any, caption: str) -> np.ndarray:
    """HxWx3 uint8 RGB: ``image`` with the mask's outline in green, ``box`` (x0, y0, x1, y1, or None)
    in yellow and ``caption`` in the top-left corner."""
    from PIL import Image, ImageDraw

    rgb = _rgb(image)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
    out = rgb.copy()
    out[_outline(mask)] = (0, 255, 0)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    if box is not None:
        x0, y0, x1, y1 = box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 220, 0), width=2)
    left, top, right, bottom = draw.textbbox((4, 4), caption)
    draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255))
    return np.asarray(canvas)


def draw_boxes(image: Any, boxes: list, caption: str = "") -> np.ndarray:
    """HxWx3 uint8 RGB: ``image`` with each (box, label) drawn (yellow box, its label above it)."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(_rgb(image).copy())
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), label in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 220, 0), width=2)
        left, top, right, bottom = draw.textbbox((x0 + 2, max(0, y0 - 12)), label)
        draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text((x0 + 2, max(0, y0 - 12)), label, fill=(255, 255, 255))
    if not boxes:
        draw.text((4, 4), caption or "no lesion detected", fill=(255, 255, 255))
    return np.asarray(canvas)
