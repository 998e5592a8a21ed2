"""Synthetic dermoscopy dataset in the ISIC 2018 Task 3 layout.

Writes a small, deterministic stand-in for the ISIC 2018 Task 3 training set so unit tests,
integration tests and the demo can run without the real 10,015 images::

    OUT/ISIC2018_Task3_Training_Input/ISIC_0000000.jpg, ...          (JPEG quality 90)
    OUT/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    OUT/ISIC2018_Task3_Training_LesionGroupings.csv
    OUT/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png, ...  (lesion masks, {0, 255})
    OUT/masks.csv                                                    (image,mask_path, as the real pool's)
    OUT/.lesionserve_synthetic.json                                  (marks a generator output)

Each image is a skin-toned field (mottling, vignetting, sometimes the dark rim of the
dermatoscope's round field, hair strands, the odd air bubble) with one lesion whose colour,
size, border and structures depend on the class:

    MEL    large, very irregular border, dark brown/black/blue-grey patches, blue-white veil,
           atypical network, irregular dots/globules, peripheral streaks
    NV     medium, round/oval, uniform medium brown, regular network or globules
    BCC    medium, pearly whitish pink, arborizing red vessels, blue-grey ovoid nests
    AKIEC  medium, ill-defined, red-pink with white-yellow scale, dotted vessels, rough texture
    BKL    medium-large, sharp edge, light brown/tan, waxy, cerebriform furrows,
           milia-like cysts and comedo-like openings
    DF     small, round, brown with a fine peripheral network and a central white patch
    VASC   small-medium, round, red/purple/dark-blue lacunae separated by pale septa

Colour and size are strong cues (a CNN trained for minutes from scratch separates them); the
structures add realism. Every image gets its own pose (position, rotation, scale) and lighting
(brightness, white balance, hue), hair and noise. Some lesions are photographed 2-3 times: same
geometry and colours, different pose, lighting and crop, sharing a ``HAM_`` lesion id in the
groupings file, so lesion-grouped splitting can be tested. Each image's mask is where its lesion
is (the lesion's opacity after its pose, above one half; hair and bubbles drawn over it stay inside),
in the layout of ISIC 2018 Task 1's ground truth, so segmentation and explanation maps can be
scored without real masks.

Everything derives from ``seed``: the same arguments give byte-identical files (with the same
numpy and OpenCV builds; another OpenCV/libjpeg may change pixels, never labels or groupings).
About 4 s for the default 140 images of 600x450 on a 2-core CPU.

CLI::

    python -m training.synthetic --out data/synthetic --num-images 140 --size 600x450 --seed 0
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from lesionserve import prog
from lesionserve.spec import CLASS_NAMES

__all__ = [
    "CONFIRM_TYPES",
    "DatasetPaths",
    "HAM10000_CLASS_COUNTS",
    "balanced_class_counts",
    "generate_dataset",
    "ham10000_class_counts",
    "main",
    "render_lesion",
    "render_lesion_with_mask",
]

IMAGES_DIRNAME = "ISIC2018_Task3_Training_Input"
GROUND_TRUTH_DIRNAME = "ISIC2018_Task3_Training_GroundTruth"
LABELS_FILENAME = "ISIC2018_Task3_Training_GroundTruth.csv"
GROUPINGS_FILENAME = "ISIC2018_Task3_Training_LesionGroupings.csv"
MASKS_DIRNAME = "ISIC2018_Task1_Training_GroundTruth"
MASKS_FILENAME = "masks.csv"
MARKER_FILENAME = ".lesionserve_synthetic.json"
GENERATOR_NAME = "lesionserve training.synthetic"
FORMAT_VERSION = 2  # 2: lesion masks

JPEG_QUALITY = 90
MIN_SIDE = 32
MAX_REPEAT_FRACTION = 0.5
MAX_SHOTS_PER_LESION = 3
HAM10000_MIN_PER_CLASS = 2

#: Image counts per class in HAM10000 (= the ISIC 2018 Task 3 training set), for ``ham10000`` imbalance.
HAM10000_CLASS_COUNTS: dict[str, int] = {
    "MEL": 1113, "NV": 6705, "BCC": 514, "AKIEC": 327, "BKL": 1099, "DF": 115, "VASC": 142,
}

#: Values of the groupings file's ``diagnosis_confirm_type`` column.
CONFIRM_TYPES: tuple[str, ...] = ("histopathology", "follow_up", "consensus", "confocal")

# How each class was confirmed (probabilities over CONFIRM_TYPES), roughly as in HAM10000.
_CONFIRM_PROBS: dict[str, tuple[float, float, float, float]] = {
    "MEL": (0.97, 0.0, 0.0, 0.03),
    "NV": (0.33, 0.54, 0.12, 0.01),
    "BCC": (1.0, 0.0, 0.0, 0.0),
    "AKIEC": (1.0, 0.0, 0.0, 0.0),
    "BKL": (0.51, 0.0, 0.31, 0.18),
    "DF": (0.48, 0.0, 0.52, 0.0),
    "VASC": (0.45, 0.0, 0.55, 0.0),
}


@dataclass(frozen=True)
class DatasetPaths:
    """Where a generated dataset lives."""

    root: Path
    images_dir: Path
    labels_csv: Path
    groupings_csv: Path
    masks_dir: Path
    masks_csv: Path

    @classmethod
    def under(cls, root: Path) -> "DatasetPaths":
        """The paths of a dataset rooted at ``root``."""
        return cls(
            root=root,
            images_dir=root / IMAGES_DIRNAME,
            labels_csv=root / GROUND_TRUTH_DIRNAME / LABELS_FILENAME,
            groupings_csv=root / GROUPINGS_FILENAME,
            masks_dir=root / MASKS_DIRNAME,
            masks_csv=root / MASKS_FILENAME,
        )


# --------------------------------------------------------------------------------------------
# Class counts
# --------------------------------------------------------------------------------------------


def balanced_class_counts(num_images: int) -> dict[str, int]:
    """Split ``num_images`` evenly over CLASS_NAMES; the remainder goes to the first classes."""
    _check_num_images(num_images)
    base, extra = divmod(num_images, len(CLASS_NAMES))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(CLASS_NAMES)}


def ham10000_class_counts(num_images: int, minimum: int = HAM10000_MIN_PER_CLASS) -> dict[str, int]:
    """Split ``num_images`` in HAM10000 proportions with at least ``minimum`` images per class."""
    floor = minimum * len(CLASS_NAMES)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < floor:
        raise ValueError(
            f"ham10000 imbalance needs num_images >= {floor} ({minimum} per class), got {num_images!r}"
        )
    total = sum(HAM10000_CLASS_COUNTS.values())
    ideal = {c: num_images * HAM10000_CLASS_COUNTS[c] / total for c in CLASS_NAMES}
    counts = {c: max(minimum, int(ideal[c])) for c in CLASS_NAMES}
    # Hand out what is left by largest fractional part, or take back from the classes furthest
    # above their ideal share (never below ``minimum``).
    while sum(counts.values()) < num_images:
        best = max(CLASS_NAMES, key=lambda c: (ideal[c] - counts[c], -CLASS_NAMES.index(c)))
        counts[best] += 1
    while sum(counts.values()) > num_images:
        best = max(
            (c for c in CLASS_NAMES if counts[c] > minimum),
            key=lambda c: (counts[c] - ideal[c], -CLASS_NAMES.index(c)),
        )
        counts[best] -= 1
    return counts


# --------------------------------------------------------------------------------------------
# Small image helpers. Colour images are float32 RGB in [0, 1], planar (3, H, W): per-channel
# operations on contiguous planes are an order of magnitude faster than on interleaved pixels.
# --------------------------------------------------------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at edge0 to 1 at edge1 (edge0 > edge1 gives a falling step)."""
    t = np.clip((x - edge0) * (1.0 / (edge1 - edge0)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _noise(rng: np.random.Generator, h: int, w: int, cells: float) -> np.ndarray:
    """Smooth value noise (about unit variance) with ``cells`` features across the shorter side."""
    short = min(h, w)
    ch = max(2, int(round(cells * h / short)))
    cw = max(2, int(round(cells * w / short)))
    grid = rng.standard_normal((ch, cw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fractal(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int) -> np.ndarray:
    """Sum of ``octaves`` noise layers, each twice as fine and half as strong."""
    out = np.zeros((h, w), np.float32)
    amp, norm = 1.0, 0.0
    for octave in range(octaves):
        out += amp * _noise(rng, h, w, cells * 2**octave)
        norm += amp * amp
        amp *= 0.5
    return out / math.sqrt(norm)


def _blend(rgb: np.ndarray, color: Sequence[float], mask: np.ndarray, strength: float = 1.0) -> None:
    """In place: move planar ``rgb`` towards ``color`` by ``mask * strength``."""
    m = mask if strength == 1.0 else mask * np.float32(strength)
    tmp = np.empty_like(m)
    for c in range(3):
        np.subtract(np.float32(color[c]), rgb[c], out=tmp)
        tmp *= m
        rgb[c] += tmp


def _mask_float(mask_u8: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """uint8 drawing mask -> float32 in [0, 1], optionally Gaussian-blurred (sigma in pixels)."""
    out = mask_u8.astype(np.float32) * np.float32(1.0 / 255.0)
    if blur > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    return out


def _jitter_color(rng: np.random.Generator, color: Sequence[float], amount: float) -> np.ndarray:
    """A colour with a shared brightness jitter and a small per-channel jitter."""
    c = np.asarray(color, np.float32)
    c = c * np.float32(1.0 + rng.normal(0.0, amount)) + rng.normal(0.0, amount * 0.4, 3).astype(np.float32)
    return np.clip(c, 0.0, 1.0).astype(np.float32)


_SHIFT = 4  # OpenCV drawing fixed-point bits (sub-pixel coordinates)
_ONE = 1 << _SHIFT


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


# --------------------------------------------------------------------------------------------
# Lesions: one canvas per lesion (lesion-local coordinates), warped into each photograph
# --------------------------------------------------------------------------------------------

_EXTENT = 1.8  # the canvas spans [-_EXTENT, _EXTENT] lesion radii on both axes
_MAX_CANVAS = 1024


@dataclass(frozen=True)
class _ClassStyle:
    radius: tuple[float, float]  # lesion mean radius as a fraction of the image's shorter side
    irregularity: tuple[float, float]  # summed amplitude of the border's harmonics
    harmonics: int  # highest border harmonic
    ellipticity: tuple[float, float]
    edge: float  # half-width of the border's soft edge, in radii
    edge_noise: float  # fine-scale raggedness of the border


_STYLES: dict[str, _ClassStyle] = {
    "MEL": _ClassStyle((0.27, 0.36), (0.22, 0.32), 24, (1.0, 1.18), 0.05, 0.07),
    "NV": _ClassStyle((0.16, 0.22), (0.02, 0.05), 4, (1.0, 1.15), 0.10, 0.01),
    "BCC": _ClassStyle((0.15, 0.21), (0.08, 0.14), 8, (1.0, 1.15), 0.07, 0.03),
    "AKIEC": _ClassStyle((0.17, 0.24), (0.12, 0.20), 12, (1.0, 1.18), 0.16, 0.08),
    "BKL": _ClassStyle((0.19, 0.26), (0.06, 0.12), 10, (1.0, 1.18), 0.03, 0.02),
    "DF": _ClassStyle((0.075, 0.10), (0.02, 0.06), 4, (1.0, 1.12), 0.14, 0.02),
    "VASC": _ClassStyle((0.12, 0.17), (0.03, 0.08), 5, (1.0, 1.12), 0.04, 0.01),
}

# Patient skin: fair skin as in most ISIC images, shared by every class.
_SKIN = (0.89, 0.71, 0.63)


@dataclass
class _Lesion:
    """A rendered lesion: premultiplied RGBA canvas in lesion-local coordinates plus patient skin."""

    label: str
    rgba: np.ndarray  # S x S x 4 float32 (interleaved), RGB premultiplied by alpha
    radius_px: float  # mean radius in image pixels (before per-shot scale jitter)
    px_per_unit: float  # canvas pixels per lesion radius
    skin: np.ndarray  # (3,) float32


class _Ctx:
    """Lesion-local coordinate grids and the border shape, for the class painters."""

    def __init__(self, rng: np.random.Generator, style: _ClassStyle, size_px: int) -> None:
        self.rng = rng
        self.S = size_px
        self.px = size_px / (2.0 * _EXTENT)
        coords = ((np.arange(size_px, dtype=np.float32) + 0.5) / self.px - _EXTENT).astype(np.float32)
        self.X, self.Y = np.meshgrid(coords, coords)
        self.e = float(rng.uniform(*style.ellipticity))
        xa, ya = self.X / self.e, self.Y * self.e
        self.rho = np.sqrt(xa * xa + ya * ya)
        theta = np.arctan2(ya, xa)
        # Border radius as a function of angle: 1 + sum of random harmonics (sampled once, 2048 bins).
        irregularity = float(rng.uniform(*style.irregularity))
        ks = np.arange(1, style.harmonics + 1, dtype=np.float64)
        amps = np.abs(rng.normal(size=ks.size)) * ks**-0.9
        amps *= irregularity / amps.sum()
        phases = rng.uniform(0.0, 2.0 * np.pi, ks.size)
        self.bins = 2048
        angles = np.linspace(-np.pi, np.pi, self.bins, endpoint=False)
        border = 1.0 + (amps[:, None] * np.cos(ks[:, None] * angles[None, :] + phases[:, None])).sum(0)
        self.border = np.clip(border, 0.45, 1.4).astype(np.float32)
        idx = ((theta + np.pi) * (self.bins / (2.0 * np.pi))).astype(np.int32) % self.bins
        self.d = self.rho / self.border[idx]  # 1.0 on the border, 0 at the centre
        if style.edge_noise > 0:
            self.d += style.edge_noise * _fractal(rng, size_px, size_px, 6, 3) * np.clip(self.d, 0.0, 1.0)
        self.alpha = _smoothstep(1.0 + style.edge, 1.0 - style.edge, self.d)

    def inside(self, dmin: float = 0.0, dmax: float = 0.9) -> tuple[float, float, float]:
        """A random point with normalised radius in [dmin, dmax]: canvas x, y (pixels) and its d."""
        t = self.rng.uniform(-np.pi, np.pi)
        d = math.sqrt(self.rng.uniform(dmin * dmin, dmax * dmax))
        return (*self.at(t, d), d)

    def at(self, t: float, d: float) -> tuple[float, float]:
        """Canvas pixel coordinates of angle ``t`` at normalised radius ``d``."""
        r = d * float(self.border[int((t + np.pi) * self.bins / (2.0 * np.pi)) % self.bins])
        x, y = r * math.cos(t) * self.e, r * math.sin(t) / self.e
        return (x + _EXTENT) * self.px, (y + _EXTENT) * self.px

    def noise(self, cells: float, octaves: int = 1) -> np.ndarray:
        """Canvas-sized noise with about ``cells`` features per lesion diameter."""
        return _fractal(self.rng, self.S, self.S, cells * _EXTENT, octaves)

    def layer(self) -> np.ndarray:
        return np.zeros((self.S, self.S), np.uint8)

    def thick(self, radii: float) -> int:
        """A line thickness of ``radii`` lesion radii in canvas pixels (at least 1)."""
        return max(1, int(round(radii * self.px)))

    def base(self, color: np.ndarray, variation: float, cells: float = 2.0) -> np.ndarray:
        """A planar canvas of ``color`` with low-frequency brightness ``variation``."""
        return np.asarray(color, np.float32)[:, None, None] * (1.0 + variation * self.noise(cells, 2))[None]


def _honeycomb(ctx: _Ctx, freq: float, warp: float, width: float) -> np.ndarray:
    """A pigment-network-like mesh (0..1), ``freq`` holes per radius, domain-warped by ``warp``."""
    rng = ctx.rng
    a0 = rng.uniform(0, np.pi)
    u = ctx.X + warp * ctx.noise(3, 2)
    v = ctx.Y + warp * ctx.noise(3, 2)
    k = np.float32(2.0 * np.pi * freq)
    h = np.zeros_like(u)
    for j in range(3):
        a = a0 + j * 2.0 * np.pi / 3.0
        h += np.cos(k * (np.float32(math.cos(a)) * u + np.float32(math.sin(a)) * v))
    # h is 3 at cell centres and about -1.5 on the walls between them.
    return _smoothstep(-0.2 + width, -0.9 + width * 0.3, h)


def _dots(ctx: _Ctx, n: int, radius: tuple[float, float], dmin: float, dmax: float,
          sector: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 mask with ``n`` filled round dots; ``sector`` (start, width) clusters them in angle."""
    layer = ctx.layer()
    for _ in range(n):
        if sector is None:
            x, y, _ = ctx.inside(dmin, dmax)
        else:
            t = sector[0] + ctx.rng.uniform(0, sector[1])
            x, y = ctx.at((t + np.pi) % (2 * np.pi) - np.pi, math.sqrt(ctx.rng.uniform(dmin**2, dmax**2)))
        r = max(0.7, ctx.rng.uniform(*radius) * ctx.px)
        cv2.circle(layer, _pt(x, y), int(round(r * _ONE)), 255, -1, cv2.LINE_AA, _SHIFT)
    return layer


def _paint_mel(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    palette = [
        _jitter_color(rng, (0.30, 0.18, 0.12), 0.06),  # dark brown
        _jitter_color(rng, (0.11, 0.08, 0.08), 0.06),  # black
        _jitter_color(rng, (0.52, 0.34, 0.23), 0.06),  # light brown
        _jitter_color(rng, (0.40, 0.44, 0.54), 0.05),  # blue-grey
        _jitter_color(rng, (0.62, 0.30, 0.30), 0.05),  # red
    ]
    bias = np.array([0.7, 0.35, 0.15, -0.1, -0.6], np.float32) + rng.normal(0, 0.15, 5).astype(np.float32)
    # Asymmetric colour zones: soft argmax over noise fields, one per colour.
    fields = np.stack([ctx.noise(2.5, 2) + bias[i] for i in range(5)])
    fields -= fields.max(0)
    weights = np.exp(fields * np.float32(6.0))
    weights /= weights.sum(0)
    rgb = np.tensordot(np.stack(palette).T, weights, 1).astype(np.float32)
    rgb *= 1.0 + 0.12 * ctx.noise(10, 3)
    # Blue-white veil.
    vx, vy, _ = ctx.inside(0.0, 0.6)
    veil_r = rng.uniform(0.25, 0.5) * ctx.px
    yy, xx = np.ogrid[: ctx.S, : ctx.S]
    veil = np.exp(-((xx - vx) ** 2 + (yy - vy) ** 2) / np.float32(2 * veil_r * veil_r)).astype(np.float32)
    _blend(rgb, _jitter_color(rng, (0.56, 0.62, 0.72), 0.04), veil * np.clip(0.6 + 0.4 * ctx.noise(4), 0, 1), 0.45)
    # Atypical network over part of the lesion.
    net = _honeycomb(ctx, rng.uniform(4.0, 5.5), rng.uniform(0.08, 0.14), rng.uniform(0.0, 0.5))
    region = _smoothstep(0.0, 0.8, ctx.noise(2.0)) * _smoothstep(0.3, 0.6, ctx.d)
    _blend(rgb, (0.12, 0.08, 0.06), cv2.GaussianBlur(net * region, (0, 0), 0.01 * ctx.px + 0.3), 0.55)
    # Irregular dots and globules, clustered towards one side and the periphery.
    sector = (rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 3.5))
    dots = _dots(ctx, int(rng.integers(15, 35)), (0.015, 0.055), 0.45, 1.0, sector)
    _blend(rgb, (0.09, 0.06, 0.06), _mask_float(dots, 0.6), 0.9)
    # Regression: white scar-like area peppered with grey dots.
    if rng.random() < 0.5:
        rx, ry, _ = ctx.inside(0.0, 0.6)
        reg = ctx.layer()
        cv2.ellipse(reg, _pt(rx, ry), _pt(rng.uniform(0.12, 0.25) * ctx.px, rng.uniform(0.08, 0.2) * ctx.px),
                    rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        _blend(rgb, (0.84, 0.78, 0.79), _mask_float(reg, 0.07 * ctx.px), 0.6)
        pepper = _dots(ctx, 25, (0.006, 0.012), 0.0, 0.9)
        _blend(rgb, (0.45, 0.45, 0.50), _mask_float(pepper) * _mask_float(reg), 0.8)
    alpha = ctx.alpha.copy()
    # Streaks / pseudopods radiating past the border in one or two sectors.
    streaks = ctx.layer()
    for _ in range(int(rng.integers(1, 3))):
        t0, width = rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 1.4)
        for _ in range(int(rng.integers(5, 11))):
            t = (t0 + rng.uniform(0, width) + np.pi) % (2 * np.pi) - np.pi
            end = rng.uniform(1.05, 1.17)
            width_px = rng.uniform(0.015, 0.03)
            # Tapered: thick where it leaves the lesion, thin at its tip.
            for (d0, d1), f in zip(((0.8, 0.95), (0.95, end - 0.05), (end - 0.05, end)), (1.0, 0.7, 0.4)):
                cv2.line(streaks, _pt(*ctx.at(t, d0)), _pt(*ctx.at(t, d1)), 255, ctx.thick(width_px * f),
                         cv2.LINE_AA, _SHIFT)
    streak_mask = _mask_float(streaks, 0.01 * ctx.px + 0.3)
    _blend(rgb, (0.18, 0.11, 0.08), streak_mask, 0.85)
    np.maximum(alpha, streak_mask * 0.85, out=alpha)
    return rgb, alpha


def _paint_nv(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    color = _jitter_color(rng, (0.50, 0.33, 0.22), 0.06)
    rgb = ctx.base(color, 0.05)
    rgb *= 0.86 + 0.2 * _smoothstep(0.0, 1.0, ctx.d)  # darker centre, fading rim
    fade = _smoothstep(1.0, 0.55, ctx.d)
    pattern = rng.choice(3, p=(0.6, 0.25, 0.15))
    if pattern == 0:  # reticular: regular thin network
        net = _honeycomb(ctx, rng.uniform(4.5, 6.0), rng.uniform(0.04, 0.07), 0.0)
        _blend(rgb, color * 0.62, cv2.GaussianBlur(net, (0, 0), 0.008 * ctx.px + 0.3) * fade, 0.55)
    elif pattern == 1:  # globular: evenly spread, evenly sized globules
        layer = ctx.layer()
        step = rng.uniform(0.16, 0.22)
        r = step * rng.uniform(0.25, 0.32)
        for gy in np.arange(-1.2, 1.2, step * 0.87):
            off = step / 2 if int(round(gy / (step * 0.87))) % 2 else 0.0
            for gx in np.arange(-1.2, 1.2, step):
                x = (gx + off + rng.normal(0, step * 0.06)) * ctx.e
                y = (gy + rng.normal(0, step * 0.06)) / ctx.e
                cv2.circle(layer, _pt((x + _EXTENT) * ctx.px, (y + _EXTENT) * ctx.px),
                           int(round(r * ctx.px * _ONE)), 255, -1, cv2.LINE_AA, _SHIFT)
        _blend(rgb, color * 0.7, _mask_float(layer, 0.02 * ctx.px) * _smoothstep(1.0, 0.75, ctx.d), 0.8)
    return rgb, ctx.alpha


def _vessel(ctx: _Ctx, layer: np.ndarray, x: float, y: float, angle: float, length: float,
            thickness: float, depth: int) -> None:
    """Draw one arborizing vessel: a wiggly trunk that branches and thins (canvas pixels)."""
    rng = ctx.rng
    segments = 6
    for i in range(segments):
        angle += rng.normal(0.0, 0.3)
        nx, ny = x + math.cos(angle) * length / segments, y + math.sin(angle) * length / segments
        cv2.line(layer, _pt(x, y), _pt(nx, ny), 255, max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)
        x, y = nx, ny
        if depth > 0 and i >= 1 and rng.random() < 0.3:
            side = 1 if rng.random() < 0.5 else -1
            _vessel(ctx, layer, x, y, angle + side * rng.uniform(0.5, 1.0), length * 0.55, thickness * 0.65, depth - 1)
    if depth > 0:
        for side in (-1, 1):
            _vessel(ctx, layer, x, y, angle + side * rng.uniform(0.3, 0.7), length * 0.5, thickness * 0.6, depth - 1)


def _paint_bcc(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    rgb = ctx.base(_jitter_color(rng, (0.93, 0.74, 0.77), 0.03), 0.04)
    # Shiny white (pearly) areas.
    _blend(rgb, (0.98, 0.94, 0.95), _smoothstep(0.2, 1.2, ctx.noise(3, 2)), 0.6)
    # Blue-grey ovoid nests.
    if rng.random() < 0.6:
        nests = ctx.layer()
        for _ in range(int(rng.integers(1, 5))):
            x, y, _ = ctx.inside(0.0, 0.75)
            axes = _pt(rng.uniform(0.06, 0.15) * ctx.px, rng.uniform(0.04, 0.1) * ctx.px)
            cv2.ellipse(nests, _pt(x, y), axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        _blend(rgb, _jitter_color(rng, (0.36, 0.39, 0.50), 0.04), _mask_float(nests, 0.02 * ctx.px), 0.85)
    # Ulceration: dark red-brown crust.
    if rng.random() < 0.25:
        ulcer = _dots(ctx, 1, (0.1, 0.18), 0.0, 0.4)
        _blend(rgb, (0.42, 0.14, 0.11), _mask_float(ulcer, 0.03 * ctx.px) * _smoothstep(-0.5, 0.5, ctx.noise(6)), 0.9)
    # Arborizing vessels: bright red, sharply focused, branching.
    vessels = ctx.layer()
    for _ in range(int(rng.integers(3, 6))):
        x, y, _ = ctx.inside(0.1, 0.7)
        _vessel(ctx, vessels, x, y, rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 0.8) * ctx.px,
                rng.uniform(0.03, 0.045) * ctx.px, 2)
    _blend(rgb, _jitter_color(rng, (0.80, 0.10, 0.15), 0.04), _mask_float(vessels, 0.3) * _smoothstep(1.05, 0.8, ctx.d), 0.95)
    return rgb, ctx.alpha * np.float32(0.94)


def _paint_akiec(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    rgb = ctx.base(_jitter_color(rng, (0.84, 0.42, 0.40), 0.04), 0.07, 3.0)
    # Rough, scaly surface: strong fine-grained brightness variation.
    rgb *= 1.0 + 0.1 * ctx.noise(30, 2)
    # Dotted / glomerular vessels.
    vessels = _dots(ctx, int(rng.integers(30, 70)), (0.012, 0.025), 0.0, 0.95)
    _blend(rgb, (0.68, 0.10, 0.16), _mask_float(vessels, 0.4), 0.85)
    # White-yellow scale (keratin) patches.
    scale = _smoothstep(0.4, 1.0, ctx.noise(4, 2) + 0.5 * ctx.noise(20) + rng.uniform(-0.15, 0.15))
    _blend(rgb, _jitter_color(rng, (0.95, 0.91, 0.82), 0.02), scale, 0.75)
    # Follicular openings ("strawberry pattern").
    follicles = _dots(ctx, int(rng.integers(8, 20)), (0.02, 0.035), 0.0, 0.85)
    _blend(rgb, (0.96, 0.90, 0.84), _mask_float(follicles, 0.5), 0.7)
    return rgb, ctx.alpha * np.float32(0.92)


def _paint_bkl(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    color = _jitter_color(rng, (0.74, 0.56, 0.40), 0.04)
    rgb = ctx.base(color, 0.05)
    # Cerebriform pattern: contour bands of warped noise -> dark furrows between waxy ridges.
    field = ctx.noise(3.0, 2)
    bands = np.abs(np.sin(field * np.float32(rng.uniform(8.0, 12.0))))
    furrows = _smoothstep(0.55, 0.1, bands) * _smoothstep(-0.6, 0.4, ctx.noise(4))
    _blend(rgb, color * np.float32(0.66), cv2.GaussianBlur(furrows, (0, 0), 0.01 * ctx.px + 0.3), 0.75)
    rgb *= 1.0 + 0.06 * _smoothstep(0.6, 1.0, bands)  # waxy sheen on the ridges
    # Milia-like cysts and comedo-like openings.
    milia = _dots(ctx, int(rng.integers(2, 8)), (0.03, 0.055), 0.0, 0.85)
    _blend(rgb, (0.97, 0.95, 0.86), _mask_float(milia, 0.012 * ctx.px), 0.9)
    comedos = _dots(ctx, int(rng.integers(3, 10)), (0.025, 0.045), 0.0, 0.85)
    _blend(rgb, (0.30, 0.22, 0.15), _mask_float(comedos, 0.5), 0.85)
    return rgb, ctx.alpha


def _paint_df(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    color = _jitter_color(rng, (0.56, 0.38, 0.28), 0.05)
    rgb = ctx.base(color, 0.05)
    # Delicate peripheral network.
    net = _honeycomb(ctx, rng.uniform(3.5, 4.5), 0.04, 0.2)
    _blend(rgb, color * np.float32(0.72), net * _smoothstep(0.35, 0.6, ctx.d), 0.7)
    # Central white scar-like patch with its own irregular outline.
    cx, cy = rng.normal(0, 0.06, 2)
    r = rng.uniform(0.38, 0.55)
    ang = np.arctan2(ctx.Y - cy, ctx.X - cx)
    wobble = 1.0 + 0.15 * np.cos(3 * ang + rng.uniform(0, 6.3)) + 0.08 * np.cos(5 * ang + rng.uniform(0, 6.3))
    dist = np.hypot(ctx.X - cx, ctx.Y - cy) / (r * wobble)
    _blend(rgb, _jitter_color(rng, (0.95, 0.91, 0.89), 0.02), _smoothstep(1.1, 0.7, dist), 0.92)
    return rgb, ctx.alpha


_LACUNA_COLORS = ((0.76, 0.12, 0.18), (0.52, 0.07, 0.13), (0.48, 0.15, 0.38), (0.28, 0.12, 0.33))


def _paint_vasc(ctx: _Ctx) -> tuple[np.ndarray, np.ndarray]:
    rng = ctx.rng
    rgb = ctx.base(_jitter_color(rng, (0.82, 0.52, 0.57), 0.03), 0.04)  # pale septa
    lacunae = np.zeros((ctx.S, ctx.S, 3), np.uint8)
    cover = ctx.layer()
    weights = rng.dirichlet(np.ones(4) * 1.5)
    for _ in range(int(rng.integers(20, 34))):
        x, y, _ = ctx.inside(0.0, 0.9)
        c = _jitter_color(rng, _LACUNA_COLORS[rng.choice(4, p=weights)], 0.05)
        axes = _pt(rng.uniform(0.13, 0.26) * ctx.px, rng.uniform(0.1, 0.2) * ctx.px)
        angle = rng.uniform(0, 180)
        cv2.ellipse(lacunae, _pt(x, y), axes, angle, 0, 360, tuple(int(v * 255) for v in c), -1, cv2.LINE_AA, _SHIFT)
        cv2.ellipse(cover, _pt(x, y), axes, angle, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        # Septum: a pale rim around each lacuna, so neighbours stay separated.
        cv2.ellipse(lacunae, _pt(x, y), axes, angle, 0, 360, (0, 0, 0), ctx.thick(0.02), cv2.LINE_AA, _SHIFT)
        cv2.ellipse(cover, _pt(x, y), axes, angle, 0, 360, 0, ctx.thick(0.02), cv2.LINE_AA, _SHIFT)
    m = _mask_float(cover, 0.6)
    lac = cv2.GaussianBlur(lacunae, (0, 0), 0.6).transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255.0)
    rgb += (lac / np.maximum(m, 1e-3) - rgb) * (m * np.float32(0.95))
    return np.clip(rgb, 0.0, 1.0), ctx.alpha


_PAINTERS = {
    "MEL": _paint_mel, "NV": _paint_nv, "BCC": _paint_bcc, "AKIEC": _paint_akiec,
    "BKL": _paint_bkl, "DF": _paint_df, "VASC": _paint_vasc,
}


def _make_lesion(label: str, rng: np.random.Generator, size: tuple[int, int]) -> _Lesion:
    """Sample one lesion of class ``label`` (geometry, colours, structures, patient skin) and paint it."""
    style = _STYLES[label]
    short = min(size)
    radius_px = float(rng.uniform(*style.radius)) * short
    canvas = int(min(_MAX_CANVAS, max(48, math.ceil(2 * _EXTENT * radius_px * 1.1))))
    ctx = _Ctx(rng, style, canvas)
    rgb, alpha = _PAINTERS[label](ctx)
    rgb *= 1.0 + 0.04 * ctx.noise(25, 2)  # fine pigment granularity
    # Fade to nothing before the canvas edge, so nothing is ever cut straight.
    alpha = alpha * _smoothstep(_EXTENT * 0.98, _EXTENT * 0.9, np.maximum(np.abs(ctx.X), np.abs(ctx.Y)))
    rgb = np.clip(rgb, 0.0, 1.0) * alpha
    rgba = cv2.merge([rgb[0], rgb[1], rgb[2], alpha])  # interleaved, for warpAffine
    tone = rng.uniform(0.9, 1.04)
    redness = rng.uniform(-0.025, 0.025)
    skin = np.clip(np.asarray(_SKIN, np.float32) * np.float32(tone) + np.float32([redness, -redness, -redness * 0.5]), 0, 1)
    return _Lesion(label, rgba, radius_px, ctx.px, skin.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Photographs: skin, pose, hair, optics and lighting
# --------------------------------------------------------------------------------------------


def _hue_matrix(degrees: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue by ``degrees`` about the grey axis."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    k = 1.0 / 3.0
    q = math.sqrt(k)
    return np.array(
        [
            [c + (1 - c) * k, k * (1 - c) - q * s, k * (1 - c) + q * s],
            [k * (1 - c) + q * s, c + k * (1 - c), k * (1 - c) - q * s],
            [k * (1 - c) - q * s, k * (1 - c) + q * s, c + k * (1 - c)],
        ],
        np.float32,
    )


def _draw_hair(img: np.ndarray, rng: np.random.Generator) -> None:
    """In place: a few dark, curved, anti-aliased hair strands."""
    h, w = img.shape[1:]
    short = min(h, w)
    count = int(rng.choice([0, int(rng.integers(1, 5)), int(rng.integers(5, 16))], p=(0.35, 0.4, 0.25)))
    if count == 0:
        return
    layer = np.zeros((h, w), np.uint8)
    for _ in range(count):
        x, y = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        angle, bend = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.08)
        steps = 14
        step = rng.uniform(0.3, 1.0) * math.hypot(w, h) / steps
        points = []
        for _ in range(steps + 1):
            points.append(_pt(x, y))
            bend += rng.normal(0, 0.03)
            angle += bend
            x, y = x + math.cos(angle) * step, y + math.sin(angle) * step
        thickness = max(1, int(round(rng.uniform(0.7, 2.2) * short / 450)))
        cv2.polylines(layer, [np.array(points, np.int32)], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    color = np.float32([0.13, 0.09, 0.07]) * np.float32(rng.uniform(0.6, 1.6))
    _blend(img, color, _mask_float(layer), float(rng.uniform(0.75, 0.95)))


def _draw_bubbles(img: np.ndarray, rng: np.random.Generator) -> None:
    """In place: sometimes an air bubble or two in the immersion gel (bright rims)."""
    if rng.random() >= 0.2:
        return
    h, w = img.shape[1:]
    layer = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.01, 0.05) * min(h, w)
        center = _pt(rng.uniform(0, w), rng.uniform(0, h))
        cv2.circle(layer, center, int(round(r * _ONE)), 255, max(1, int(round(r * 0.12))), cv2.LINE_AA, _SHIFT)
    _blend(img, (1.0, 1.0, 1.0), _mask_float(layer, 0.6), 0.55)


def _render_shot(lesion: _Lesion, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Photograph ``lesion`` once: new pose, lighting, hair and noise. Returns (HxWx3 uint8 RGB,
    HxW bool lesion mask)."""
    w, h = size
    short = min(w, h)
    # Skin: patient tone with faint erythema blotches.
    img = np.empty((3, h, w), np.float32)
    blotch = 1.0 - 0.025 * _noise(rng, h, w, 5)
    img[0] = lesion.skin[0]
    np.multiply(blotch, lesion.skin[1], out=img[1])
    np.multiply(blotch, lesion.skin[2], out=img[2])
    # Pose: rotation, scale and position (the lesion stays roughly centred, as in ISIC images).
    scale = lesion.radius_px * rng.uniform(0.9, 1.1) / lesion.px_per_unit
    canvas = lesion.rgba.shape[0]
    matrix = cv2.getRotationMatrix2D((canvas / 2.0, canvas / 2.0), float(rng.uniform(0, 360)), float(scale))
    matrix[0, 2] += w / 2.0 + rng.uniform(-0.1, 0.1) * w - canvas / 2.0
    matrix[1, 2] += h / 2.0 + rng.uniform(-0.1, 0.1) * h - canvas / 2.0
    planes = cv2.split(cv2.warpAffine(lesion.rgba, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0)))
    mask = planes[3] > 0.5
    behind = 1.0 - planes[3]
    for c in range(3):
        img[c] *= behind
        img[c] += planes[c]
    _draw_hair(img, rng)
    _draw_bubbles(img, rng)
    # Skin texture (showing through the lesion too) and optics: vignetting, sometimes the dark
    # rim of the dermatoscope's round field of view. One gain map for all of it.
    gain = 1.0 + 0.045 * _noise(rng, h, w, 3) + 0.025 * _noise(rng, h, w, 40) + 0.015 * _noise(rng, h, w, 150)
    half_diag = math.hypot(w, h) / 2.0
    ox, oy = w / 2.0 + rng.normal(0, 0.03) * w, h / 2.0 + rng.normal(0, 0.03) * h
    dx = ((np.arange(w, dtype=np.float32) - ox) / half_diag) ** 2
    dy = ((np.arange(h, dtype=np.float32) - oy) / half_diag) ** 2
    r2 = dy[:, None] + dx[None, :]
    gain *= 1.0 - np.float32(rng.uniform(0.1, 0.35)) * r2
    if rng.random() < 0.3:
        rim = rng.uniform(0.8, 0.97)
        gain *= _smoothstep(rim + 0.04, rim - 0.04, np.sqrt(r2))
    img *= gain
    # Lighting: brightness, white balance and a small hue shift in one colour matrix.
    balance = np.diag(1.0 + rng.normal(0, 0.025, 3)).astype(np.float32)
    colour = np.float32(rng.uniform(0.88, 1.08)) * balance @ _hue_matrix(rng.uniform(-4, 4))
    img = np.tensordot(colour * np.float32(255.0), img, 1).astype(np.float32, copy=False)
    sigma = rng.uniform(0.3, 0.9) * short / 450
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(2.5)  # sensor noise, in 0-255 units
    for c in range(3):
        if sigma > 0.3:
            img[c] = cv2.GaussianBlur(img[c], (0, 0), sigma)
        img[c] += noise
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    out = img.astype(np.uint8)
    return cv2.merge([out[0], out[1], out[2]]), mask


def render_lesion(label: str | int, rng: np.random.Generator, size: tuple[int, int] = (600, 450)) -> np.ndarray:
    """Render one synthetic dermoscopy image of class ``label`` (name or index) at ``size`` (width, height).

    Returns an HxWx3 uint8 RGB array. The same generator state gives the same image.
    """
    return render_lesion_with_mask(label, rng, size)[0]


def render_lesion_with_mask(label: str | int, rng: np.random.Generator,
                            size: tuple[int, int] = (600, 450)) -> tuple[np.ndarray, np.ndarray]:
    """render_lesion's image and its lesion mask (HxW bool), from the same generator state."""
    width, height = _check_size(size)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= int(label) < len(CLASS_NAMES):
            raise ValueError(f"class index must be in [0, {len(CLASS_NAMES) - 1}], got {label}")
        label = CLASS_NAMES[int(label)]
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r}; valid names are {', '.join(CLASS_NAMES)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    lesion = _make_lesion(label, rng, (width, height))
    return _render_shot(lesion, rng, (width, height))


# --------------------------------------------------------------------------------------------
# Dataset plan and writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlannedLesion:
    lesion_id: str
    number: int  # seeds the lesion's geometry and colours
    label: str
    confirm_type: str
    images: tuple[int, ...]  # image numbers (ISIC_%07d) of its photographs


def _allocate_repeats(counts: Mapping[str, int], repeat_fraction: float) -> dict[str, int]:
    """Extra photographs per class (images beyond the first of their lesion), ~repeat_fraction of all."""
    # A lesion has at most MAX_SHOTS_PER_LESION photographs, so extras <= (S-1)/S of a class.
    caps = {c: (counts[c] * (MAX_SHOTS_PER_LESION - 1)) // MAX_SHOTS_PER_LESION for c in CLASS_NAMES}
    ideal = {c: repeat_fraction * counts[c] for c in CLASS_NAMES}
    extras = {c: min(caps[c], int(ideal[c])) for c in CLASS_NAMES}
    target = int(round(repeat_fraction * sum(counts.values())))
    while sum(extras.values()) < target:
        open_classes = [c for c in CLASS_NAMES if extras[c] < caps[c]]
        if not open_classes:
            break
        best = max(open_classes, key=lambda c: (ideal[c] - extras[c], -CLASS_NAMES.index(c)))
        extras[best] += 1
    return extras


def _plan(counts: Mapping[str, int], repeat_fraction: float, seed: int) -> list[_PlannedLesion]:
    """Decide lesions, their photographs and image ids. Deterministic in its arguments."""
    rng = np.random.default_rng([seed, 0])
    extras = _allocate_repeats(counts, repeat_fraction)
    lesions: list[tuple[str, int]] = []  # (label, number of photographs)
    for label in CLASS_NAMES:
        shots = [1] * (counts[label] - extras[label])
        left = extras[label]
        while left > 0:
            candidates = [i for i, s in enumerate(shots) if s < MAX_SHOTS_PER_LESION]
            i = candidates[int(rng.integers(len(candidates)))]
            add = 1 if left == 1 or shots[i] == MAX_SHOTS_PER_LESION - 1 else int(rng.integers(1, 3))
            shots[i] += add
            left -= add
        lesions.extend((label, s) for s in shots)
    lesion_order = rng.permutation(len(lesions))
    image_numbers = rng.permutation(sum(counts.values()))  # shuffled so classes interleave
    planned, cursor = [], 0
    for number, index in enumerate(lesion_order):
        label, shots = lesions[int(index)]
        images = tuple(sorted(int(n) for n in image_numbers[cursor: cursor + shots]))
        cursor += shots
        confirm = CONFIRM_TYPES[int(rng.choice(len(CONFIRM_TYPES), p=_CONFIRM_PROBS[label]))]
        if shots > 1 and label == "NV" and rng.random() < 0.5:
            confirm = "follow_up"  # serial imaging of a naevus
        planned.append(_PlannedLesion(f"HAM_{number:07d}", number, label, confirm, images))
    return planned


def _image_id(number: int) -> str:
    return f"ISIC_{number:07d}"


def _write_image(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path.name}")
    path.write_bytes(data.tobytes())


def _write_mask(path: Path, mask: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path.name}")
    path.write_bytes(data.tobytes())


def _write_csvs(paths: DatasetPaths, planned: list[_PlannedLesion]) -> None:
    rows = sorted((img, lesion) for lesion in planned for img in lesion.images)
    paths.labels_csv.parent.mkdir(parents=True, exist_ok=True)
    with paths.labels_csv.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", *CLASS_NAMES])
        for img, lesion in rows:
            writer.writerow([_image_id(img), *("1.0" if c == lesion.label else "0.0" for c in CLASS_NAMES)])
    with paths.groupings_csv.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "lesion_id", "diagnosis_confirm_type"])
        for img, lesion in rows:
            writer.writerow([_image_id(img), lesion.lesion_id, lesion.confirm_type])
    with paths.masks_csv.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "mask_path"])
        for img, _ in rows:
            writer.writerow([_image_id(img), f"{MASKS_DIRNAME}/{_mask_name(img)}"])


def _mask_name(number: int) -> str:
    return f"{_image_id(number)}_segmentation.png"


def _is_generator_output(root: Path) -> bool:
    """Whether ``root`` holds a dataset written by this module and nothing else (so replacing it loses nothing)."""
    ours = {IMAGES_DIRNAME, GROUND_TRUTH_DIRNAME, GROUPINGS_FILENAME, MASKS_DIRNAME, MASKS_FILENAME, MARKER_FILENAME}
    try:
        if not {entry.name for entry in root.iterdir()} <= ours:
            return False
        return json.loads((root / MARKER_FILENAME).read_text()).get("generator") == GENERATOR_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output path {root} exists and is not a directory")
    if root == Path(root.anchor) or root == Path.home().resolve() or Path.cwd().resolve().is_relative_to(root):
        raise ValueError(f"refusing to replace {root}: it is the filesystem root, the home directory "
                         "or contains the current directory")
    if root.is_dir() and any(root.iterdir()) and not overwrite and not _is_generator_output(root):
        raise FileExistsError(
            f"output directory {root} is not empty and is not a previous output of training.synthetic; "
            "choose another directory or pass overwrite=True (--overwrite) to replace its contents"
        )


def _install(tmp: Path, root: Path) -> None:
    """Move the finished dataset ``tmp`` to ``root``, replacing what is there; restores it on failure."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
    if not root.exists():
        os.rename(tmp, root)
        return
    backup = tmp.with_name(tmp.name + "-previous")
    os.rename(root, backup)
    try:
        os.rename(tmp, root)
    except BaseException:
        os.rename(backup, root)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_size(size: object) -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= MIN_SIDE for v in size)
    )
    if not ok:
        raise ValueError(f"size must be (width, height) with integers of at least {MIN_SIDE}, got {size!r}")
    return int(size[0]), int(size[1])


def _check_num_images(num_images: object) -> int:
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < len(CLASS_NAMES):
        raise ValueError(
            f"num_images must be an integer >= {len(CLASS_NAMES)} (one image per class), got {num_images!r}"
        )
    return int(num_images)


def _check_class_counts(class_counts: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(class_counts, Mapping):
        raise TypeError(f"class_counts must be a dict of class name -> count, got {type(class_counts).__name__}")
    unknown = [name for name in class_counts if name not in CLASS_NAMES]
    if unknown:
        raise ValueError(
            f"unknown class name(s) in class_counts: {', '.join(map(repr, unknown))}; "
            f"valid names are {', '.join(CLASS_NAMES)}"
        )
    counts = {}
    for name in CLASS_NAMES:
        value = class_counts.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"class_counts[{name!r}] must be a non-negative integer, got {value!r}")
        counts[name] = int(value)
    if sum(counts.values()) == 0:
        raise ValueError("class_counts must ask for at least one image")
    return counts


def generate_dataset(
    out_dir: str | os.PathLike[str],
    num_images: int = 140,
    size: tuple[int, int] = (600, 450),
    seed: int = 0,
    class_counts: Mapping[str, int] | None = None,
    repeat_fraction: float = 0.2,
    progress: bool = True,
    overwrite: bool = False,
) -> DatasetPaths:
    """Write a synthetic ISIC 2018 Task 3 style dataset to ``out_dir`` and return its paths.

    ``size`` is (width, height). ``class_counts`` (class name -> images; missing classes get none)
    replaces the balanced split of ``num_images``, which is then ignored. About
    ``repeat_fraction`` of the images are extra photographs (2-3 per lesion) of lesions already
    in the set. The same arguments always give byte-identical files.

    ``out_dir`` may be missing, empty or a previous output of this function (holding nothing else);
    any other non-empty directory is refused unless ``overwrite`` (which replaces all of its contents). The dataset is
    built in a temporary directory beside ``out_dir`` and renamed into place only when complete,
    so a failure leaves ``out_dir`` as it was.
    """
    width, height = _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if isinstance(repeat_fraction, bool) or not isinstance(repeat_fraction, (int, float)) \
            or not 0.0 <= repeat_fraction <= MAX_REPEAT_FRACTION:
        raise ValueError(f"repeat_fraction must be a number in [0, {MAX_REPEAT_FRACTION}], got {repeat_fraction!r}")
    counts = balanced_class_counts(_check_num_images(num_images)) if class_counts is None \
        else _check_class_counts(class_counts)
    root = Path(out_dir).expanduser().resolve()
    _check_target(root, overwrite)

    planned = _plan(counts, float(repeat_fraction), seed)
    total = sum(counts.values())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        paths = DatasetPaths.under(tmp)
        paths.images_dir.mkdir()
        paths.masks_dir.mkdir()
        with tqdm(total=total, desc="synthetic images", unit="img", disable=not progress) as bar:
            for lesion in planned:
                model = _make_lesion(lesion.label, np.random.default_rng([seed, 1, lesion.number]), (width, height))
                for number in lesion.images:
                    rgb, mask = _render_shot(model, np.random.default_rng([seed, 2, number]), (width, height))
                    _write_image(paths.images_dir / f"{_image_id(number)}.jpg", rgb)
                    _write_mask(paths.masks_dir / _mask_name(number), mask)
                    bar.update(1)
        _write_csvs(paths, planned)
        marker = {
            "generator": GENERATOR_NAME,
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "size": [width, height],
            "class_counts": counts,
            "repeat_fraction": float(repeat_fraction),
            "num_images": total,
            "num_lesions": len(planned),
        }
        (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetPaths.under(root)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 600x450, got {text!r}") from None
    if width < MIN_SIDE or height < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"width and height must be at least {MIN_SIDE}, got {text!r}")
    return width, height


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m training.synthetic"),
        description=(
            "Write a deterministic synthetic dermoscopy dataset in the ISIC 2018 Task 3 layout: "
            f"OUT/{IMAGES_DIRNAME}/ISIC_NNNNNNN.jpg, "
            f"OUT/{GROUND_TRUTH_DIRNAME}/{LABELS_FILENAME} (one-hot labels) and "
            f"OUT/{GROUPINGS_FILENAME} (lesion ids; some lesions are photographed 2-3 times). "
            f"Classes: {', '.join(CLASS_NAMES)}, told apart by colour, size, border and structures."
        ),
        epilog="The same arguments always produce byte-identical files.",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output directory; must be missing, empty or a previous output of this tool "
                             "(see --overwrite)")
    parser.add_argument("--num-images", type=int, default=140, metavar="N",
                        help="number of images (default: 140; at least 7 balanced, 14 with --imbalance ham10000)")
    parser.add_argument("--size", type=_parse_size, default=(600, 450), metavar="WxH",
                        help=f"image width x height in pixels, each at least {MIN_SIDE} (default: 600x450, "
                             "the HAM10000 size)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed (non-negative); every image derives from it (default: 0)")
    parser.add_argument("--imbalance", choices=("balanced", "ham10000"), default="balanced",
                        help="class distribution: 'balanced' splits N evenly (remainder to the first classes); "
                             "'ham10000' follows HAM10000 (NV 67%%, MEL 11%%, BKL 11%%, BCC 5%%, AKIEC 3%%, "
                             f"VASC 1.4%%, DF 1.1%%) with at least {HAM10000_MIN_PER_CLASS} per class "
                             "(default: balanced)")
    parser.add_argument("--repeat-fraction", type=float, default=0.2, metavar="F",
                        help="about this fraction of images are extra photographs (2-3 per lesion) of a lesion "
                             f"already in the set, in [0, {MAX_REPEAT_FRACTION}] (default: 0.2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR even if it is a non-empty directory not written by this tool "
                             "(everything in it is deleted)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.imbalance == "ham10000":
            counts = ham10000_class_counts(args.num_images)
        else:
            counts = balanced_class_counts(args.num_images)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    try:
        paths = generate_dataset(
            args.out, size=args.size, seed=args.seed, class_counts=counts,
            repeat_fraction=args.repeat_fraction, progress=not args.no_progress, overwrite=args.overwrite,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    marker = json.loads((paths.root / MARKER_FILENAME).read_text())
    per_class = " ".join(f"{name}={counts[name]}" for name in CLASS_NAMES)
    print(
        f"wrote {sum(counts.values())} images ({args.size[0]}x{args.size[1]}, seed {args.seed}, "
        f"{marker['num_lesions']} lesions) to {paths.root} in {elapsed:.1f}s: {per_class}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
