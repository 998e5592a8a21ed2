"""The served segmentation pipeline in-process (PyTorch): its parity oracle and benchmark baseline.

The same decode and preprocessing (lesionserve.preprocessing), the U-Net in PyTorch at the size it
was trained at, the same post-processing (lesionserve.segmentation.postprocess).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

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
