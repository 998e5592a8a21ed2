"""Dataset loading (ISIC 2018 Task 3, HAM10000 metadata, class folders), stratified splitting and
the training/eval dataset.

``load_dataset(root_or_csv, layout="auto")`` reads any of these layouts into ``Sample`` lists:

``isic2018`` (what the official download and ``training.synthetic`` produce)::

    DIR/ISIC2018_Task3_Training_Input/<image>.jpg
    DIR/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    DIR/ISIC2018_Task3_Training_LesionGroupings.csv        (optional: image,lesion_id,...)
    DIR/ISIC2018_Task3_{Validation,Test}_Input/ + ..._GroundTruth/  (official held-out splits)

  The CSV header is ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` (``lesionserve.spec.CLASS_NAMES`` order)
  and each row is one-hot (``1.0``/``0.0``).

``ham10000``: a metadata CSV with ``image_id`` (or ``image``), ``dx`` (akiec, bcc, bkl, df, mel, nv,
  vasc; any case) and ``lesion_id`` columns; images from a ``path`` column (relative to the CSV's
  folder) or found as ``<image>.jpg`` in ``image_dirs`` / the CSV's folder tree.

``folders``: ``DIR/<CLASS>/*.jpg|jpeg|png`` with class folder names matched case-insensitively.

The eval transform is exactly ``preprocess_rgb(decode_image(file_bytes), size)``, the function the
serving pipeline uses, so validation numbers are measured on the same tensors the server sees.
Training augmentation works on the resized uint8 image and then applies the same ``normalize``.
"""
from __future__ import annotations

import csv
import os
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


#: Layout names accepted by ``load_dataset`` ("auto" detects one of the others).
LAYOUTS: tuple[str, ...] = ("auto", "isic2018", "ham10000", "folders")
#: Official ISIC 2018 Task 3 splits and the folder-name word each uses.
ISIC_SPLITS: dict[str, str] = {"training": "Training", "validation": "Validation", "test": "Test"}
GROUPINGS_FILENAME = "ISIC2018_Task3_Training_LesionGroupings.csv"
#: HAM10000 ``dx`` codes -> class names (compared case-insensitively).
HAM10000_DX: dict[str, str] = {
    "akiec": "AKIEC", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC",
}


class DatasetError(ValueError):
    """The dataset does not have the expected layout or content. The message says why and where."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file, its class index into ``CLASS_NAMES`` and, when known, its lesion.

    ``lesion_id`` groups photographs of the same lesion (HAM10000 / ISIC lesion groupings); splits
    must keep a lesion on one side. ``None`` means unknown: the image is its own group.
    """

    path: Path
    label: int
    lesion_id: str | None = None

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


def _truth_csv(truth_dir: Path) -> Path:
    named = truth_dir / f"{truth_dir.name}.csv"
    if named.is_file():
        return named
    csvs = sorted(p for p in truth_dir.glob("*.csv") if p.is_file())
    if not csvs:
        raise DatasetError(f"{truth_dir}: no ground-truth CSV (expected {named})")
    if len(csvs) > 1:
        names = ", ".join(p.name for p in csvs)
        raise DatasetError(f"{truth_dir}: several CSV files ({names}); expected {named.name}")
    return csvs[0]


def _check_isic_split(split: str) -> str:
    if split not in ISIC_SPLITS:
        raise ValueError(f"split must be one of {', '.join(ISIC_SPLITS)}, got {split!r}")
    return split


def _find_layout(root: Path, split: str | None = None) -> tuple[Path, Path]:
    """Return (input image folder, ground-truth CSV) under ``root``.

    ``split=None``: the only ``*_GroundTruth`` folder (or the official Training one when the
    official splits sit side by side). A named split requires the official folder names.
    """
    if split is not None:
        word = ISIC_SPLITS[_check_isic_split(split)]
        truth_dir = root / f"ISIC2018_Task3_{word}_GroundTruth"
        input_dir = root / f"ISIC2018_Task3_{word}_Input"
        for folder in (input_dir, truth_dir):
            if not folder.is_dir():
                raise DatasetError(f"{root}: no {split} split folder {folder.name}/ (expected {folder})")
        return input_dir, _truth_csv(truth_dir)

    truth_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_GroundTruth"))
    official_training = root / "ISIC2018_Task3_Training_GroundTruth"
    if len(truth_dirs) > 1 and official_training in truth_dirs:
        truth_dir = official_training  # the official download unpacked in one folder: default to training
    else:
        truth_dir = _single_dir(root, "_GroundTruth", "ISIC2018_Task3_Training_GroundTruth/")
    # Prefer the Input folder with the same prefix as the GroundTruth folder.
    paired = root / (truth_dir.name[: -len("_GroundTruth")] + "_Input")
    input_dir = paired if paired.is_dir() else _single_dir(root, "_Input", "ISIC2018_Task3_Training_Input/")
    return input_dir, _truth_csv(truth_dir)


def _read_csv_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line number, row dict of stripped strings)]) of a CSV with a header; blank lines dropped."""
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DatasetError(f"{csv_path}: file is empty (a header line is expected)")
        header = [name.strip() for name in reader.fieldnames]
        reader.fieldnames = header
        rows = []
        for row in reader:
            cleaned = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if any(cleaned.values()):
                rows.append((reader.line_num, cleaned))
    return header, rows


def load_lesion_groupings(csv_path: str | Path) -> dict[str, str]:
    """``image -> lesion_id`` from an ISIC lesion-groupings CSV (header ``image,lesion_id,...``).

    Rows with an empty lesion_id are skipped (the image stays its own group).
    """
    csv_path = Path(csv_path)
    header, rows = _read_csv_rows(csv_path)
    missing = [c for c in ("image", "lesion_id") if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}")
    groups: dict[str, str] = {}
    for line, row in rows:
        image, lesion = row["image"], row["lesion_id"]
        if image in groups and groups[image] != lesion:
            raise DatasetError(
                f"{csv_path.name} line {line}: image {image!r} listed again with lesion "
                f"{lesion!r} (earlier {groups[image]!r})"
            )
        if lesion:
            groups[image] = lesion
    return groups


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


def load_isic_dir(root: str | Path, split: str | None = None) -> list[Sample]:
    """Read an ISIC 2018 Task 3 style directory into samples, in CSV order.

    ``split`` ("training", "validation" or "test") picks an official split folder pair; ``None``
    takes the only ``*_GroundTruth`` folder (the Training one if the official splits sit side by
    side). For the training split, ``ISIC2018_Task3_Training_LesionGroupings.csv`` in ``root``
    (when present) fills in ``Sample.lesion_id``.

    Raises FileNotFoundError if ``root`` is missing and DatasetError (a ValueError) naming the
    problem for a missing folder or CSV, a wrong header, a row that is not one-hot, a duplicated
    image id or an image listed in the CSV whose file is absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    input_dir, csv_path = _find_layout(root, split)
    groupings_path = root / GROUPINGS_FILENAME
    # Lesion groupings are published for the training images only.
    groupings = load_lesion_groupings(groupings_path) if groupings_path.is_file() and split in (None, "training") else {}

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
        samples.append(Sample(path=path, label=label, lesion_id=groupings.get(image)))

    if missing:
        shown = ", ".join(f"{input_dir / m}.jpg" for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DatasetError(f"{len(missing)} image(s) listed in {csv_path.name} not found: {shown}{more}")
    if not samples:
        raise DatasetError(f"{csv_path}: no samples (header only)")
    return samples


def _format_missing(missing: Sequence[str], where: str) -> str:
    shown = ", ".join(missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{len(missing)} image(s) listed in {where} not found: {shown}{more}"


def _dx_to_label(dx: str, where: str) -> int:
    name = HAM10000_DX.get(dx.strip().lower())
    if name is None:
        valid = ", ".join(HAM10000_DX)
        raise DatasetError(f"{where}: unknown dx {dx!r}; valid values (any case) are {valid}")
    return CLASS_NAMES.index(name)


class _ImageIndex:
    """Finds ``<image id>.<ext>`` in folders, built once on first use (walking a tree is slow)."""

    def __init__(self, folders: Sequence[Path], recursive: bool):
        self.folders = list(folders)
        self.recursive = recursive
        self._index: dict[str, list[Path]] | None = None

    def _build(self) -> dict[str, list[Path]]:
        index: dict[str, list[Path]] = defaultdict(list)
        for folder in self.folders:
            if not folder.is_dir():
                raise DatasetError(f"image folder not found: {folder}")
            walker = os.walk(folder) if self.recursive else [(str(folder), [], os.listdir(folder))]
            for dirpath, dirnames, filenames in walker:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # deterministic, skip hidden
                for name in sorted(filenames):
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                        index[stem].append(Path(dirpath) / name)
        return index

    def find(self, image: str, where: str) -> Path | None:
        if self._index is None:
            self._index = self._build()
        found = self._index.get(image, [])
        if not found:
            return None
        if self.recursive:
            folders = sorted({p.parent for p in found})
            if len(folders) > 1:
                listed = ", ".join(str(p) for p in found)
                raise DatasetError(f"{where}: image {image!r} found in several folders ({listed}); "
                                   "pass image_dirs to choose")
        # Explicit folders: the first folder listed wins; within one folder, IMAGE_EXTENSIONS order.
        rank = {folder: i for i, folder in enumerate(self.folders)}
        return min(found, key=lambda p: (rank.get(p.parent, 0), IMAGE_EXTENSIONS.index(p.suffix.lower())))


def load_ham10000(csv_path: str | Path, image_dirs: Sequence[str | Path] | None = None) -> list[Sample]:
    """Read a HAM10000-style metadata CSV into samples, in CSV order.

    Columns: ``image_id`` or ``image``; ``dx`` (akiec, bcc, bkl, df, mel, nv, vasc in any case);
    ``lesion_id`` (optional; empty cells mean unknown); ``path`` (optional, relative to the CSV's
    folder or absolute). Rows without a path are found as ``<image>.jpg`` (or .jpeg/.png) in
    ``image_dirs`` (each searched without subfolders; the first one holding the image wins) or,
    without ``image_dirs``, anywhere under the CSV's folder.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {csv_path}")
    header, rows = _read_csv_rows(csv_path)
    id_column = next((c for c in ("image_id", "image") if c in header), None)
    if id_column is None or "dx" not in header:
        raise DatasetError(
            f"{csv_path}: header {','.join(header)!r} needs an 'image_id' (or 'image') column and a 'dx' column"
        )
    base = csv_path.parent
    if image_dirs:
        index = _ImageIndex([Path(d) for d in image_dirs], recursive=False)
    else:
        index = _ImageIndex([base], recursive=True)

    samples: list[Sample] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for line, row in rows:
        image = row.get(id_column, "")
        where = f"{csv_path.name} line {line}"
        if not image:
            raise DatasetError(f"{where}: empty {id_column}")
        where = f"{where} (image {image!r})"
        if image in seen:
            raise DatasetError(f"{csv_path.name} line {line}: image {image!r} already listed on line {seen[image]}")
        seen[image] = line
        label = _dx_to_label(row.get("dx", ""), where)
        relative = row.get("path", "")
        if relative:
            path = Path(relative) if Path(relative).is_absolute() else base / relative
            if not path.is_file():
                missing.append(str(path))
                continue
        else:
            found = index.find(image, where)
            if found is None:
                searched = ", ".join(str(f) for f in index.folders)
                missing.append(f"{image}.jpg (searched {searched}{'' if image_dirs else ' and subfolders'})")
                continue
            path = found
        samples.append(Sample(path=path, label=label, lesion_id=row.get("lesion_id") or None))
    if missing:
        raise DatasetError(_format_missing(missing, str(csv_path)))
    if not samples:
        raise DatasetError(f"{csv_path}: no samples (header only)")
    return samples


def load_class_folders(root: str | Path) -> list[Sample]:
    """Read ``root/<CLASS>/*.jpg|jpeg|png`` (class folder names in any case), sorted by folder then file.

    Hidden entries and loose files in ``root`` are ignored; an unknown folder name is an error.
    Image ids (file names without extension) must be unique across classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    by_lower = {name.lower(): i for i, name in enumerate(CLASS_NAMES)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name.lower() not in by_lower]
    if unknown:
        raise DatasetError(
            f"{root}: unknown class folder(s) {', '.join(map(repr, unknown))}; valid names (any case) are "
            f"{', '.join(CLASS_NAMES)}"
        )
    claimed: dict[int, Path] = {}
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    for folder in folders:
        label = by_lower[folder.name.lower()]
        if label in claimed:
            raise DatasetError(f"{root}: folders {claimed[label].name!r} and {folder.name!r} both name class "
                               f"{CLASS_NAMES[label]}")
        claimed[label] = folder
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.stem in seen:
                raise DatasetError(f"duplicate image id {path.stem!r}: {seen[path.stem]} and {path}")
            seen[path.stem] = path
            samples.append(Sample(path=path, label=label))
    if not samples:
        raise DatasetError(f"{root}: no .jpg/.jpeg/.png images in the class folders "
                           f"({', '.join(p.name for p in folders) or 'none found'})")
    return samples


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [h.strip() for h in next(csv.reader(handle), [])]


def _metadata_csvs(folder: Path) -> list[Path]:
    """CSV files directly in ``folder`` whose header has a ``dx`` column (HAM10000 metadata)."""
    return [p for p in sorted(folder.glob("*.csv")) if p.is_file() and "dx" in _csv_header(p)]


def detect_layout(root_or_csv: str | Path) -> str:
    """Which layout ``root_or_csv`` holds: "isic2018", "ham10000" or "folders" (DatasetError if none)."""
    path = Path(root_or_csv)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "ham10000"
        raise DatasetError(f"{path}: a file that is not a .csv; give a dataset folder or a metadata CSV")
    children = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if any(p.name.endswith("_GroundTruth") for p in children):
        return "isic2018"
    if _metadata_csvs(path):
        return "ham10000"
    if any(p.name.lower() in {c.lower() for c in CLASS_NAMES} for p in children):
        return "folders"
    raise DatasetError(
        f"{path}: cannot tell the dataset layout. Expected one of: isic2018 "
        "(ISIC2018_Task3_Training_Input/ + ISIC2018_Task3_Training_GroundTruth/), ham10000 (a metadata "
        f"CSV with image_id/image, dx, lesion_id columns), folders (one folder per class: {', '.join(CLASS_NAMES)})"
    )


def load_dataset(
    root_or_csv: str | Path,
    layout: str = "auto",
    split: str | None = None,
    image_dirs: Sequence[str | Path] | None = None,
) -> list[Sample]:
    """Load a labelled dataset in any supported layout (see the module docstring).

    ``layout``: "auto" (detected by ``detect_layout``), "isic2018", "ham10000" or "folders".
    ``split`` (isic2018 only): "training", "validation" or "test" official folders.
    ``image_dirs`` (ham10000 only): folders holding the images of rows without a ``path``.
    A ham10000 folder (rather than a CSV) must hold exactly one CSV with a ``dx`` column.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    path = Path(root_or_csv)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if layout == "auto":
        layout = detect_layout(path)
    if split is not None and layout != "isic2018":
        raise ValueError(f"split= applies to the isic2018 layout only (got layout {layout!r})")
    if image_dirs and layout != "ham10000":
        raise ValueError(f"image_dirs= applies to the ham10000 layout only (got layout {layout!r})")
    if layout == "ham10000":
        if path.is_dir():
            csvs = _metadata_csvs(path)
            if len(csvs) != 1:
                found = ", ".join(p.name for p in csvs) or "none"
                raise DatasetError(f"{path}: expected exactly one metadata CSV with a 'dx' column, found {found}; "
                                   "give the CSV path instead")
            path = csvs[0]
        return load_ham10000(path, image_dirs=image_dirs)
    if not path.is_dir():
        raise DatasetError(f"{path}: the {layout} layout needs a folder, got a file")
    if layout == "isic2018":
        return load_isic_dir(path, split=split)
    return load_class_folders(path)


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
    """The validation split a training run used, rebuilt from its resolved ``config.json``.

    With a ``splits`` entry (a split CSV written by ``training.splits``) its ``val`` rows;
    otherwise the per-image ``stratified_split`` of ``data`` (loaded with ``layout``, default auto)
    by ``val_fraction`` and ``seed``, as the first training script did.
    """
    if config.get("splits"):
        from lesionserve.training.splits import read_splits  # splits imports this module

        return read_splits(config["splits"])["val"]
    samples = load_dataset(config["data"], layout=config.get("layout") or "auto")
    return stratified_split(samples, config["val_fraction"], config["seed"])[1]
