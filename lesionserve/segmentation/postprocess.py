"""From a segmenter's probability map to a lesion, as ISIC 2018 Task 1 defines one.

A challenge mask is one contiguous lesion without holes, so the prediction is thresholded, resized
to the original image, reduced to its largest connected component and hole-filled; the box is that
component's bounding rectangle in original pixel coordinates. An image where nothing passes the
threshold is *not found*: it gets an empty mask, no box and a flag, never a silent empty box.
These plain functions are what the reference pipeline and the served post-processing step run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lesionserve.cropping import NO_BOX

#: Probability above which a pixel is lesion (strictly greater, like the classification thresholds).
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Lesion:
    """One image's segmentation: mask (H x W bool, original size), box (x0, y0, x1, y1: inclusive
    first and exclusive last pixel, original coordinates; all -1 when not found), the mask's area
    as a fraction of the image, and whether a lesion was found."""

    mask: np.ndarray
    box: tuple[int, int, int, int]
    area_fraction: float
    found: bool




def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (ties: the first in scan order)."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region not connected to the image border filled in."""
    import cv2

    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)  # the background reachable from outside
    holes = flood == 0
    return (padded.astype(bool) | holes)[1:-1, 1:-1]


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the True pixels, x1/y1 exclusive; NO_BOX when there are none."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return NO_BOX
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def lesion_of_mask(mask: np.ndarray) -> np.ndarray:
    """A binary mask as ISIC 2018 Task 1 defines a lesion: its largest component, holes filled."""
    return fill_holes(largest_component(mask))


def lesion_from_probabilities(probs: np.ndarray, width: int, height: int, threshold: float = MASK_THRESHOLD) -> Lesion:
    """S x S lesion probabilities (the segmenter's input geometry) -> the Lesion at width x height.

    The probabilities are resized (bilinear) to the original image before thresholding, so the
    outline follows the image's pixels, not the network's grid."""
    import cv2

    if probs.ndim != 2:
        raise ValueError(f"expected one 2-D probability map, got shape {probs.shape}")
    full = cv2.resize(probs.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    mask = lesion_of_mask(full > threshold)
    box = bounding_box(mask)
    found = box != NO_BOX
    return Lesion(mask, box, float(mask.mean()) if found else 0.0, found)


def lesions_of_batch(logits: np.ndarray, image_sizes: np.ndarray, failed: np.ndarray,
                     threshold: float = MASK_THRESHOLD) -> dict[str, np.ndarray]:
    """The served step's outputs for N images: ``mask`` (N x Hmax x Wmax uint8, each image's mask
    at its own size in the top-left corner, zeros elsewhere), ``box`` (N x 4 int32), ``area`` and
    ``found`` (N x 1). ``logits``: N x 1 x S x S; ``image_sizes``: N x (width, height); a ``failed``
    row (preprocessing.failed_rows: its image could not be read) is not found and has an empty mask."""
    n = len(logits)
    sizes = np.asarray(image_sizes, np.int64).reshape(n, 2)
    height, width = max(1, int(sizes[:, 1].max(initial=1))), max(1, int(sizes[:, 0].max(initial=1)))
    out = {"mask": np.zeros((n, height, width), np.uint8), "box": np.full((n, 4), -1, np.int32),
           "area": np.zeros((n, 1), np.float32), "found": np.zeros((n, 1), bool)}
    probs = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(logits, np.float32)[:, 0], -60.0, 60.0)))  # no overflow warnings
    for i in range(n):
        if failed[i]:
            continue
        w, h = int(sizes[i, 0]), int(sizes[i, 1])
        lesion = lesion_from_probabilities(probs[i], w, h, threshold)
        out["mask"][i, :h, :w] = lesion.mask
        out["box"][i] = lesion.box
        out["area"][i, 0] = lesion.area_fraction
        out["found"][i, 0] = lesion.found
    return out


def lesion_boxes(logits: np.ndarray, image_sizes: np.ndarray, failed: np.ndarray,
                 threshold: float = MASK_THRESHOLD) -> list[tuple[int, int, int, int]]:
    """Each image's lesion box (NO_BOX where none was found or the image failed), from N x 1 x S x S logits."""
    return [tuple(int(v) for v in box) for box in lesions_of_batch(logits, image_sizes, failed, threshold)["box"]]  # type: ignore[misc]


def crop_batch(images: list[bytes], logits: np.ndarray, image_sizes: np.ndarray, failed: np.ndarray, inputs,
               threshold: float, margin: float, **preprocess: object) -> tuple[object, np.ndarray, np.ndarray]:
    """The served crop step: (preprocess_batch_rows of the lesion crops, N x 4 int32 rectangles cut,
    N x 1 bool lesion found). A row whose image failed keeps its error and zero pixels; a row with no
    lesion is the whole image (found False)."""
    from lesionserve.preprocessing import preprocess_batch_rows

    boxes = lesion_boxes(logits, image_sizes, failed, threshold)
    batch = preprocess_batch_rows(images, inputs, boxes=boxes, margin=margin, **preprocess)  # type: ignore[arg-type]
    found = np.array([[box != NO_BOX] for box in boxes], bool).reshape(-1, 1)
    return batch, np.asarray(batch.crops, np.int32).reshape(-1, 4), found


def encode_crops(images: list[bytes], boxes: list[tuple[int, int, int, int]], margin: float,
                 **limits: int) -> tuple[list[bytes], np.ndarray]:
    """The BLS variant's crop: each image cut to its lesion (+ margin) and re-encoded as PNG
    (lossless: the classifier decodes exactly the crop's pixels), with the rectangles cut (N x 4).
    An image that cannot be decoded is passed on unchanged, so the classifier reports its error."""
    import cv2

    from lesionserve.cropping import crop_to_lesion
    from lesionserve.preprocessing import ImageDecodeError, decode_image

    out, rects = [], []
    for data, box in zip(images, boxes):
        try:
            rgb = decode_image(data, **limits)
        except ImageDecodeError:
            out.append(data)
            rects.append(NO_BOX)
            continue
        crop, rect, _ = crop_to_lesion(rgb, box, margin)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError(f"OpenCV could not PNG-encode a {crop.shape[1]}x{crop.shape[0]} crop")
        out.append(encoded.tobytes())
        rects.append(rect)
    return out, np.asarray(rects, np.int32).reshape(-1, 4)
