"""Class activation maps in closed form: Grad-CAM and Grad-CAM++ without autograd.

The timm classifiers here end in global average pooling and one linear layer, so the gradient of
class score ``c`` with respect to the last feature map ``A`` (K x h x w, the pooling's input) is the
same at every pixel: ``dy_c / dA_k(i, j) = w_ck / (h w)``. With that constant gradient

    Grad-CAM    = ReLU(sum_k g_ck A_k),                   g_ck = w_ck / (h w)
    Grad-CAM++  = ReLU(sum_k a_ck A_k),  a_ck = h w ReLU(g_ck) g_ck^2 / (2 g_ck^2 + S_k g_ck^3 + eps)

where ``S_k`` sums ``A_k`` over pixels (equation 19 of Chattopadhay et al. 2018, as
pytorch-grad-cam writes it, eps included). Both are a few tensor products, so they are exported in
the ONNX graph beside the logits (no autograd in serving) and checked against pytorch-grad-cam,
which computes them with real gradients (tests/unit/test_explain.py).

The maps are taken at the pooling's input (``Architecture.cam_layer``): the seed notebooks used
earlier pre-activation convolutions (e.g. ResNet50 ``layer4[-1].conv3``), where the gradient is not
constant and no closed form exists.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The maps a graph exported with explanations carries, in the order of its ``cams`` axis 1.
CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcampp")
#: pytorch-grad-cam's eps in Grad-CAM++'s denominator, kept so the two agree to the last bit that matters.
GRADCAMPP_EPS = 1e-6
#: pytorch-grad-cam's eps in its min-max scaling.
SCALE_EPS = 1e-7
#: Name of the exported graph's extra output: N x len(CAM_METHODS) x C x h x w float32.
CAMS_OUTPUT = "cams"


def cam_maps(features: Any, weight: Any) -> Any:
    """Grad-CAM and Grad-CAM++ for every class: (N x K x h x w features, C x K classifier weight)
    -> N x 2 x C x h x w (torch; traceable, so it exports to ONNX)."""
    import torch

    h, w = features.shape[-2], features.shape[-1]
    g = weight / (h * w)  # C x K: the gradient of each class score at every pixel
    gradcam = torch.relu(torch.einsum("ck,nkhw->nchw", g, features))
    sums = features.sum(dim=(2, 3))  # N x K
    g2 = g * g
    alpha = g2[None] / (2 * g2[None] + sums[:, None, :] * (g2 * g)[None] + GRADCAMPP_EPS)  # N x C x K
    alpha = torch.where(g[None] != 0, alpha, torch.zeros_like(alpha))
    weights = (h * w) * torch.relu(g)[None] * alpha  # the pixel sum of a per-pixel constant
    gradcampp = torch.relu(torch.einsum("nck,nkhw->nchw", weights, features))
    return torch.stack([gradcam, gradcampp], dim=1)


def explained(model: Any) -> Any:
    """``model`` (a timm classifier) returning ``(logits, cams)``: the same logits, plus cam_maps of
    its pooled features with its classifier's weight."""
    import torch

    class Explained(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.inner.forward_features(x)
            weight = self.inner.get_classifier().weight
            # Checked eagerly; while tracing for export the shapes are fixed and the check already ran.
            if not torch.jit.is_tracing() and weight.shape[1] != features.shape[1]:
                raise ValueError(f"{type(self.inner).__name__}: its classifier reads {weight.shape[1]} features, the pooled "
                                 f"map has {features.shape[1]} channels: the head is not pooling + linear, so there is "
                                 "no closed-form Grad-CAM (declare the architecture explainable=False)")
            logits = self.inner.forward_head(features)
            return logits, cam_maps(features, weight)

    return Explained(model)


def scale_map(cam: np.ndarray) -> np.ndarray:
    """Min-max scaling of one map to [0, 1], as pytorch-grad-cam scales (eps keeps a flat map finite)."""
    cam = cam - cam.min()
    return (cam / (SCALE_EPS + cam.max())).astype(np.float32)


def upsample_map(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """One h x w map -> height x width, bilinear, then scaled to [0, 1]."""
    import cv2

    return scale_map(cv2.resize(scale_map(cam), (width, height), interpolation=cv2.INTER_LINEAR))


def explanation_classes(names: Sequence[str | None], labels: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Class index per image: the named class, or the predicted label where None; an unknown name
    is refused naming the classes there are."""
    unknown = sorted({n for n in names if n is not None and n not in class_names})
    if unknown:
        raise ValueError(f"cannot explain unknown class {', '.join(map(repr, unknown))}; classes: {', '.join(class_names)}")
    return [list(class_names).index(n if n is not None else label) for n, label in zip(names, labels)]


def view_maps(cams: np.ndarray, classes: np.ndarray, views: int, size: int) -> np.ndarray:
    """One member's raw maps of one method (N*T x C x h x w) -> (N*T) x size x size, each the map of
    its image's class (``classes``: N indices), upsampled to the member's input and scaled, as
    pytorch-grad-cam returns a map for an input of that size."""
    rows = np.repeat(np.asarray(classes), views)
    return np.stack([upsample_map(cams[i, c], size, size) for i, c in enumerate(rows)])


def fuse_view_maps(per_member: list[np.ndarray], weights: np.ndarray, views: int,
                   image_sizes: list[tuple[int, int]]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Fuse maps as probabilities are fused: per member, each view's map (N*T x S x S, view geometry)
    is turned back into image geometry and averaged over the T views; each member's map is resized
    to its image's (width, height), and the members are summed with the fusion ``weights``; every
    map is then scaled to [0, 1]. Returns (fused maps, per image; member maps, per image and member)."""
    import cv2

    from lesionserve.views import invert_views

    members = []
    for maps in per_member:
        upright = invert_views(maps[:, None], views)[:, 0]  # N*T x S x S
        members.append(upright.reshape(-1, views, *upright.shape[1:]).mean(axis=1))  # N x S x S
    fused, by_member = [], []
    for n, (width, height) in enumerate(image_sizes):
        resized = [scale_map(cv2.resize(m[n].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR))
                   for m in members]
        by_member.append(resized)
        fused.append(scale_map(sum(w * r for w, r in zip(np.asarray(weights, np.float64), resized))))
    return fused, by_member


def overlay(rgb: np.ndarray, heatmap: np.ndarray, label: str, confidence: float, alpha: float = 0.45) -> np.ndarray:
    """The image (H x W x 3 uint8 RGB) under its heatmap (H x W in [0, 1], JET colours: red is where
    the class's evidence is strongest), with the label and confidence written in the top-left corner."""
    import cv2

    if heatmap.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap is {heatmap.shape[1]}x{heatmap.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(rgb, 1.0 - alpha, colours, alpha, 0.0)
    text = f"{label} {confidence:.2f}"
    scale = max(0.4, min(out.shape[:2]) / 500)
    thickness = max(1, round(scale * 2))
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(4 * scale))
    cv2.rectangle(out, (0, 0), (w + 2 * pad, h + base + 2 * pad), (0, 0, 0), -1)
    cv2.putText(out, text, (pad, h + pad), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out
