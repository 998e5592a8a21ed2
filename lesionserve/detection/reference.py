"""The served detection pipeline in-process: the same decode, letterbox, network (ONNX Runtime or
the PyTorch model) and NMS. Its parity oracle; ultralytics' own predict is the independent check."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionserve.detection.nms import detections_of_batch
from lesionserve.detection.preprocess import letterbox
from lesionserve.detection.spec import (DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, DETECTOR_INPUT, DETECTOR_OUTPUT,
                                        check_nms_parameters)
from lesionserve.preprocessing import DEFAULT_MAX_PIXELS, decode_image


@dataclass
class Detections:
    """One image's boxes (N x 4, x0 y0 x1 y1 in its pixels), scores (N) and class indices (N)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def letterbox_batch(rgbs: Sequence[np.ndarray], imgsz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N x 3 x S x S inputs, N x (scale, pad_x, pad_y), N x (width, height)) of decoded images."""
    parts = [letterbox(rgb, imgsz) for rgb in rgbs]
    return (np.stack([p[0] for p in parts]) if parts else np.zeros((0, 3, imgsz, imgsz), np.float32),
            np.array([(p[1], *p[2]) for p in parts], np.float32).reshape(-1, 3),
            np.array([(rgb.shape[1], rgb.shape[0]) for rgb in rgbs], np.int32).reshape(-1, 2))


class DetectorReference:
    """``DetectorReference("model.onnx", imgsz=640).detect([jpeg_bytes, ...])``."""

    def __init__(self, onnx_path: str | Path, imgsz: int, threads: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        from lesionserve.onnx_session import make_session

        self.session = make_session(onnx_path, threads)
        self.imgsz = int(imgsz)
        self.max_pixels = max_pixels

    def head(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([DETECTOR_OUTPUT], {DETECTOR_INPUT: x})[0]

    def eigencam(self, images: Sequence[bytes]) -> list[np.ndarray]:
        """The served EigenCAM of each image, at its size (explain.heatmaps_of_batch on the ONNX features)."""
        from lesionserve.detection.explain import FEATURES_OUTPUT, heatmaps_of_batch

        rgbs = [decode_image(b, max_pixels=self.max_pixels) for b in images]
        x, boxes, sizes = letterbox_batch(rgbs, self.imgsz)
        features = self.session.run([FEATURES_OUTPUT], {DETECTOR_INPUT: x})[0]
        maps = heatmaps_of_batch(features, boxes, sizes, np.zeros(len(rgbs), bool), self.imgsz)
        return [m[:h, :w] for m, (w, h) in zip(maps, sizes)]

    def detect(self, images: Sequence[bytes], conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
               max_det: int = DEFAULT_MAX_DET) -> list[Detections]:
        check_nms_parameters(conf, iou, max_det)
        rgbs = [decode_image(b, max_pixels=self.max_pixels) for b in images]
        x, boxes, sizes = letterbox_batch(rgbs, self.imgsz)
        out = detections_of_batch(self.head(x), boxes, sizes, np.zeros(len(rgbs), bool), conf, iou, max_det)
        return [Detections(out["boxes"][i, :n], out["scores"][i, :n], out["classes"][i, :n])
                for i, n in enumerate(out["count"][:, 0])]
