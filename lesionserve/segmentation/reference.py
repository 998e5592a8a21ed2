"""The served segmentation pipeline in-process (PyTorch): its parity oracle and benchmark baseline.

The same decode and preprocessing (lesionserve.preprocessing), the U-Net in PyTorch at the size it
was trained at, the same post-processing (lesionserve.segmentation.postprocess).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lesionserve.cropping import CROP_MARGIN, crop_rect
from lesionserve.preprocessing import DEFAULT_MAX_PIXELS, decode_image
from lesionserve.segmentation.postprocess import Lesion, lesion_from_probabilities


class SegmenterEnsemble:
    """One or more segmenter checkpoints of one training size: mean probabilities over them."""

    def __init__(self, checkpoints: Sequence[str | Path], threads: int | None = None) -> None:
        import torch

        from lesionserve.segmentation.model import load_segmenter

        if threads:
            torch.set_num_threads(threads)
        loaded = [load_segmenter(p) for p in checkpoints]
        sizes = {size for _, _, size, _ in loaded}
        if len(sizes) != 1:
            raise ValueError(f"checkpoints trained at different sizes {sorted(sizes)} cannot be averaged")
        self.spec = loaded[0][0]
        self.size = sizes.pop()
        self.models = [model for _, model, _, _ in loaded]

    def probabilities(self, rgbs: Sequence[np.ndarray]) -> np.ndarray:
        """N x S x S lesion probabilities of decoded RGB images (mean over the checkpoints)."""
        import torch

        from lesionserve.preprocessing import preprocess_rgb
        from lesionserve.segmentation.train import predict_probs

        x = torch.from_numpy(np.stack([preprocess_rgb(rgb, self.size, self.spec.normalization) for rgb in rgbs]))
        return np.mean([predict_probs(m, x) for m in self.models], axis=0)


class SegmentationReference:
    """``SegmentationReference(["runs/seg/segmenter/checkpoint.pt"]).segment([jpeg_bytes, ...])``."""

    def __init__(self, checkpoints: Sequence[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None) -> None:
        self.ensemble = SegmenterEnsemble(checkpoints, threads)
        self.max_pixels = max_pixels

    def segment(self, images: Sequence[bytes]) -> list[Lesion]:
        """One Lesion per encoded image; ImageDecodeError for an unreadable one."""
        rgbs = [decode_image(blob, max_pixels=self.max_pixels) for blob in images]
        probs = self.ensemble.probabilities(rgbs)
        return [lesion_from_probabilities(p, rgb.shape[1], rgb.shape[0], self.ensemble.spec.threshold)
                for p, rgb in zip(probs, rgbs)]


@dataclass
class CropOutput:
    """The crop pipeline's outputs in-process: the classification of each crop, each image's lesion,
    the rectangle classified (original pixels) and whether it was a lesion crop (False: whole image)."""

    result: Any  # reference.PipelineOutput
    lesions: list[Lesion]
    crops: list[tuple[int, int, int, int]]
    cropped: list[bool]


class CropReference:
    """The served ``lesion_crop`` pipeline in-process: segment (SegmentationReference), crop with the
    same geometry (lesionserve.cropping), classify the crops (ReferencePipeline of crop members)."""

    def __init__(self, segmentation: SegmentationReference, classifier: Any, margin: float = CROP_MARGIN) -> None:
        self.segmentation = segmentation
        self.classifier = classifier
        self.classifier.crop_margin = margin  # one margin for boxes and crops

    @classmethod
    def from_artifacts(cls, segmenter_checkpoints: Sequence[str | Path], crop_artifacts: str | Path, views: int = 8,
                       pipeline: Any = None, **kwargs: Any) -> "CropReference":
        from lesionserve.reference import ReferencePipeline
        from lesionserve.segmentation.spec import LESION_CROP

        pipeline = pipeline or LESION_CROP
        classifier = ReferencePipeline.from_artifacts(crop_artifacts, views=views, pipeline=pipeline.classifier, **kwargs)
        return cls(SegmentationReference(segmenter_checkpoints, max_pixels=classifier.max_pixels), classifier, pipeline.margin)

    def classify(self, images: Sequence[bytes]) -> CropOutput:
        """Classify each image's lesion crop; ImageDecodeError for an unreadable image."""
        images = list(images)
        lesions = self.segmentation.segment(images)
        boxes = [lesion.box for lesion in lesions]
        result = self.classifier.run(images, boxes)
        crops = [crop_rect(b, l.mask.shape[1], l.mask.shape[0], self.classifier.crop_margin) for b, l in zip(boxes, lesions)]
        return CropOutput(result, lesions, crops, [l.found for l in lesions])
