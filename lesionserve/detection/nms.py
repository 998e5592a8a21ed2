"""Non-maximum suppression of YOLO head outputs, as ultralytics' predict does it, in numpy.

The head gives, per image, 4 + C rows over A anchors: box centre, width and height on the
letterboxed canvas, then the C class scores. Per image: keep anchors whose best class score
exceeds ``conf``, at most MAX_NMS of them by score, greedy NMS per class (boxes of different classes
never suppress each other: ultralytics offsets them by class * MAX_WH), at most ``max_det`` boxes
by score, then back to original pixels (preprocess.unletterbox). The served NMS step and the
reference run these functions.
"""
from __future__ import annotations

import numpy as np

from lesionserve.detection.preprocess import unletterbox

MAX_NMS = 30000  # boxes into NMS at most (ultralytics' max_nms)
MAX_WH = 7680  # class offset (ultralytics' max_wh)


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh)
    out[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    out[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    return out


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first; a box overlapping a kept one by IoU > ``iou`` goes)."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0).clip(0) * (y1 - y0).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest])).clip(0)
        h = (np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest])).clip(0)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-12)
        order = rest[overlap <= iou]
    return np.array(keep, np.int64)


def detections(head: np.ndarray, conf: float, iou: float, max_det: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's (4 + C) x A head output -> (boxes N x 4 xyxy on the canvas, scores N, classes N)."""
    scores_all = head[4:]
    cls = scores_all.argmax(0)
    score = scores_all[cls, np.arange(head.shape[1])]
    keep = score > conf
    boxes, score, cls = xywh_to_xyxy(head[:4, keep].T.astype(np.float32)), score[keep], cls[keep]
    if len(score) > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        boxes, score, cls = boxes[top], score[top], cls[top]
    kept = greedy_nms(boxes + (cls[:, None] * MAX_WH).astype(np.float32), score, iou)[:max_det]
    return boxes[kept], score[kept].astype(np.float32), cls[kept].astype(np.int32)


def detections_of_batch(heads: np.ndarray, letterboxes: np.ndarray, image_sizes: np.ndarray, failed: np.ndarray,
                        conf: float, iou: float, max_det: int) -> dict[str, np.ndarray]:
    """The served NMS step: per image its boxes in original pixels, padded to the request's largest
    count: ``boxes`` N x K x 4, ``scores`` N x K, ``classes`` N x K (-1 padding), ``count`` N x 1.
    ``letterboxes``: N x (scale, pad_x, pad_y); a ``failed`` row has no detection."""
    per_image = []
    for head, (scale, px, py), (width, height), bad in zip(heads, letterboxes, image_sizes, failed):
        if bad:
            per_image.append((np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)))
            continue
        boxes, score, cls = detections(np.asarray(head, np.float32), conf, iou, max_det)
        per_image.append((unletterbox(boxes, float(scale), (float(px), float(py)), int(width), int(height)), score, cls))
    k = max([len(s) for _, s, _ in per_image] + [1])  # at least one (padding) row: no zero-size tensors
    n = len(per_image)
    out = {"boxes": np.zeros((n, k, 4), np.float32), "scores": np.zeros((n, k), np.float32),
           "classes": np.full((n, k), -1, np.int32), "count": np.zeros((n, 1), np.int32)}
    for i, (boxes, score, cls) in enumerate(per_image):
        out["boxes"][i, :len(score)], out["scores"][i, :len(score)], out["classes"][i, :len(score)] = boxes, score, cls
        out["count"][i, 0] = len(score)
    return out
