"""Training augmentation graded per class by its imbalance, and the training dataset that applies it.

The seed's graded scheme: a class with imbalance ratio r = (largest class count) / (its count) gets

    level 0  r < 2          nothing
    level 1  2 <= r < 6     random h/v flips, rotation within +-30 degrees
    level 2  6 <= r < 15    flips, rotation within +-90 degrees, affine (scale, shear, translation)
    level 3  r >= 15        level 2, then Gaussian noise, Gaussian blur and JPEG re-compression
                            (each with probability 1/2, so the clean image still appears)

and MEL is forced to at least level 2 (its errors cost most). Augmentation works on the resized
uint8 RGB image with OpenCV, then the serving ``normalize`` is applied, so training and serving
tensors differ only by the augmentation. Geometric warps reflect the border rather than padding
black, so corners carry no class cue. Every image is augmented by a generator seeded with
``(seed, epoch, draw)``: reproducible, and independent of workers and processes.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.preprocessing import normalize, resize
from lesionserve.spec import CLASS_NAMES, NUM_CLASSES
from lesionserve.training.data import read_rgb

AUGMENT_MODES = ("graded", "basic", "none")
LEVEL_NAMES = (
    "none",
    "flips + rotate 30",
    "flips + rotate 90 + affine",
    "flips + rotate 90 + affine + noise/blur/JPEG",
)
#: Ratio thresholds: level = number of thresholds r reaches.
LEVEL_THRESHOLDS = (2.0, 6.0, 15.0)
#: Classes with a minimum level whatever their ratio (seed: MEL at least the 6 <= r < 15 level).
MIN_LEVELS: Mapping[int, int] = {CLASS_NAMES.index("MEL"): 2}


def level_for_ratio(ratio: float) -> int:
    """Augmentation level (0-3) for an imbalance ratio majority/class count."""
    if not ratio >= 1.0:
        raise ValueError(f"imbalance ratio must be >= 1, got {ratio}")
    return sum(ratio >= t for t in LEVEL_THRESHOLDS)


def class_levels(
    counts: Sequence[int], mode: str = "graded", min_levels: Mapping[int, int] = MIN_LEVELS
) -> list[int]:
    """Level per class from the training split's class counts (index = class).

    ``graded``: by imbalance ratio, then raised to ``min_levels``; a class absent from the split
    counts as infinitely rare. ``basic``: level 1 for every class. ``none``: level 0.
    """
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}; got {mode!r}")
    if mode == "none":
        return [0] * len(counts)
    if mode == "basic":
        return [1] * len(counts)
    majority = max(counts)
    if majority <= 0:
        raise ValueError("class counts are all zero")
    levels = [level_for_ratio(majority / c) if c > 0 else len(LEVEL_THRESHOLDS) for c in counts]
    return [max(level, min_levels.get(c, 0)) for c, level in enumerate(levels)]


def _warp(rgb: np.ndarray, rng: np.random.Generator, max_angle: float, affine: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    angle = math.radians(rng.uniform(-max_angle, max_angle))
    scale, shear, tx, ty = 1.0, 0.0, 0.0, 0.0
    if affine:
        scale = rng.uniform(0.9, 1.1)
        shear = math.radians(rng.uniform(-10.0, 10.0))
        tx, ty = rng.uniform(-0.1, 0.1, size=2) * (w, h)
    cos, sin = math.cos(angle), math.sin(angle)
    rotate_scale = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    center = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    offset = center + (tx, ty) - rotate_scale @ center  # rotate about the centre, then translate
    matrix = np.hstack([rotate_scale, offset[:, None]]).astype(np.float64)
    return cv2.warpAffine(rgb, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = rgb
    if rng.random() < 0.5:
        noise = rng.normal(0.0, rng.uniform(2.0, 8.0), size=out.shape)
        out = np.clip(np.rint(out.astype(np.float32) + noise), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=rng.uniform(0.3, 1.2), borderType=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        quality = int(rng.integers(40, 91))
        # OpenCV's JPEG codec expects BGR: convert so chroma subsampling hits the right channels.
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("OpenCV failed to JPEG-encode an augmented image")
        out = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out


def augment(rgb: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Augment an HxWx3 uint8 RGB image at ``level`` (0-3); returns a new contiguous uint8 array."""
    if level not in (0, 1, 2, 3):
        raise ValueError(f"augmentation level must be 0, 1, 2 or 3, got {level}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {rgb.shape} dtype {rgb.dtype}")
    if level == 0:
        return rgb.copy()
    out = rgb
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    out = _warp(np.ascontiguousarray(out), rng, max_angle=30.0 if level == 1 else 90.0, affine=level >= 2)
    if level >= 3:
        out = _degrade(out, rng)
    return np.ascontiguousarray(out)


class AugmentedDataset(Dataset):
    """Training samples -> (normalised 3 x size x size float32 tensor, label), augmented per class.

    Keys are ``(epoch, draw, index)`` from ``training.sampling.EpochSampler`` (a bare int ``i``
    means ``(0, i, i)``); the augmentation is seeded by ``(seed, epoch, draw)``.
    """

    def __init__(self, samples: Sequence, size: int, levels: Sequence[int], seed: int = 0,
                 normalization: Normalization = IMAGENET, crops=None):
        if len(levels) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} class levels, got {len(levels)}")
        self.samples = list(samples)
        self.size = int(size)
        self.levels = list(levels)
        self.seed = int(seed)
        self.normalization = normalization
        self.crops = crops  # segmentation.boxes.CropBoxes: each image cut to its lesion first

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        epoch, draw, index = (0, key, key) if isinstance(key, (int, np.integer)) else key
        sample = self.samples[index]
        rgb = read_rgb(sample, self.crops)
        rng = np.random.default_rng([self.seed, epoch, draw])
        array = normalize(augment(resize(rgb, self.size), self.levels[sample.label], rng), self.normalization)
        return torch.from_numpy(array), sample.label
