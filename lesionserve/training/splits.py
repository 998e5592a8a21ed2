"""Train / validation / test splits that cannot leak a lesion across sides.

    python -m training.splits --data DIR_OR_CSV --out splits.csv [--val 0.2 --test 0.2 --seed 0]

HAM10000 (= ISIC 2018 Task 3 training) holds several photographs of many lesions. Splitting by
image puts photographs of one lesion on both sides and inflates test scores (the seed's 0.846 BACC
falls to 0.802 on lesion-clean test images). Here the unit of assignment is the lesion
(``Sample.lesion_id``; an image without one is its own group), and whole lesions are dealt out per
class so that every split's class proportions follow the pool's.

The split file is a CSV with columns ``split,image,path,label,lesion_id`` (``label`` is the class
name, ``path`` absolute; a relative path is read relative to the CSV's folder). Training,
calibration and evaluation all read the same file, so the test images stay unseen.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.spec import CLASS_NAMES
from lesionserve.training.data import LAYOUTS, UNKNOWN_LABEL, DatasetError, Sample, load_dataset

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SPLITS_HEADER: tuple[str, ...] = ("split", "image", "path", "label", "lesion_id")


# ------------------------------------------------------------------------------------------ making


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1 (train needs images), "
                         f"got {val_fraction} + {test_fraction}")


def _group_key(sample: Sample) -> tuple[str, str]:
    # Tagged so that an image id can never collide with a lesion id.
    return ("lesion", sample.lesion_id) if sample.lesion_id else ("image", sample.image_id)


def _groups_by_class(samples: Sequence[Sample]) -> dict[int, dict[tuple[str, str], list[Sample]]]:
    """class -> {group key -> samples}; raises on duplicate image ids and on mixed-label lesions."""
    seen: dict[str, Sample] = {}
    groups: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.image_id in seen:
            raise DatasetError(f"duplicate image id {sample.image_id!r}: {seen[sample.image_id].path} and {sample.path}")
        seen[sample.image_id] = sample
        groups[_group_key(sample)].append(sample)
    by_class: dict[int, dict[tuple[str, str], list[Sample]]] = defaultdict(dict)
    for key, members in groups.items():
        labels = sorted({s.label for s in members})
        if len(labels) > 1:
            detail = ", ".join(f"{s.image_id}={_label_name(s.label) or 'unknown'}" for s in sorted(members, key=lambda s: s.image_id))
            raise DatasetError(f"lesion {key[1]!r} has images of different classes ({detail}); "
                               "a lesion must have one diagnosis")
        by_class[labels[0]][key] = members
    return by_class


def _assign_class(
    groups: Mapping[tuple[str, str], list[Sample]], fractions: Mapping[str, float], rng: np.random.Generator
) -> dict[str, list[tuple[str, str]]]:
    """Deal one class's groups to splits: each group goes to the split furthest below its image target.

    Groups are visited in a seeded random order (of the sorted keys, so input order cannot matter).
    Afterwards a split with a positive fraction that got nothing takes a train group, as long as
    train keeps one: a class with at least 3 lesions then appears in train, val and test.
    """
    keys = sorted(groups)
    order = [keys[i] for i in rng.permutation(len(keys))]
    total = sum(len(groups[k]) for k in keys)
    names = [n for n in SPLIT_NAMES if fractions[n] > 0]
    target = {n: fractions[n] * total for n in names}
    count = {n: 0 for n in names}
    assigned: dict[str, list[tuple[str, str]]] = {n: [] for n in names}
    for key in order:
        # Largest deficit wins; ties go to the earlier split name (train, then val, then test).
        best = max(names, key=lambda n: (target[n] - count[n], -names.index(n)))
        assigned[best].append(key)
        count[best] += len(groups[key])
    for name in names[1:]:
        if not assigned[name] and len(assigned["train"]) > 1:
            smallest = min(assigned["train"], key=lambda k: (len(groups[k]), order.index(k)))
            assigned["train"].remove(smallest)
            assigned[name].append(smallest)
    return assigned


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.image_id, str(s.path)))


def make_splits(
    samples: Sequence[Sample], val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[Sample]]:
    """Lesion-grouped, class-stratified split: ``{"train": [...], "val": [...], "test": [...]}``.

    No lesion has images in two splits. Per class, whole lesions are dealt so each split holds
    close to its fraction of that class's images (off by at most about one lesion's images). The
    result depends only on the set of samples and ``seed``, not their order; each list is sorted by
    image id. ``test_fraction=0`` gives no ``test`` key. Raises DatasetError for duplicate image
    ids or a lesion whose images carry different labels.
    """
    _check_fractions(val_fraction, test_fraction)
    if not samples:
        raise DatasetError("cannot split an empty dataset")
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    out: dict[str, list[Sample]] = {n: [] for n in SPLIT_NAMES if fractions[n] > 0}
    for label, groups in sorted(_groups_by_class(samples).items()):
        assigned = _assign_class(groups, fractions, np.random.default_rng([seed, label]))
        for name, keys in assigned.items():
            for key in keys:
                out[name].extend(groups[key])
    return {name: _sorted(members) for name, members in out.items()}


# ------------------------------------------------------------------------------------------ files


def write_splits(path: str | Path, splits: Mapping[str, Sequence[Sample]]) -> Path:
    """Write ``splits`` as CSV (``split,image,path,label,lesion_id``), atomically; returns the path."""
    path = Path(path)
    unknown = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {', '.join(SPLIT_NAMES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SPLITS_HEADER)
        for name in SPLIT_NAMES:
            for s in splits.get(name, ()):
                # abspath, not resolve: keep symlinked dataset folders as the user named them.
                writer.writerow([name, s.image_id, os.path.abspath(s.path), _label_name(s.label), s.lesion_id or ""])
    tmp.replace(path)
    return path


def _label_name(label: int) -> str:
    return "" if label == UNKNOWN_LABEL else CLASS_NAMES[label]


def _parse_label(value: str, where: str) -> int:
    if value == "":
        return UNKNOWN_LABEL
    if value in CLASS_NAMES:
        return CLASS_NAMES.index(value)
    if value.isdigit() and int(value) < len(CLASS_NAMES):
        return int(value)
    raise DatasetError(f"{where}: unknown label {value!r}; expected one of {', '.join(CLASS_NAMES)}")


def read_splits(path: str | Path, check_files: bool = True) -> dict[str, list[Sample]]:
    """Read a split CSV written by ``write_splits``; keys train and val always, test when it has rows.

    Raises FileNotFoundError if the file is missing and DatasetError naming the line for a bad
    header, split name or label, a repeated image, a lesion on two sides, or (``check_files``)
    images that no longer exist (listing them). ``check_files=False`` reads the ids of a split
    whose images are elsewhere (e.g. to compare them with another dataset).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(c.strip() for c in rows[0]) != SPLITS_HEADER:
        got = ",".join(rows[0]) if rows else "(empty file)"
        raise DatasetError(f"{path}: header is {got!r}; expected {','.join(SPLITS_HEADER)!r}")
    out: dict[str, list[Sample]] = {"train": [], "val": []}
    seen: dict[str, int] = {}
    lesion_side: dict[str, tuple[str, int]] = {}
    missing: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(SPLITS_HEADER):
            raise DatasetError(f"{path.name} line {line}: {len(row)} columns, expected {len(SPLITS_HEADER)}")
        split, image, file, label, lesion = (cell.strip() for cell in row)
        where = f"{path.name} line {line} (image {image!r})"
        if split not in SPLIT_NAMES:
            raise DatasetError(f"{where}: unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}")
        if image in seen:
            raise DatasetError(f"{where}: image already listed on line {seen[image]}")
        seen[image] = line
        if lesion:
            other = lesion_side.setdefault(lesion, (split, line))
            if other[0] != split:
                raise DatasetError(f"{where}: lesion {lesion!r} is in {split} here and in {other[0]} on line "
                                   f"{other[1]}; a lesion must stay on one side")
        file_path = Path(file) if os.path.isabs(file) else path.parent / file
        if check_files and not file_path.is_file():
            missing.append(str(file_path))
        out.setdefault(split, []).append(Sample(file_path, _parse_label(label, where), lesion or None))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"{path}: {len(missing)} image(s) listed no longer exist: {shown} "
                           "(was the dataset moved? recreate the split file)")
    return out


def load_or_create_splits(
    path: str | Path,
    samples: Sequence[Sample],
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Read the split file at ``path`` if it exists, else make the splits and write them there.

    An existing file is kept whatever the fractions and seed (that is the point: every run of an
    experiment uses the same test set), but it must list exactly the images of ``samples`` with
    the same labels; otherwise DatasetError says what changed.
    """
    path = Path(path)
    if not path.exists():
        splits = make_splits(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        write_splits(path, splits)
        return splits
    splits = read_splits(path)
    in_file = {s.image_id: s.label for members in splits.values() for s in members}
    in_data = {s.image_id: s.label for s in samples}
    added = sorted(set(in_data) - set(in_file))
    removed = sorted(set(in_file) - set(in_data))
    relabelled = sorted(i for i in set(in_data) & set(in_file) if in_data[i] != in_file[i])
    if added or removed or relabelled:
        parts = []
        for what, ids in (("not in the split file", added), ("no longer in the dataset", removed),
                          ("with a different label", relabelled)):
            if ids:
                parts.append(f"{len(ids)} image(s) {what} (e.g. {', '.join(ids[:3])})")
        raise DatasetError(f"dataset changed since {path} was written: {'; '.join(parts)}. "
                           "Delete the split file to re-split (results will no longer be comparable) "
                           "or point to the original data.")
    return splits


# ------------------------------------------------------------------------------------------ summary


def split_summary(splits: Mapping[str, Sequence[Sample]]) -> str:
    """A plain-text table: images per class in each split (with % of the class), totals and lesions."""
    names = [n for n in SPLIT_NAMES if n in splits] + sorted(set(splits) - set(SPLIT_NAMES))
    counts = {n: np.bincount([s.label for s in splits[n] if s.label != UNKNOWN_LABEL], minlength=len(CLASS_NAMES))
              for n in names}
    totals = sum(counts.values()) if names else np.zeros(len(CLASS_NAMES), dtype=int)
    width = 14
    lines = ["class".ljust(7) + "".join(n.rjust(width) for n in names) + "total".rjust(8)]
    for c, cls in enumerate(CLASS_NAMES):
        cells = []
        for n in names:
            share = f"{100 * counts[n][c] / totals[c]:.0f}%" if totals[c] else "-"
            cells.append(f"{counts[n][c]} ({share})".rjust(width))
        lines.append(cls.ljust(7) + "".join(cells) + str(int(totals[c])).rjust(8))
    unknown = {n: sum(s.label == UNKNOWN_LABEL for s in splits[n]) for n in names}
    if any(unknown.values()):
        lines.append("unknown".ljust(7) + "".join(str(unknown[n]).rjust(width) for n in names)
                     + str(sum(unknown.values())).rjust(8) + "   (no diagnosis: segmentation-only images)")
    grand = int(totals.sum()) + sum(unknown.values())
    cells = [f"{len(splits[n])} ({100 * len(splits[n]) / grand:.0f}%)".rjust(width) if grand else "0".rjust(width)
             for n in names]
    lines.append("total".ljust(7) + "".join(cells) + str(grand).rjust(8))
    lesions = [len({_group_key(s) for s in splits[n]}) for n in names]
    lines.append("groups".ljust(7) + "".join(str(k).rjust(width) for k in lesions)
                 + str(sum(lesions)).rjust(8) + "   (lesions; an image without lesion_id counts alone)")
    return "\n".join(lines)


def lesion_overlap(splits: Mapping[str, Sequence[Sample]]) -> dict[str, list[str]]:
    """``"a/b" -> lesion ids`` found in both splits a and b (empty dict: the splits are lesion-clean)."""
    ids = {n: {s.lesion_id for s in members if s.lesion_id} for n, members in splits.items()}
    names = sorted(ids)
    overlap = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sorted(ids[a] & ids[b])
            if common:
                overlap[f"{a}/{b}"] = common
    return overlap


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m training.splits"),
        description="Make a lesion-grouped, class-stratified train/val/test split of a dataset and write it "
                    "as CSV (split,image,path,label,lesion_id); prints images per class per split.",
        epilog="Example: python -m training.splits --data /work/shared/data/isic-real/ham10000_metadata.csv "
               "--out runs/exp/splits.csv --val 0.2 --test 0.2 --seed 0",
    )
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="dataset folder (ISIC 2018 layout or class folders) or a HAM10000 metadata CSV")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="dataset layout (default: auto-detect)")
    parser.add_argument("--out", required=True, type=Path, metavar="CSV", help="split file to write")
    parser.add_argument("--val", type=float, default=0.2, metavar="F", help="validation fraction (default: 0.2)")
    parser.add_argument("--test", type=float, default=0.2, metavar="F",
                        help="test fraction; 0 for no test split (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lesion shuffle (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing split file (results made with the old one stop being comparable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        samples = load_dataset(args.data, layout=args.layout)
        splits = make_splits(samples, val_fraction=args.val, test_fraction=args.test, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:  # DatasetError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_splits(args.out, splits)
    print(split_summary(splits))
    print(f"wrote {args.out} ({len(samples)} images, seed {args.seed}, val {args.val}, test {args.test})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
