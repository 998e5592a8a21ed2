"""Lesion masks beside images: the mask CSVs, PH2, and a strict mask reader.

Layouts read here:

``masks.csv`` (the real HAM10000 pool's ``ham10000_masks.csv``, and what ``training.synthetic``
  writes): ``image,mask_path``, the path relative to the CSV's folder. Images it does not list have
  no mask (on purpose, for the real pool: they are held back for independent evaluation).

``PH2`` (``ph2_labels.csv``): ``image,path,mask_path,diagnosis,label7``, paths relative to the CSV's
  folder; ``label7`` is the ISIC class (MEL or NV).

A mask is a single-channel (or grey RGB) image file of two values, {0, 255} or {0, 1}, in the
geometry of its image (lossless: a JPEG's ringing makes it non-binary); ``read_mask`` refuses anything else and names what it found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import DatasetError, Sample, _read_csv_rows


class MaskError(DatasetError):
    """A mask file is missing, unreadable, not binary or not the size of its image."""


@dataclass(frozen=True)
class MaskedSample:
    """A labelled image and the file of its lesion mask."""

    sample: Sample
    mask_path: Path

    @property
    def image_id(self) -> str:
        return self.sample.image_id


def _rows(csv_path: Path, needed: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """training.data's CSV rows (line number, stripped row), after checking the file and its columns."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"mask CSV not found: {csv_path}")
    header, rows = _read_csv_rows(csv_path)
    missing = [c for c in needed if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)} "
                           f"(needs {','.join(needed)})")
    return rows


def _resolve(base: Path, relative: str) -> Path:
    return Path(relative) if Path(relative).is_absolute() else base / relative


def load_mask_index(csv_path: str | Path) -> dict[str, Path]:
    """``image -> mask file`` from an ``image,mask_path`` CSV; every listed file must exist."""
    csv_path = Path(csv_path)
    index: dict[str, Path] = {}
    missing: list[str] = []
    for line, row in _rows(csv_path, ("image", "mask_path")):
        image, relative = row["image"], row["mask_path"]
        if not image or not relative:
            raise DatasetError(f"{csv_path.name} line {line}: empty image or mask_path")
        if image in index:
            raise DatasetError(f"{csv_path.name} line {line}: image {image!r} listed twice")
        path = _resolve(csv_path.parent, relative)
        if not path.is_file():
            missing.append(str(path))
        index[image] = path
    if missing:
        raise MaskError(f"{csv_path}: {len(missing)} mask file(s) missing, e.g. {', '.join(missing[:3])}")
    return index


def attach_masks(samples: Sequence[Sample], index: Mapping[str, Path]) -> tuple[list[MaskedSample], list[Sample]]:
    """(the samples that have a mask in ``index`` (load_mask_index's), with it; the samples without one)."""
    with_mask = [MaskedSample(s, index[s.image_id]) for s in samples if s.image_id in index]
    return with_mask, [s for s in samples if s.image_id not in index]


def load_ph2(csv_path: str | Path) -> list[MaskedSample]:
    """PH2's images with their masks and ISIC classes (``label7``), in CSV order."""
    csv_path = Path(csv_path)
    out: list[MaskedSample] = []
    missing: list[str] = []
    for line, row in _rows(csv_path, ("image", "path", "mask_path", "label7")):
        label = row["label7"]
        if label not in CLASS_NAMES:
            raise DatasetError(f"{csv_path.name} line {line}: label7 {label!r} is not one of {', '.join(CLASS_NAMES)}")
        image, mask = _resolve(csv_path.parent, row["path"]), _resolve(csv_path.parent, row["mask_path"])
        missing += [str(p) for p in (image, mask) if not p.is_file()]
        # One image per PH2 lesion: the image id is its own group.
        out.append(MaskedSample(Sample(image, CLASS_NAMES.index(label), row["image"]), mask))
    if missing:
        raise DatasetError(f"{csv_path}: {len(missing)} file(s) missing, e.g. {', '.join(missing[:3])}")
    if not out:
        raise DatasetError(f"{csv_path}: no rows")
    return out


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The mask at ``path`` as an H x W bool array (True: lesion). ``size`` (width, height): the
    image's, which the mask must match. Refuses a missing or undecodable file, colour, more than two
    values, or values other than {0, 255} / {0, 1}."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file not found: {path}")
    raw = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise MaskError(f"{path}: not a decodable image")
    if raw.ndim == 3:
        if raw.shape[2] == 4:
            raw = raw[..., :3]
        if not (raw == raw[..., :1]).all():
            raise MaskError(f"{path}: a colour image, not a binary mask")
        raw = raw[..., 0]
    values = np.unique(raw)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise MaskError(f"{path}: not binary: {len(values)} distinct values ({shown}); a mask holds 0 and 255 (or 0 and 1)")
    if size is not None and (raw.shape[1], raw.shape[0]) != tuple(size):
        raise MaskError(f"{path}: mask is {raw.shape[1]}x{raw.shape[0]}, its image {size[0]}x{size[1]}")
    return raw > 0
