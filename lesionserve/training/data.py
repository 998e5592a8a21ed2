"""Dataset loading (ISIC 2018 Task 3, HAM10000 metadata, class folders) and the eval dataset.

``load_dataset(root_or_csv, layout="auto")`` reads any of these layouts into ``Sample`` lists:

``isic2018`` (what the official download and ``training.synthetic`` produce)::

    DIR/ISIC2018_Task3_Training_Input/<image>.jpg
    DIR/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    DIR/ISIC2018_Task3_Training_LesionGroupings.csv        (optional: image,lesion_id,...)
    DIR/ISIC2018_Task3_{Validation,Test}_Input/ + ..._GroundTruth/  (official held-out splits)

  A ground-truth CSV may also sit loose beside its images (``DIR/ISIC2018_Task3_Test_GroundTruth.csv``
  + ``DIR/ISIC2018_Task3_Test_Input/``). The CSV header is ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``
  (``lesionserve.spec.CLASS_NAMES`` order) and each row is one-hot (``1.0``/``0.0``).

``ham10000``: a metadata CSV with ``image_id`` (or ``image``), ``dx`` (akiec, bcc, bkl, df, mel, nv,
  vasc; any case) and ``lesion_id`` columns; images from a ``path`` column (relative to the CSV's
  folder) or found as ``<image>.jpg`` in ``image_dirs`` / the CSV's folder tree.

``folders``: ``DIR/<CLASS>/*.jpg|jpeg|png`` with class folder names matched case-insensitively.

The eval transform is exactly ``preprocess_rgb(decode_image(file_bytes), size)``, the function the
serving pipeline uses, so validation numbers are measured on the same tensors the server sees.
Splits are made by ``training.splits`` (lesion-grouped); training augmentation is ``training.augment``.
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

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.preprocessing import ImageDecodeError, decode_image, preprocess_rgb
from lesionserve.spec import CLASS_NAMES

#: Image file extensions tried, in order, for an id listed in the CSV (ISIC ships ``.jpg``).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
EXPECTED_HEADER: tuple[str, ...] = ("image", *CLASS_NAMES)


#: Layout names accepted by ``load_dataset`` ("auto" detects one of the others).
LAYOUTS: tuple[str, ...] = ("auto", "isic2018", "ham10000", "folders")
#: Official ISIC 2018 Task 3 splits and the folder-name word each uses.
ISIC_SPLITS: dict[str, str] = {"training": "Training", "validation": "Validation", "test": "Test"}
GROUPINGS_FILENAME = "ISIC2018_Task3_Training_LesionGroupings.csv"
#: Prefixes of ISIC ground truths that are masks, not class labels (Task 1 lesions, Task 2 attributes).
MASK_TASKS: tuple[str, ...] = ("ISIC2018_Task1_", "ISIC2018_Task2_")
#: HAM10000 ``dx`` codes -> class names (compared case-insensitively).
HAM10000_DX: dict[str, str] = {
    "akiec": "AKIEC", "bcc": "BCC", "bkl": "BKL", "df": "DF", "mel": "MEL", "nv": "NV", "vasc": "VASC",
}


#: ``Sample.label`` of an image without a diagnosis (ISIC 2018 Task 1's segmentation images):
#: split files write it as an empty label; splits stratify such images as one more group.
UNKNOWN_LABEL = -1


class DatasetError(ValueError):
    """The dataset does not have the expected layout or content. The message says why and where."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: its file, its class index into ``CLASS_NAMES`` and, when known, its lesion.

    ``label`` is UNKNOWN_LABEL for an image without a diagnosis (segmentation-only sets).
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


def isic_ground_truths(root: str | Path) -> dict[str, Path]:
    """``prefix -> ground truth`` for each ISIC-style set in ``root``, sorted by prefix.

    A set is a ``<prefix>_GroundTruth/`` folder (as the official zips unpack) or a loose
    ``<prefix>_GroundTruth.csv`` whose header has no ``dx`` column (one with ``dx`` is HAM10000
    metadata); its images are in ``<prefix>_Input/``. Raises DatasetError when one prefix has both.
    ISIC 2018 Task 1 and 2 ground truths (lesion and attribute masks, PNGs) are not class labels
    and are passed over, so masks can sit beside the images they belong to.
    """
    root = Path(root)
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.endswith("_GroundTruth"):
            prefix = entry.name[: -len("_GroundTruth")]
        elif entry.is_file() and entry.name.endswith("_GroundTruth.csv") and "dx" not in _csv_header(entry):
            prefix = entry.name[: -len("_GroundTruth.csv")]
        else:
            continue
        if prefix.startswith(MASK_TASKS):
            continue
        if prefix in found:
            raise DatasetError(f"{root}: both {found[prefix].name} and {entry.name} hold the {prefix} ground truth; "
                               "keep one")
        found[prefix] = entry
    return found


def _truth_file(entry: Path) -> Path:
    return entry if entry.is_file() else _truth_csv(entry)


def _find_layout(root: Path, split: str | None = None) -> tuple[Path, Path]:
    """Return (input image folder, ground-truth CSV) under ``root``.

    ``split=None``: the only ground-truth set (or the official Training one when the official
    splits sit side by side). A named split requires the official folder names.
    """
    truths = isic_ground_truths(root)
    if split is not None:
        word = ISIC_SPLITS[_check_isic_split(split)]
        prefix = f"ISIC2018_Task3_{word}"
        input_dir = root / f"{prefix}_Input"
        if not input_dir.is_dir():
            raise DatasetError(f"{root}: no {split} split folder {input_dir.name}/ (expected {input_dir})")
        if prefix not in truths:
            raise DatasetError(f"{root}: no {split} split folder {prefix}_GroundTruth/ (expected "
                               f"{root / (prefix + '_GroundTruth')}/ or {root / (prefix + '_GroundTruth.csv')})")
        return input_dir, _truth_file(truths[prefix])

    official_training = "ISIC2018_Task3_Training"
    if not truths:
        raise DatasetError(f"{root}: no folder ending in '_GroundTruth' and no file ending in '_GroundTruth.csv' "
                           f"(expected e.g. {root / 'ISIC2018_Task3_Training_GroundTruth'}/)")
    if len(truths) == 1:
        prefix = next(iter(truths))
    elif official_training in truths:
        prefix = official_training  # the official download unpacked in one folder: default to training
    else:
        names = ", ".join(entry.name for entry in truths.values())
        raise DatasetError(f"{root}: several ground-truth sets ({names}); expected exactly one")
    # Prefer the Input folder with the same prefix as the ground truth.
    paired = root / f"{prefix}_Input"
    input_dir = paired if paired.is_dir() else _single_dir(root, "_Input", "ISIC2018_Task3_Training_Input/")
    return input_dir, _truth_file(truths[prefix])


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

    ``split`` ("training", "validation" or "test") picks an official split; ``None`` takes the only
    ground-truth set (``isic_ground_truths``; the Training one if the official splits sit side by
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


#: What ``detect_layout`` looks for, per layout (also the text of its error).
LAYOUT_SIGNS: dict[str, str] = {
    "isic2018": "a *_GroundTruth/ folder or *_GroundTruth.csv file (header "
                f"{','.join(EXPECTED_HEADER)}) beside a *_Input/ image folder, e.g. ISIC2018_Task3_Test_Input/ + "
                "ISIC2018_Task3_Test_GroundTruth.csv",
    "ham10000": "a .csv directly in the folder whose header has a 'dx' column and an 'image_id' (or 'image') "
                "column, e.g. HAM10000_metadata.csv, images anywhere below it (HAM10000_images_part_1/, _part_2/)",
    "folders": f"sub-folders named after the classes ({', '.join(CLASS_NAMES)}; any case) holding .jpg/.jpeg/.png",
}


def _describe_contents(path: Path, limit: int = 8) -> str:
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        return "the folder is empty"
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:limit])
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return f"found {shown}{more}"


def detect_layout(root_or_csv: str | Path) -> str:
    """Which layout ``root_or_csv`` holds: "isic2018", "ham10000" or "folders".

    Checked in that order (see ``LAYOUT_SIGNS``); DatasetError listing what was looked for and
    what the folder holds when none matches.
    """
    path = Path(root_or_csv)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "ham10000"
        raise DatasetError(f"{path}: a file that is not a .csv; give a dataset folder or a metadata CSV")
    children = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if isic_ground_truths(path):
        return "isic2018"
    if _metadata_csvs(path):
        return "ham10000"
    if any(p.name.lower() in {c.lower() for c in CLASS_NAMES} for p in children):
        return "folders"
    looked_for = "; ".join(f"{name}: {sign}" for name, sign in LAYOUT_SIGNS.items())
    raise DatasetError(f"{path}: cannot tell the dataset layout ({_describe_contents(path)}). Looked for {looked_for}")


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


# -------------------------------------------------------------------------------------------- datasets


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Number of samples per class name (every class listed, zeros included)."""
    counts = np.bincount([s.label for s in samples], minlength=len(CLASS_NAMES))
    return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}


class LesionDataset(Dataset):
    """Samples -> (3 x size x size float32 tensor, label) through the serving transform.

    Each item is exactly ``preprocess_rgb(decode_image(bytes), size, normalization)`` (the
    architecture's statistics), of the lesion crop with ``crops``; training augmentation lives in
    ``training.augment.AugmentedDataset``.
    """

    def __init__(self, samples: Sequence[Sample], size: int, normalization: Normalization = IMAGENET,
                 crops: Any = None):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.samples = list(samples)
        self.size = int(size)
        self.normalization = normalization
        self.crops = crops

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        rgb = read_rgb(sample, self.crops)
        return torch.from_numpy(preprocess_rgb(rgb, self.size, self.normalization)), sample.label


def read_rgb(sample: Sample, crops: Any = None) -> np.ndarray:
    """A sample's decoded RGB image, cut to its lesion box when ``crops`` (segmentation.boxes.CropBoxes)
    is given: the pixels the served crop pipeline would classify."""
    try:
        rgb = decode_image(sample.path.read_bytes())
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{sample.path}: {exc}") from None
    return rgb if crops is None else crops.crop(sample.image_id, rgb)


def validation_samples(config: Mapping[str, Any]) -> list[Sample]:
    """The validation split a training run used: the ``val`` rows of the split file its resolved
    ``config.json`` records under ``splits`` (written by ``training.splits`` / training).

    DatasetError for a config without a split file: such a run split per image, a split that is
    not rebuilt here.
    """
    from lesionserve.training.splits import read_splits  # splits imports this module

    if not config.get("splits"):
        raise DatasetError("the training config records no split file ('splits'); it predates lesion-grouped "
                           "splits and its validation images cannot be recovered: retrain, or give a split file")
    return read_splits(config["splits"])["val"]
