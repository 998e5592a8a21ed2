"""Lesion boxes per image, computed once and written to a CSV that crop-guided training reads.

    lesionserve crop-boxes --splits runs/x/splits.csv --segmenter runs/seg/segmenter/checkpoint.pt --out runs/x/boxes.csv
    lesionserve crop-boxes --splits runs/x/splits.csv --masks ham10000_masks.csv --out runs/x/mask_boxes.csv

``--segmenter``: each image's lesion as the served ``lesion_crop`` pipeline finds it (the same
decode, U-Net and post-processing: SegmentationReference), so training sees the crops serving
will cut. ``--masks``: the expert masks' lesion (largest component, holes filled), for comparison;
an image without a mask is written as not found (it is classified whole). One row per image:
``image,width,height,x0,y0,x1,y1,found,source``; the margin is applied when cropping
(lesionserve.cropping), not stored, so one file serves any margin.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from lesionserve.cropping import CROP_MARGIN, NO_BOX, Box, check_box, crop_to_lesion

HEADER = ("image", "width", "height", "x0", "y0", "x1", "y1", "found", "source")
SOURCES = ("segmenter", "masks")


class CropBoxError(ValueError):
    """A boxes file that cannot be read, or that does not fit the images it is used on."""


@dataclass(frozen=True)
class ImageBox:
    width: int
    height: int
    box: Box  # NO_BOX when no lesion was found
    source: str


@dataclass(frozen=True)
class CropBoxes:
    """``CropBoxes.read(path).crop(sample.image_id, rgb)``: each image cut to its lesion (+ margin)."""

    path: Path
    boxes: Mapping[str, ImageBox]
    margin: float = CROP_MARGIN

    @classmethod
    def read(cls, path: str | Path, margin: float = CROP_MARGIN) -> "CropBoxes":
        path = Path(path)
        if not path.is_file():
            raise CropBoxError(f"crop boxes file not found: {path} (write one with `lesionserve crop-boxes`)")
        boxes: dict[str, ImageBox] = {}
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = tuple(next(reader, ()))
            if header != HEADER:
                raise CropBoxError(f"{path}: header must be {','.join(HEADER)}, got {','.join(header) or '(empty file)'}")
            for line, row in enumerate(reader, start=2):
                if len(row) != len(HEADER):
                    raise CropBoxError(f"{path}:{line}: expected {len(HEADER)} fields, got {len(row)}")
                try:
                    width, height, *box = (int(v) for v in row[1:7])
                except ValueError:
                    raise CropBoxError(f"{path}:{line}: width, height and box must be integers, got {row[1:7]}") from None
                found = row[7] == "1"
                try:
                    check_box(tuple(box) if found else NO_BOX, width, height)  # type: ignore[arg-type]
                except ValueError as exc:
                    raise CropBoxError(f"{path}:{line}: {exc}") from None
                if row[0] in boxes:
                    raise CropBoxError(f"{path}:{line}: image {row[0]} is listed twice")
                boxes[row[0]] = ImageBox(width, height, tuple(box) if found else NO_BOX, row[8])  # type: ignore[arg-type]
        return cls(path, boxes, margin)

    def box(self, image_id: str, width: int, height: int) -> Box:
        """The lesion box of ``image_id``, checked against the decoded image's size."""
        entry = self.boxes.get(image_id)
        if entry is None:
            raise CropBoxError(f"{self.path} has no box for image {image_id}: write boxes for every image of the "
                               "split (`lesionserve crop-boxes --splits ...`)")
        if (entry.width, entry.height) != (width, height):
            raise CropBoxError(f"{self.path}: the box of {image_id} was found on a {entry.width}x{entry.height} image, "
                               f"this one is {width}x{height}: boxes and images must come from the same files")
        return entry.box

    def crop(self, image_id: str, rgb):  # -> np.ndarray
        """``rgb`` cut to its lesion box grown by the margin (the whole image where none was found)."""
        return crop_to_lesion(rgb, self.box(image_id, rgb.shape[1], rgb.shape[0]), self.margin)[0]

    def boxes_of(self, image_ids: Sequence[str], images: Sequence[bytes]) -> list[Box]:
        """The boxes of encoded images (for ReferencePipeline.run), each checked against its size."""
        return [self.box(image_id, *_image_size(data)) for image_id, data in zip(image_ids, images)]

    @classmethod
    def of_training(cls, config: Mapping) -> "CropBoxes | None":
        """The crops a training run (its config.json) cut: None for whole images."""
        return cls.read(config["crop_boxes"], config["crop_margin"]) if config.get("crop_boxes") else None

    def found_fraction(self) -> float:
        return sum(b.box != NO_BOX for b in self.boxes.values()) / max(1, len(self.boxes))


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, from the header where it can be read."""
    from lesionserve.preprocessing import decode_image, image_header_size

    size = image_header_size(data)
    if size is None:
        rgb = decode_image(data)
        size = (rgb.shape[1], rgb.shape[0])
    return int(size[0]), int(size[1])


def write_boxes(path: str | Path, rows: Sequence[tuple[str, ImageBox]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for image, b in rows:
            writer.writerow([image, b.width, b.height, *b.box, int(b.box != NO_BOX), b.source])
    tmp.replace(path)  # a half-written file never replaces a good one
    return path


def segmenter_boxes(samples: Sequence, checkpoint: str | Path, batch: int = 8, threads: int | None = None,
                    progress: bool = True) -> list[tuple[str, ImageBox]]:
    """Each sample's lesion as the served segmentation pipeline finds it."""
    from tqdm import tqdm

    from lesionserve.segmentation.reference import SegmentationReference

    reference = SegmentationReference([checkpoint], threads=threads)
    rows = []
    with tqdm(total=len(samples), desc="segmenting", unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            lesions = reference.segment([Path(s.path).read_bytes() for s in chunk])
            for s, lesion in zip(chunk, lesions):
                h, w = lesion.mask.shape
                rows.append((s.image_id, ImageBox(w, h, lesion.box, "segmenter")))
            bar.update(len(chunk))
    return rows


def mask_boxes(samples: Sequence, masks_csv: str | Path) -> list[tuple[str, ImageBox]]:
    """Each sample's expert-mask lesion (largest component, holes filled); not found without a mask."""
    from lesionserve.segmentation.postprocess import bounding_box, lesion_of_mask
    from lesionserve.training.masks import load_mask_index, read_mask

    index = load_mask_index(masks_csv)
    rows = []
    for s in samples:
        size = _image_size(Path(s.path).read_bytes())
        path = index.get(s.image_id)
        box = NO_BOX if path is None else bounding_box(lesion_of_mask(read_mask(path, size)))
        rows.append((s.image_id, ImageBox(int(size[0]), int(size[1]), box, "masks")))
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesionserve crop-boxes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--splits", type=Path, metavar="CSV", help="every image of this split file (all its splits)")
    images.add_argument("--data", type=Path, metavar="PATH", help="every image of a dataset (training.data.load_dataset)")
    parser.add_argument("--layout", default="auto", help="layout of --data (default %(default)s)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--segmenter", type=Path, metavar="CKPT", help="segmenter checkpoint: boxes as served")
    source.add_argument("--masks", type=Path, metavar="CSV", help="expert masks CSV (image,mask): boxes of the true lesions")
    parser.add_argument("--out", type=Path, required=True, metavar="CSV", help="boxes file to write")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from lesionserve.training.data import DatasetError, load_dataset
    from lesionserve.training.splits import read_splits

    try:
        if args.splits:
            samples = sorted({s.image_id: s for part in read_splits(args.splits).values() for s in part}.values(),
                             key=lambda s: s.image_id)
        else:
            samples = load_dataset(args.data, args.layout)
        rows = (segmenter_boxes(samples, args.segmenter, threads=args.threads, progress=not args.no_progress)
                if args.segmenter else mask_boxes(samples, args.masks))
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_boxes(args.out, rows)
    found = sum(b.box != NO_BOX for _, b in rows)
    print(f"wrote {args.out}: {len(rows)} images, lesion found in {found} ({found / max(1, len(rows)):.1%}); "
          f"the others are classified whole")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
