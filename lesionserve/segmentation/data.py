"""Image + lesion-mask pairs for the segmenter: loaders, lesion-grouped splits, the training dataset.

``load_pairs(source, layout)`` reads, into ``MaskedSample`` lists:

``ham10000``: a HAM10000 metadata CSV (labels, lesion ids) with ``--masks`` (``image,mask_path``;
  the real pool's ``ham10000_masks.csv``). Images without a mask are skipped, and counted.
``task1``: the ISIC 2018 Task 1 layout as distributed::

      DIR/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg
      DIR/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png

  (no diagnoses: labels are UNKNOWN_LABEL); an image without its mask, or a mask without its image,
  is an error naming both.
``isic2018``: any classification dataset folder ``training.data`` reads, with its ``masks.csv``
  beside it (what ``lesionserve synthetic`` writes; ``--masks`` to name another).
``ph2``: PH2's ``ph2_labels.csv``.

Splits are lesion-grouped and stratified like the classifiers' (``training.splits``), written once
(``<out>/../splits.csv`` by default) and reused. Items go through the serving preprocessing:
``preprocess_rgb`` of the decoded image at the stage's size; the mask is resized to the same grid.
Augmentation moves image and mask with one transform (dihedral, rotation, zoom) and relights the
image only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.preprocessing import ImageDecodeError, decode_image, preprocess_rgb
from lesionserve.training.data import UNKNOWN_LABEL, DatasetError, Sample
from lesionserve.training.masks import MaskedSample, attach_masks, load_mask_index, load_ph2, read_mask

PAIR_LAYOUTS: tuple[str, ...] = ("auto", "ham10000", "task1", "isic2018", "ph2")
TASK1_INPUT = "ISIC2018_Task1-2_Training_Input"
TASK1_TRUTH = "ISIC2018_Task1_Training_GroundTruth"
MASK_SUFFIX = "_segmentation.png"


def load_task1(root: str | Path) -> list[MaskedSample]:
    """Every image of an ISIC 2018 Task 1 folder with its mask (diagnoses unknown)."""
    root = Path(root)
    inputs, truths = root / TASK1_INPUT, root / TASK1_TRUTH
    for folder in (inputs, truths):
        if not folder.is_dir():
            raise DatasetError(f"{root}: no {folder.name}/ (the ISIC 2018 Task 1 layout has {TASK1_INPUT}/ "
                               f"and {TASK1_TRUTH}/)")
    images = {p.stem: p for p in sorted(inputs.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    masks = {p.name[: -len(MASK_SUFFIX)]: p for p in sorted(truths.iterdir()) if p.name.endswith(MASK_SUFFIX)}
    lonely_images, lonely_masks = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if lonely_images or lonely_masks:
        raise DatasetError(f"{root}: {len(lonely_images)} image(s) without a mask (e.g. {', '.join(lonely_images[:3]) or '-'}) "
                           f"and {len(lonely_masks)} mask(s) without an image (e.g. {', '.join(lonely_masks[:3]) or '-'})")
    if not images:
        raise DatasetError(f"{root}: no images in {inputs}")
    return [MaskedSample(Sample(images[i], UNKNOWN_LABEL), masks[i]) for i in sorted(images)]


def detect_pair_layout(source: Path) -> str:
    """The layout of ``source`` (see the module docstring), or a DatasetError saying what was found."""
    if source.is_file() and source.suffix == ".csv":
        header = source.open().readline().strip().split(",")
        if "label7" in header:
            return "ph2"
        if "dx" in header:
            return "ham10000"
        raise DatasetError(f"{source}: a CSV with neither 'dx' (HAM10000 metadata) nor 'label7' (PH2) in its header")
    if (source / TASK1_INPUT).is_dir():
        return "task1"
    if (source / "masks.csv").is_file():
        return "isic2018"
    raise DatasetError(f"{source}: not a HAM10000 metadata CSV, a PH2 CSV, an ISIC 2018 Task 1 folder ({TASK1_INPUT}/) "
                       "or a dataset folder with masks.csv")


def load_pairs(source: str | Path, layout: str = "auto", masks: str | Path | None = None) -> tuple[list[MaskedSample], int]:
    """(image + mask pairs, how many images were skipped for having no mask)."""
    from lesionserve.training.data import load_dataset

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"segmentation data not found: {source}")
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(PAIR_LAYOUTS)}, got {layout!r}")
    layout = detect_pair_layout(source) if layout == "auto" else layout
    if layout == "task1":
        return load_task1(source), 0
    if layout == "ph2":
        return load_ph2(source), 0
    if layout == "ham10000" and masks is None:
        raise ValueError(f"{source}: HAM10000 metadata lists no masks; pass --masks (image,mask_path CSV, "
                         "e.g. ham10000_masks.csv)")
    masks = Path(masks) if masks is not None else source / "masks.csv"
    samples = load_dataset(source, layout="ham10000" if layout == "ham10000" else "auto")
    pairs, without = attach_masks(samples, load_mask_index(masks))
    if not pairs:
        raise DatasetError(f"none of the {len(samples)} images of {source} has a mask in {masks}")
    return pairs, len(without)


def pairs_for(samples: Sequence[Sample], pairs: Sequence[MaskedSample]) -> list[MaskedSample]:
    """The pairs of ``samples`` (a split read back from its file), in the samples' order."""
    by_id = {p.image_id: p for p in pairs}
    missing = [s.image_id for s in samples if s.image_id not in by_id]
    if missing:
        raise DatasetError(f"{len(missing)} split image(s) have no mask in the data given (e.g. {', '.join(missing[:3])}): "
                           "the split file was made from other data")
    return [by_id[s.image_id] for s in samples]


def kfold(samples: Sequence[Sample], folds: int, fold: int, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, val) of fold ``fold`` of ``folds``: lesion-grouped and stratified, each image in
    exactly one fold's val."""
    from lesionserve.training.splits import _group_key

    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got fold {fold} of {folds}")
    groups: dict[tuple[int, tuple[str, str]], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.label, _group_key(s)), []).append(s)
    rng = np.random.default_rng([seed, folds])
    val: list[Sample] = []
    for label in sorted({k[0] for k in groups}):
        keys = sorted(k for k in groups if k[0] == label)
        order = [keys[i] for i in rng.permutation(len(keys))]
        val += [s for i, k in enumerate(order) if i % folds == fold for s in groups[k]]
    chosen = {s.image_id for s in val}
    return [s for s in samples if s.image_id not in chosen], sorted(val, key=lambda s: s.image_id)


# --------------------------------------------------------------------------------------- datasets


def mask_to_grid(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask -> size x size float32 in {0, 1}, on the grid ``preprocessing.resize`` gives the image."""
    import cv2

    return (cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.float32)


def joint_augment(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random dihedral transform, rotation (+-45 degrees) and zoom (0.9-1.25) for both, with the
    same matrix (reflected borders, as skin continues past the frame), then lighting for the image."""
    import cv2

    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    rgb, mask = np.rot90(rgb, k), np.rot90(mask, k)
    if flip:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-45, 45)), float(rng.uniform(0.9, 1.25)))
    rgb = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mask = cv2.warpAffine(np.ascontiguousarray(mask, dtype=np.float32), matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101) > 0.5
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    rgb = np.clip(rgb.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return rgb, mask


class SegmentationDataset(Dataset):
    """Pairs -> (3 x S x S image through the serving preprocessing, 1 x S x S float mask).

    ``augment``: joint_augment first (seeded per item and epoch: ``set_epoch``), in the image's own
    geometry, so image and mask move together before the one resize both share."""

    def __init__(self, pairs: Sequence[MaskedSample], size: int, normalization: Normalization = IMAGENET,
                 augment: bool = False, seed: int = 0) -> None:
        self.pairs = list(pairs)
        self.size = int(size)
        self.normalization = normalization
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded RGB image and its bool mask (checked: binary, the image's size)."""
        pair = self.pairs[index]
        try:
            rgb = decode_image(pair.sample.path.read_bytes())
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{pair.sample.path}: {exc}") from None
        return rgb, read_mask(pair.mask_path, (rgb.shape[1], rgb.shape[0]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, mask = self.load(index)
        if self.augment:
            rgb, mask = joint_augment(rgb, mask, np.random.default_rng([self.seed, self.epoch, index]))
        image = preprocess_rgb(rgb, self.size, self.normalization)  # the serving transform
        return torch.from_numpy(image), torch.from_numpy(mask_to_grid(mask, self.size))[None]
