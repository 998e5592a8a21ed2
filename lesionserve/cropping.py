"""Crop-guided classification's geometry, declared once (seed 004's "CropBest").

The lesion's bounding rectangle (from the segmenter, or from an expert mask) is grown by
``margin`` times its width and height on every side, kept inside the image, and cut from the
*original* decoded image; the crop is then preprocessed exactly as a whole image would be (square
resize, the member's normalisation). Training (``--crop-boxes``), calibration, evaluation, the
in-process reference and the served ``lesion_crop`` pipeline all call :func:`crop_to_lesion`, so
they see the same pixels. An image where no lesion was found is classified whole, and says so.
"""
from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]

#: (x0, y0, x1, y1) of "no lesion": all -1 (x1 and y1 are exclusive elsewhere).
NO_BOX: Box = (-1, -1, -1, -1)
#: Margin around the lesion, as a fraction of its width and height on each side: the border
#: between lesion and skin stays in the crop (it carries the asymmetry and border cues).
CROP_MARGIN = 0.1


def grow_box(box: Box, width: int, height: int, margin: float) -> Box:
    """``box`` grown by ``margin`` times its width and height on every side, kept inside the image."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = box
    dx, dy = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return max(0, x0 - dx), max(0, y0 - dy), min(width, x1 + dx), min(height, y1 + dy)


def check_box(box: Box, width: int, height: int) -> None:
    """ValueError unless ``box`` is NO_BOX or a non-empty rectangle inside a width x height image."""
    if tuple(box) == NO_BOX:
        return
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} is not a non-empty rectangle inside a {width}x{height} image "
                         "(x0, y0 inclusive; x1, y1 exclusive), nor NO_BOX (-1, -1, -1, -1)")


def crop_rect(box: Box, width: int, height: int, margin: float = CROP_MARGIN) -> Box:
    """The rectangle crop_to_lesion cuts from a width x height image: the grown box, or the whole
    image for NO_BOX."""
    box = tuple(int(v) for v in box)  # type: ignore[assignment]
    check_box(box, width, height)
    return (0, 0, width, height) if box == NO_BOX else grow_box(box, width, height, margin)


def crop_to_lesion(rgb: np.ndarray, box: Box, margin: float = CROP_MARGIN) -> tuple[np.ndarray, Box, bool]:
    """(the crop, the rectangle cut in original pixels, whether it is a lesion crop) of an H x W x 3
    image. ``box`` NO_BOX (no lesion found): the whole image, its full rectangle and False."""
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = crop_rect(box, width, height, margin)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return rgb, (x0, y0, x1, y1), tuple(box) != NO_BOX
    return np.ascontiguousarray(rgb[y0:y1, x0:x1]), (x0, y0, x1, y1), True
