"""Explanations of the detector: Grad-CAM++ offline, EigenCAM served.

- **Grad-CAM++** (:func:`gradcampp_maps`, offline, pytorch-grad-cam): true gradient-squared
  weighting on backbone layer 8 (the stride-32 C3k2 block) of the underlying DetectionModel (never
  the YOLO wrapper: a CAM library calling it would start a training run), for a scalar target: the
  class score of the image's top box (the highest-scoring anchor). Seed 000's "Grad-CAM++" was plain
  Grad-CAM.
- **EigenCAM** (:func:`eigencam`, served): gradient-free. The layer-8 activations (an extra output
  of the exported graph, ``features``) are centred over positions and projected on their first
  principal direction. It explains no class and no box: it shows where the layer's dominant
  pattern lies. The principal direction's sign is arbitrary; it is fixed here so that the map
  correlates positively with the mean activation, then negatives are cut (ReLU) and the map scaled
  to [0, 1].

Both maps live on the letterboxed canvas; :func:`to_image` crops the padding and resizes them to
the original image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

#: The backbone layer explained (ultralytics' yolo11.yaml: 8 is the stride-32 C3k2 block).
CAM_LAYER = 8
FEATURES_OUTPUT = "features"


def eigencam(activations: np.ndarray) -> np.ndarray:
    """B x C x h x w activations -> B x h x w maps in [0, 1] (first principal component, sign fixed)."""
    out = []
    for a in np.nan_to_num(np.asarray(activations, np.float64)):
        flat = a.reshape(a.shape[0], -1).T  # positions x channels
        centred = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        if np.dot(projection, flat.mean(axis=1) - flat.mean()) < 0:
            projection = -projection
        cam = np.maximum(projection.reshape(a.shape[1:]), 0)
        out.append(cam / cam.max() if cam.max() > 0 else cam)
    return np.asarray(out, np.float32).reshape(len(out), *np.asarray(activations).shape[2:])


def to_image(cam: np.ndarray, imgsz: int, scale: float, pad: tuple[float, float], width: int, height: int) -> np.ndarray:
    """A map on the imgsz x imgsz letterboxed canvas (any resolution) -> height x width, in [0, 1]."""
    canvas = cv2.resize(np.asarray(cam, np.float32), (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
    x0, y0 = int(round(pad[0])), int(round(pad[1]))
    x1, y1 = x0 + max(1, round(width * scale)), y0 + max(1, round(height * scale))
    inner = canvas[y0:min(imgsz, y1), x0:min(imgsz, x1)]
    return np.clip(cv2.resize(inner, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def add_features_output(onnx_path: str | Path, layer: int = CAM_LAYER) -> str:
    """Expose layer ``layer``'s output of an ultralytics ONNX export as graph output ``features``
    (in place); returns the internal tensor's name. The head output is untouched."""
    import onnx

    model = onnx.load(str(onnx_path))
    prefix = f"/model.{layer}/"
    nodes = [n for n in model.graph.node if n.name.startswith(prefix)]
    if not nodes:
        raise ValueError(f"{onnx_path}: no node of layer {layer} (names starting {prefix!r}): not an ultralytics export?")
    # The layer's output: produced inside it, consumed outside it.
    produced = {o for n in nodes for o in n.output}
    consumed_outside = {i for n in model.graph.node if not n.name.startswith(prefix) for i in n.input}
    leaving = sorted(produced & consumed_outside)
    if len(leaving) != 1:
        raise ValueError(f"{onnx_path}: layer {layer} has {len(leaving)} outputs leaving it, expected 1 ({leaving[:3]})")
    name = leaving[0]
    identity = onnx.helper.make_node("Identity", [name], [FEATURES_OUTPUT], name="lesionserve/features")
    model.graph.node.append(identity)
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, ["batch", None, None, None]))
    onnx.save(model, str(onnx_path))
    return name


def top_box_target(head: np.ndarray) -> tuple[int, int]:
    """(class, anchor) of the image's top box: the anchor with the highest class score."""
    scores = head[4:]
    anchor = int(scores.max(axis=0).argmax())
    return int(scores[:, anchor].argmax()), anchor


def gradcampp_maps(weights: str | Path, images: Sequence[np.ndarray], imgsz: int, layer: int = CAM_LAYER
                   ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Grad-CAM++ (pytorch-grad-cam) of each RGB image's top box on layer ``layer``, at the image's size;
    and the (class, anchor) each map explains."""
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus

    from lesionserve.detection.preprocess import letterbox
    from lesionserve.detection.train import offline_environment

    offline_environment(Path(weights).parent / ".ultralytics")
    from ultralytics import YOLO

    net = YOLO(str(weights)).model.float().eval()
    for p in net.parameters():
        p.requires_grad_(True)  # inference checkpoints come frozen: the CAM needs a graph

    class HeadScores(torch.nn.Module):
        """The head's (4 + classes) x anchors output alone: what a scalar target indexes."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.model(x)
            return y[0] if isinstance(y, (list, tuple)) else y

    wrapped = HeadScores(net)
    maps, targets = [], []
    with GradCAMPlusPlus(model=wrapped, target_layers=[net.model[layer]]) as cam:
        for rgb in images:
            x, scale, pad = letterbox(rgb, imgsz)
            tensor = torch.from_numpy(x[None])
            with torch.no_grad():
                head = wrapped(tensor)[0].numpy()
            cls, anchor = top_box_target(head)
            grayscale = cam(input_tensor=tensor, targets=[lambda out, c=cls, a=anchor: out[4 + c, a]])[0]
            maps.append(to_image(grayscale, imgsz, scale, pad, rgb.shape[1], rgb.shape[0]))
            targets.append((cls, anchor))
    return maps, targets


def heatmaps_of_batch(features, letterboxes, image_sizes, failed, imgsz):
    """The served EigenCAM step: N x Hmax x Wmax float32, each image's map (at its own size, from
    N x C x h x w ``features``) in the top-left corner; zeros for a ``failed`` row."""
    sizes = np.asarray(image_sizes, np.int64).reshape(-1, 2)
    out = np.zeros((len(sizes), max(1, int(sizes[:, 1].max(initial=1))), max(1, int(sizes[:, 0].max(initial=1)))), np.float32)
    maps = eigencam(features)
    for i, (cam, (scale, px, py), (w, h)) in enumerate(zip(maps, letterboxes, sizes)):
        if not failed[i]:
            out[i, :h, :w] = to_image(cam, imgsz, float(scale), (float(px), float(py)), int(w), int(h))
    return out
