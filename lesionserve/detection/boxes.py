"""Lesion boxes for detection: seed 000's saliency rule, and the real boxes of expert masks.

Seed 000 had class labels only, so it made each image's box from a saliency heuristic
(:func:`saliency_box`, exactly as ../shared/reference/seed-recipes.md describes it) and trained
and evaluated against those boxes. Where an expert mask exists, the real box is the bounding
rectangle of the mask's lesion (largest component, holes filled: :func:`mask_box`, the challenge's
definition and the segmenter's post-processing). ``lesionserve detect-boxes`` measures how far the
first is from the second, per class.

Boxes are (x0, y0, x1, y1) in pixels, x1 and y1 exclusive, as everywhere in the project.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lesionserve.cropping import Box

#: The seed's rule, its constants named.
DARK_VALUE = 80  # V below this (0-255) is lesion, whatever the saturation
KERNEL_SIZE = 15  # elliptical structuring element of the close, then the open
MIN_AREA, MAX_AREA = 0.01, 0.95  # a contour outside these shares of the image is not trusted
PADDING = 0.08  # of the rectangle's width and height, on each side
FALLBACK_YOLO = (0.5, 0.5, 0.7, 0.7)  # centred box (cx, cy, w, h, normalised) when the contour is not trusted


@dataclass(frozen=True)
class SaliencyBox:
    box: Box
    fell_back: bool  # True: the centred fallback box, no contour was trusted


def from_yolo(cx: float, cy: float, w: float, h: float, width: int, height: int) -> Box:
    """Normalised (cx, cy, w, h) -> pixel (x0, y0, x1, y1) inside a width x height image."""
    x0, x1 = round((cx - w / 2) * width), round((cx + w / 2) * width)
    y0, y1 = round((cy - h / 2) * height), round((cy + h / 2) * height)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def to_yolo(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel (x0, y0, x1, y1) -> normalised (cx, cy, w, h), the ultralytics label format."""
    x0, y0, x1, y1 = box
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def saliency_mask(rgb: np.ndarray) -> np.ndarray:
    """The seed's lesion pixels: Otsu on HSV saturation, OR value < 80; closed then opened (15x15 ellipse)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    _, saturated = cv2.threshold(hsv[..., 1], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((saturated > 0) | (hsv[..., 2] < DARK_VALUE)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (KERNEL_SIZE, KERNEL_SIZE))
    return cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), cv2.MORPH_OPEN, kernel)


def saliency_box(rgb: np.ndarray) -> SaliencyBox:
    """Seed 000's box of an H x W x 3 RGB image: the largest external contour of saliency_mask,
    its bounding rectangle padded by 8% of its size on each side and clipped; the centred fallback
    when that contour covers < 1% or > 95% of the image (or there is none)."""
    height, width = rgb.shape[:2]
    contours, _ = cv2.findContours(saliency_mask(rgb), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        largest = max(contours, key=cv2.contourArea)
        share = cv2.contourArea(largest) / (width * height)
        if MIN_AREA <= share <= MAX_AREA:
            x, y, w, h = cv2.boundingRect(largest)
            dx, dy = PADDING * w, PADDING * h
            box = (max(0, round(x - dx)), max(0, round(y - dy)), min(width, round(x + w + dx)), min(height, round(y + h + dy)))
            return SaliencyBox(box, False)
    return SaliencyBox(from_yolo(*FALLBACK_YOLO, width, height), True)


def mask_box(mask: np.ndarray) -> Box | None:
    """The real box: the bounding rectangle of the mask's largest component, holes filled; None if empty."""
    from lesionserve.cropping import NO_BOX
    from lesionserve.segmentation.postprocess import bounding_box, lesion_of_mask

    box = bounding_box(lesion_of_mask(mask.astype(bool)))
    return None if box == NO_BOX else box


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (exclusive ends)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
