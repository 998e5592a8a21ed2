"""The detector's preprocessing, defined once: letterbox to a square, as ultralytics does.

Served (the detector pipeline's preprocess step), the reference and the export check all call
:func:`letterbox`; :func:`unletterbox` maps boxes back to original pixels. The image is resized so
its longer side is ``size`` (aspect ratio kept), centred on a grey (114) square canvas, scaled to
[0, 1], channels first: ultralytics' LetterBox(auto=False, center=True) and its /255.
"""
from __future__ import annotations

import cv2
import numpy as np

PAD_VALUE = 114


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(3 x size x size float32 in [0, 1], scale, (pad_x, pad_y)) of an H x W x 3 uint8 RGB image;
    the pads are what unletterbox subtracts."""
    height, width = rgb.shape[:2]
    scale = min(size / height, size / width)
    new_w, new_h = round(width * scale), round(height * scale)
    pad_x, pad_y = (size - new_w) / 2, (size - new_h) / 2
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (width, height) else rgb
    top, left = round(pad_y - 0.1), round(pad_x - 0.1)
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[top:top + new_h, left:left + new_w] = resized
    # The offsets boxes are mapped back with, as ultralytics' scale_boxes computes them (from the
    # unrounded scaled size; equal to left/top but for rare rounding).
    back = (float(round((size - width * scale) / 2 - 0.1)), float(round((size - height * scale) / 2 - 0.1)))
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / 255.0, scale, back


def unletterbox(boxes_xyxy: np.ndarray, scale: float, pad: tuple[float, float], width: int, height: int) -> np.ndarray:
    """N x 4 boxes on the letterboxed canvas -> original pixels, clipped to the image."""
    out = (np.asarray(boxes_xyxy, np.float32) - np.array([pad[0], pad[1], pad[0], pad[1]], np.float32)) / scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out
