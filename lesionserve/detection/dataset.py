"""Write a lesion-grouped split in the ultralytics detection layout, box source selectable.

    lesionserve detect-dataset --data ../shared/data/isic-real/ham10000_metadata.csv \\
        --masks ../shared/data/isic-real/ham10000_masks.csv --boxes masks --out runs/det/data

Layout (what ``YOLO(...).train(data=<out>/data.yaml)`` reads):

    <out>/images/{train,val,test}/<image>.jpg   the original images, aspect ratio kept (ultralytics
                                                letterboxes them at train time; the seed stretched to 640 x 640)
    <out>/labels/{train,val,test}/<image>.txt   "class cx cy w h", normalised, one box per image
    <out>/train.txt                             the training list, rare classes repeated (below)
    <out>/data.yaml                             path, train, val, test, names (the ISIC class order)
    <out>/manifest.json                         counts, box source, repeat factors, the split file

Boxes: ``saliency`` (seed 000's rule, every image) or ``masks`` (the expert masks' lesions; images
without a mask are left out and counted). Splits are lesion-grouped (training.splits), written once
to ``--splits`` and reused.

Class imbalance: ultralytics takes no class weights, so each training image of class c is listed
``min(cap, round(n_max / n_c))`` times in train.txt (n_c: training images of class c; cap default
10): the rare classes are seen about as often as the common one, without unbounded repetition.
Validation and test lists are never repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.spec import CLASS_NAMES

BOX_SOURCES = ("saliency", "masks")
DEFAULT_REPEAT_CAP = 10


def repeat_factors(counts: Mapping[int, int], cap: int = DEFAULT_REPEAT_CAP) -> dict[int, int]:
    """Class -> how many times each of its training images is listed: min(cap, round(n_max / n_c)), >= 1."""
    if cap < 1:
        raise ValueError(f"repeat cap must be >= 1, got {cap}")
    largest = max(counts.values(), default=0)
    return {c: max(1, min(cap, round(largest / n))) for c, n in counts.items() if n > 0}


def label_line(label: int, box: tuple[int, int, int, int], width: int, height: int) -> str:
    from lesionserve.detection.boxes import to_yolo

    return f"{label} " + " ".join(f"{v:.6f}" for v in to_yolo(box, width, height))


def _box_of(sample, source: str, mask_index: Mapping[str, Path], masked_only: bool = False
            ) -> tuple[tuple[int, int, int, int], int, int] | None:
    """(box, width, height) of one sample from ``source``; None when it has no mask (masks source,
    or ``masked_only``: saliency boxes on exactly the images the mask boxes cover)."""
    from lesionserve.detection.boxes import mask_box, saliency_box
    from lesionserve.preprocessing import decode_image
    from lesionserve.training.masks import read_mask

    if masked_only and sample.image_id not in mask_index:
        return None
    rgb = decode_image(Path(sample.path).read_bytes())
    height, width = rgb.shape[:2]
    if source == "saliency":
        return saliency_box(rgb).box, width, height
    path = mask_index.get(sample.image_id)
    box = mask_box(read_mask(path, (width, height))) if path is not None else None
    return (box, width, height) if box is not None else None


def write_dataset(splits: Mapping[str, Sequence], out: str | Path, source: str = "masks",
                  mask_index: Mapping[str, Path] | None = None, repeat_cap: int = DEFAULT_REPEAT_CAP,
                  progress: bool = True, masked_only: bool = False, seed: int = 0) -> dict:
    """Write ``splits`` (name -> samples) under ``out``; returns the manifest (also written)."""
    from tqdm import tqdm

    if source not in BOX_SOURCES:
        raise ValueError(f"box source must be one of {', '.join(BOX_SOURCES)}, got {source!r}")
    if source == "masks" and not mask_index:
        raise ValueError("the masks box source needs a mask index (--masks CSV)")
    out = Path(out)
    kept: dict[str, list[Path]] = {}
    labels: dict[str, list[int]] = {}
    skipped: Counter = Counter()
    for split, samples in splits.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        kept[split], labels[split] = [], []
        for sample in tqdm(samples, desc=f"{split} boxes ({source})", unit="img", disable=not progress, file=sys.stderr):
            found = _box_of(sample, source, mask_index or {}, masked_only)
            if found is None:
                skipped[split] += 1
                continue
            box, width, height = found
            image = out / "images" / split / f"{sample.image_id}{Path(sample.path).suffix.lower()}"
            if not image.exists():
                # A hard link where the file system allows it (no copy of the dataset). Not a symlink:
                # ultralytics resolves links and would look for the labels beside the original image.
                try:
                    os.link(sample.path, image)
                except OSError:
                    shutil.copyfile(sample.path, image)
            (out / "labels" / split / f"{sample.image_id}.txt").write_text(label_line(sample.label, box, width, height) + "\n")
            kept[split].append(image)
            labels[split].append(sample.label)
    counts = Counter(labels.get("train", []))
    factors = repeat_factors(counts, repeat_cap)
    lines = [os.path.abspath(p) for p, c in zip(kept.get("train", []), labels.get("train", [])) for _ in range(factors[c])]
    # Shuffled (seeded): ultralytics' `fraction` keeps the first lines, which must then be a fair sample.
    lines = [lines[i] for i in np.random.default_rng(seed).permutation(len(lines))]
    (out / "train.txt").write_text("\n".join(lines) + "\n")
    yaml = [f"path: {out.resolve()}", "train: train.txt", "val: images/val"]
    if kept.get("test"):
        yaml.append("test: images/test")
    yaml.append("names:")
    yaml += [f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES)]
    (out / "data.yaml").write_text("\n".join(yaml) + "\n")
    manifest = {
        "box_source": source,
        "masked_only": masked_only,
        "images": {s: len(v) for s, v in kept.items()},
        "skipped_without_mask": dict(skipped),
        "train_per_class": {CLASS_NAMES[c]: counts.get(c, 0) for c in range(len(CLASS_NAMES))},
        "repeat_cap": repeat_cap,
        "repeat_factor": {CLASS_NAMES[c]: f for c, f in sorted(factors.items())},
        "train_list_per_class": {CLASS_NAMES[c]: counts[c] * f for c, f in sorted(factors.items())},
        "train_list_length": len(lines),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-dataset"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="dataset (training.data.load_dataset): a folder or metadata CSV")
    parser.add_argument("--layout", default="auto", help="layout of --data (default %(default)s)")
    parser.add_argument("--masks", type=Path, help="masks CSV (image,mask); default <data>/masks.csv for a folder")
    parser.add_argument("--boxes", choices=BOX_SOURCES, default="masks", help="box source (default %(default)s)")
    parser.add_argument("--splits", type=Path, help="lesion-grouped split CSV, created on first use (default <out>/../splits.csv)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="(default %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default %(default)s)")
    parser.add_argument("--repeat-cap", type=int, default=DEFAULT_REPEAT_CAP, help="largest repeat of a rare class's image (default %(default)s)")
    parser.add_argument("--masked-only", action="store_true",
                        help="with --boxes saliency and --masks: only the images that have a mask (to compare both sources on one image set)")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lesionserve.training.data import DatasetError, load_dataset
    from lesionserve.training.masks import load_mask_index
    from lesionserve.training.splits import load_or_create_splits

    args = get_args_parser().parse_args(argv)
    masks = args.masks or (args.data / "masks.csv" if args.data.is_dir() and (args.data / "masks.csv").is_file() else None)
    if args.boxes == "masks" and masks is None:
        print("error: --boxes masks needs --masks CSV (or a dataset folder with masks.csv); --boxes saliency needs none",
              file=sys.stderr)
        return 2
    try:
        samples = load_dataset(args.data, args.layout)
        splits = load_or_create_splits(args.splits or args.out.parent / "splits.csv", samples, args.val_fraction,
                                       args.test_fraction, args.seed)
        manifest = write_dataset(splits, args.out, args.boxes, load_mask_index(masks) if masks else None,
                                 args.repeat_cap, progress=not args.no_progress, masked_only=args.masked_only, seed=args.seed)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    print(f"wrote {args.out / 'data.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
