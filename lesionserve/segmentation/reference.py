"""The served segmentation pipeline in-process (PyTorch): its parity oracle and benchmark baseline.

The same decode and preprocessing (lesionserve.preprocessing), the U-Net in PyTorch at the size it
was trained at, the same post-processing (lesionserve.segmentation.postprocess).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lesionserve.preprocessing import DEFAULT_MAX_PIXELS, decode_image
from lesionserve.segmentation.evaluate import SegmenterEnsemble
from lesionserve.segmentation.postprocess import Lesion, lesion_from_probabilities


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
