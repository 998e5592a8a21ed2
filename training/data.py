"""ISIC 2018 Task 3 loading, stratified splitting and the training/eval dataset.

Expected layout (what the official download and ``training.synthetic`` both produce)::

    DIR/ISIC2018_Task3_Training_Input/<image>.jpg
    DIR/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv

The CSV header is ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` (``lesionserve.spec.CLASS_NAMES`` order)
and each row is one-hot (``1.0``/``0.0``).

The eval transform is exactly ``preprocess_rgb(decode_image(file_bytes), size)``, the function the
serving pipeline uses, so validation numbers are measured on the same tensors the server sees.
Training augmentation works on the resized uint8 image and then applies the same ``normalize``.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lesionserve.preprocessing import ImageDecodeError, decode_image, normalize, preprocess_rgb, resize
from lesionserve.spec import CLASS_NAMES

#: Image file extensions tried, in order, for an id listed in the CSV (ISIC ships ``.jpg``).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
EXPECTED_HEADER: tuple[str, ...] = ("image", *CLASS_NAMES)


class DatasetError(ValueError):
    """The dataset directory does not have the expected ISIC layout or content. The message says why."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file and its class index into ``CLASS_NAMES``."""

    path: Path
    label: int

    @property
    def image_id(self) -> str:
        return self.path.stem


# --------------------------------------------------------------------------------------------- loading


def _single_dir(root: Path, suffix: str, example: str) -> Path:
    matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith(suffix))
    if not matches:
        raise DatasetError(f"{root}: no folder ending in '{suffix}' (expected e.g. {root / example})")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DatasetError(f"{root}: several folders end in '{suffix}' ({names}); expected exactly one")
    return matches[0]


def _find_layout(root: Path) -> tuple[Path, Path]:
    """Return (input image folder, ground-truth CSV) under ``root``."""
    truth_dir = _single_dir(root, "_GroundTruth", "ISIC2018_Task3_Training_GroundTruth/")
    # Prefer the Input folder with the same prefix as the GroundTruth folder.
    paired = root / (truth_dir.name[: -len("_GroundTruth")] + "_Input")
    input_dir = paired if paired.is_dir() else _single_dir(root, "_Input", "ISIC2018_Task3_Training_Input/")

    named = truth_dir / f"{truth_dir.name}.csv"
    if named.is_file():
        return input_dir, named
    csvs = sorted(p for p in truth_dir.glob("*.csv") if p.is_file())
    if not csvs:
        raise DatasetError(f"{truth_dir}: no ground-truth CSV (expected {named})")
    if len(csvs) > 1:
        names = ", ".join(p.name for p in csvs)
        raise DatasetError(f"{truth_dir}: several CSV files ({names}); expected {named.name}")
    return input_dir, csvs[0]


def _label_from_row(values: Sequence[str], image: str, line: int, csv_path: Path) -> int:
    where = f"{csv_path.name} line {line} (image {image!r})"
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise DatasetError(f"{where}: class values must be numbers, got {list(values)}") from None
    ones = [i for i, v in enumerate(numbers) if v == 1.0]
    others = [v for v in numbers if v not in (0.0, 1.0)]
    if len(ones) != 1 or others:
        raise DatasetError(
            f"{where}: row is not one-hot (exactly one 1.0 and the rest 0.0 expected), got {list(values)}"
        )
    return ones[0]


def _image_file(input_dir: Path, image: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        candidate = input_dir / f"{image}{ext}"
        if candidate.is_file():
            return candidate
    return None


def load_isic_dir(root: str | Path) -> list[Sample]:
    """Read an ISIC 2018 Task 3 style directory into samples, in CSV order.

    Raises FileNotFoundError if ``root`` is missing and DatasetError (a ValueError) naming the
    problem for a missing folder or CSV, a wrong header, a row that is not one-hot, a duplicated
    image id or an image listed in the CSV whose file is absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    input_dir, csv_path = _find_layout(root)

    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM
        rows = list(csv.reader(handle))
    if not rows:
        raise DatasetError(f"{csv_path}: file is empty (expected header {','.join(EXPECTED_HEADER)})")
    header = tuple(cell.strip() for cell in rows[0])
    if header != EXPECTED_HEADER:
        raise DatasetError(
            f"{csv_path}: header is {','.join(header)!r}; expected {','.join(EXPECTED_HEADER)!r}"
        )

    samples: list[Sample] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line (e.g. trailing newline)
        row = [cell.strip() for cell in row]
        image = row[0]
        if len(row) != len(EXPECTED_HEADER):
            raise DatasetError(
                f"{csv_path.name} line {line} (image {image!r}): {len(row)} columns, expected {len(EXPECTED_HEADER)}"
            )
        if not image:
            raise DatasetError(f"{csv_path.name} line {line}: empty image id")
        if image in seen:
            raise DatasetError(f"{csv_path.name} line {line}: image {image!r} already listed on line {seen[image]}")
        seen[image] = line
        label = _label_from_row(row[1:], image, line, csv_path)
        path = _image_file(input_dir, image)
        if path is None:
            missing.append(image)
            continue
        samples.append(Sample(path=path, label=label))

    if missing:
        shown = ", ".join(f"{input_dir / m}.jpg" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{len(missing)} image(s) listed in {csv_path.name} not found: {shown}{more}")
    if not samples:
        raise DatasetError(f"{csv_path}: no samples (header only)")
    return samples


# -------------------------------------------------------------------------------------------- splitting


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Number of samples per class name (every class listed, zeros included)."""
    counts = np.bincount([s.label for s in samples], minlength=len(CLASS_NAMES))
    return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val) per class, deterministically for a given ``seed``.

    Each class contributes ``round(n * val_fraction)`` samples to val, clamped so that a class with
    at least 2 samples has at least 1 in val and at least 1 in train; a class with a single sample
    stays in train. The result does not depend on the input order; both lists keep it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)

    val_set: set[Sample] = set()
    for label, members in by_class.items():
        members = sorted(members, key=lambda s: str(s.path))
        n = len(members)
        if n < 2:
            continue
        n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
        order = np.random.default_rng([seed, label]).permutation(n)
        val_set.update(members[i] for i in order[:n_val])

    train = [s for s in samples if s not in val_set]
    val = [s for s in samples if s in val_set]
    return train, val


# -------------------------------------------------------------------------------------------- datasets


def augment_rgb(rgb: np.ndarray, rng: np.random.Generator, jitter: float = 0.1) -> np.ndarray:
    """Simple geometric + photometric augmentation of a square HxWx3 uint8 image.

    Random horizontal/vertical flips, a random multiple of 90 degrees, and brightness/contrast
    jitter of up to ``jitter`` (fraction). Returns a new contiguous uint8 array.
    """
    out = rgb
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1, :]
    out = np.rot90(out, k=int(rng.integers(4)), axes=(0, 1))
    if jitter > 0:
        contrast = 1.0 + rng.uniform(-jitter, jitter)
        brightness = rng.uniform(-jitter, jitter) * 255.0
        as_float = out.astype(np.float32)
        mean = as_float.mean()
        as_float = (as_float - mean) * contrast + mean + brightness
        out = np.clip(np.rint(as_float), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


class LesionDataset(Dataset):
    """Samples -> (3 x size x size float32 tensor, label).

    ``train=False``: exactly ``preprocess_rgb(decode_image(bytes), size)`` (the serving transform).
    ``train=True``: decode, resize, ``augment_rgb``, normalize. The augmentation of item ``i`` is
    seeded by (seed, epoch, i), so it is reproducible whatever the loading order or worker count;
    call ``set_epoch`` each epoch to draw fresh augmentations.
    """

    def __init__(self, samples: Sequence[Sample], size: int, train: bool, seed: int = 0):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.samples = list(samples)
        self.size = int(size)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load_rgb(self, index: int) -> np.ndarray:
        path = self.samples[index].path
        try:
            return decode_image(path.read_bytes())
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{path}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        rgb = self.load_rgb(index)
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            array = normalize(augment_rgb(resize(rgb, self.size), rng))
        else:
            array = preprocess_rgb(rgb, self.size)
        return torch.from_numpy(array), sample.label


def validation_samples(config: Mapping[str, Any]) -> list[Sample]:
    """The validation split a training run used, rebuilt from its resolved ``config.json``."""
    samples = load_isic_dir(config["data"])
    return stratified_split(samples, config["val_fraction"], config["seed"])[1]
