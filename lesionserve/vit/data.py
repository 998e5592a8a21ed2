"""Each head's data: its images, labels in the head's class order, and a lesion-grouped split.

- ``ham10000`` / ``isic7``: any layout ``training.data.load_dataset`` reads (the HAM10000 metadata
  CSV, an ISIC 2018 folder such as the synthetic one); ``ham10000`` is melanoma vs every other
  diagnosis, ``isic7`` the seven classes. Splits keep each lesion (``lesion_id``) on one side.
- ``ph2``: a CSV with ``image,path,diagnosis`` (../shared/data/isic-real/ph2_labels.csv): one image
  per lesion, so the image is its own group.

Images are decoded once and resized to the network's input with the served preprocessing
(``preprocessing.resize``), kept as uint8, and normalised per batch with ``preprocessing.normalize``:
exactly ``preprocess_rgb``, what the server computes.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import DatasetError, Sample, load_dataset
from lesionserve.training.splits import make_splits
from lesionserve.vit.spec import Head, get_head

SPLITS = ("train", "val", "test")


def load_ph2_diagnoses(csv_path: str | Path, head: Head) -> list[Sample]:
    """PH2 rows as Samples labelled by index into ``head.class_names`` (from column ``diagnosis``).
    An optional ``lesion_id`` column groups photographs of one lesion (PH2 has one per lesion:
    without the column each image is its own group)."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing_cols = [c for c in ("image", "path", "diagnosis") if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing_cols)}; "
                               "expected image,path,diagnosis (as ../shared/data/isic-real/ph2_labels.csv)")
        rows = list(reader)
    out, missing = [], []
    for line, row in enumerate(rows, start=2):
        if row["diagnosis"] not in head.class_names:
            raise DatasetError(f"{csv_path.name} line {line}: diagnosis {row['diagnosis']!r} is not one of "
                               f"{', '.join(head.class_names)}")
        path = (csv_path.parent / row["path"]).resolve()
        if not path.is_file():
            missing.append(str(path))
        out.append(Sample(path, head.class_names.index(row["diagnosis"]), row.get("lesion_id") or None))
    if missing:
        raise DatasetError(f"{csv_path}: {len(missing)} image(s) missing, e.g. {', '.join(missing[:3])}")
    if not out:
        raise DatasetError(f"{csv_path}: no rows")
    return out


def load_head_samples(head: Head, source: str | Path) -> list[Sample]:
    """The head's samples, labels in its class order."""
    if head.name == "ph2":
        return load_ph2_diagnoses(source, head)
    samples = load_dataset(source)
    if head.class_names == CLASS_NAMES:
        return samples
    mel = CLASS_NAMES.index("MEL")
    return [Sample(s.path, int(s.label == mel), s.lesion_id) for s in samples]


def split_head(samples: Sequence[Sample], head: Head, val_fraction: float, test_fraction: float, seed: int,
               limits: Mapping[str, int] | None = None) -> dict[str, list[Sample]]:
    """Lesion-grouped, class-stratified split; ``limits``: at most that many images of a split
    (seeded, class proportions kept roughly) for reduced runs."""
    splits = make_splits(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    for name, cap in (limits or {}).items():
        if name in splits and cap and len(splits[name]) > cap:
            rng = np.random.default_rng([seed, SPLITS.index(name), 7])
            keep = sorted(rng.choice(len(splits[name]), size=int(cap), replace=False))
            splits[name] = [splits[name][i] for i in keep]
    return splits


def write_split_file(path: Path, splits: Mapping[str, Mapping[str, Sequence[Sample]]]) -> None:
    data = {head: {name: [[str(s.path), s.label, s.lesion_id] for s in members] for name, members in per.items()}
            for head, per in splits.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def read_split_file(path: Path) -> dict[str, dict[str, list[Sample]]]:
    data = json.loads(Path(path).read_text())
    return {head: {name: [Sample(Path(p), int(label), lesion) for p, label, lesion in rows] for name, rows in per.items()}
            for head, per in data.items()}


def cross_head_leaks(splits: Mapping[str, Mapping[str, Sequence[Sample]]]) -> list[str]:
    """Images that one head trains on and another validates or tests on (the backbone is shared, so
    that would leak): ``"<image> (train of A, test of B)"``, by resolved path."""
    trained: dict[Path, str] = {}
    for head, per in splits.items():
        for s in per.get("train", ()):
            trained.setdefault(Path(s.path).resolve(), head)
    leaks = []
    for head, per in splits.items():
        for name in ("val", "test"):
            for s in per.get(name, ()):
                other = trained.get(Path(s.path).resolve())
                if other is not None and other != head:
                    leaks.append(f"{s.image_id} (train of {other}, {name} of {head})")
    return sorted(leaks)


def lesion_overlap(splits: Mapping[str, Sequence[Sample]]) -> list[str]:
    """Lesion ids found in more than one split (must be empty)."""
    owner: dict[str, str] = {}
    shared = set()
    for name, members in splits.items():
        for s in members:
            key = s.lesion_id or s.image_id
            if owner.setdefault(key, name) != name:
                shared.add(key)
    return sorted(shared)


@dataclass
class HeadData:
    """One head's split, its images as resized uint8 arrays (N x S x S x 3) and labels."""

    head: Head
    samples: dict[str, list[Sample]]
    pixels: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def resized_pixels(samples: Sequence[Sample], size: int, progress: bool = True, desc: str = "") -> np.ndarray:
    """Decode and resize every image once, with the served code."""
    from lesionserve.preprocessing import decode_image, resize

    out = np.empty((len(samples), size, size, 3), np.uint8)
    items: Any = samples
    if progress:
        from tqdm import tqdm

        items = tqdm(samples, desc=desc or "decoding", unit="img", leave=False)
    for i, s in enumerate(items):
        out[i] = resize(decode_image(s.path.read_bytes()), size)
    return out


def load_head_data(splits: Mapping[str, Mapping[str, Sequence[Sample]]], size: int, progress: bool = True) -> dict[str, HeadData]:
    out = {}
    for name, per in splits.items():
        head = get_head(name)
        out[name] = HeadData(head, {k: list(v) for k, v in per.items()},
                             {k: resized_pixels(v, size, progress, f"{name} {k}") for k, v in per.items()},
                             {k: np.array([s.label for s in v], np.int64) for k, v in per.items()})
    return out


#: Synthetic stand-ins for PH2's diagnoses (tests and the demo, which have no PH2): the renderer's
#: MEL and NV lesions, and its BKL lesions playing the atypical nevi. Render them as a dataset of
#: their own: images shared with another head's splits would leak through the shared backbone.
SYNTHETIC_PH2 = {"MEL": "melanoma", "NV": "common_nevus", "BKL": "atypical_nevus"}


def write_synthetic_ph2(samples: Sequence[Sample], csv_path: str | Path) -> Path:
    """A PH2-format CSV (image,path,diagnosis,lesion_id) over synthetic samples of the SYNTHETIC_PH2
    classes (the renderer photographs some lesions more than once: lesion_id keeps them together)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "path", "diagnosis", "lesion_id"])
        for s in samples:
            name = CLASS_NAMES[s.label]
            if name in SYNTHETIC_PH2:
                w.writerow([s.image_id, str(Path(s.path).resolve()), SYNTHETIC_PH2[name], s.lesion_id or ""])
    return csv_path
