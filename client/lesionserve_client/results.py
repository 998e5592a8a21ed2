"""The per-image result type and its construction from an inference response."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
from tritonclient.grpc import InferResult

from .config import ERROR_OUTPUT, ModelInfo
from .errors import ServerError, UndecodableImageError

#: Output tensor names of the ensemble, as fixed by the server contract.
OUTPUT_NAMES: tuple[str, ...] = ("probs", "label", "backbone_probs", "thresholds_fired", ERROR_OUTPUT)


@dataclass(frozen=True)
class LesionResult:
    """Classification of one image.

    ``probabilities`` and each ``backbone_probabilities[b]`` follow the model's class order.
    """

    label: str
    probabilities: dict[str, float]
    backbone_probabilities: dict[str, dict[str, float]]
    thresholds_fired: tuple[str, ...]
    #: With ``classify(..., explain=True)``: the image's heatmap (height x width float32 in [0, 1]:
    #: where the evidence for ``explained_class`` lies), by ``explain_method``; else None.
    heatmap: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    explained_class: Optional[str] = None
    explain_method: Optional[str] = None
    #: With ``classify(..., crop=True)``: the rectangle classified (x0, y0, x1, y1 in the image's
    #: pixels, x1 and y1 exclusive) and whether it is the lesion's crop (False: no lesion was found,
    #: the whole image was classified); else None.
    crop_box: Optional[tuple[int, int, int, int]] = None
    cropped: Optional[bool] = None

    @property
    def confidence(self) -> float:
        """Fused probability of the final label."""
        return self.probabilities[self.label]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable classes, highest first."""
        return sorted(self.probabilities.items(), key=lambda item: item[1], reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "label": self.label,
            "confidence": self.confidence,
            "probabilities": dict(self.probabilities),
            "backbone_probabilities": {b: dict(p) for b, p in self.backbone_probabilities.items()},
            "thresholds_fired": list(self.thresholds_fired),
            **({"explained_class": self.explained_class, "explain_method": self.explain_method,
                "heatmap_shape": list(self.heatmap.shape)} if self.heatmap is not None else {}),
            **({"crop_box": list(self.crop_box), "cropped": self.cropped} if self.crop_box is not None else {}),
        }

    def overlay(self, image: Any) -> np.ndarray:
        """The image (a path, encoded bytes or an HxWx3 uint8 RGB array) under its heatmap, with the
        explained class and its probability written in the top-left corner: HxWx3 uint8 RGB. Needs
        Pillow (``pip install pillow``) and a result of ``classify(..., explain=True)``."""
        from .overlay import draw_overlay

        if self.heatmap is None:
            raise ValueError("this result has no heatmap: classify with explain=True")
        cls = self.explained_class or self.label
        return draw_overlay(image, self.heatmap, f"{cls} {self.probabilities[cls]:.2f}")


    def crop_overlay(self, image: Any) -> np.ndarray:
        """The image with the rectangle classified (yellow) and the label: HxWx3 uint8 RGB. Needs
        Pillow and a result of ``classify(..., crop=True)``."""
        from .overlay import _rgb, draw_segmentation

        if self.crop_box is None:
            raise ValueError("this result has no crop: classify with crop=True")
        rgb = _rgb(image)
        caption = f"{self.label} {self.confidence:.2f}" + ("" if self.cropped else " (whole image: no lesion found)")
        return draw_segmentation(rgb, np.zeros(rgb.shape[:2], bool), self.crop_box if self.cropped else None, caption)


def _to_float(value: np.float32) -> float:
    """A plain float via float32's shortest repr, so 0.9 prints as 0.9, not 0.8999999761581421."""
    return float(str(value))


def _output(result: InferResult, name: str, shape: Sequence[int]) -> np.ndarray:
    """Fetch one output and check its shape against the contract."""
    array = result.as_numpy(name)
    if array is None:
        raise ServerError(f"response is missing output {name!r}")
    if tuple(array.shape) != tuple(shape):
        raise ServerError(f"output {name!r} has shape {list(array.shape)}, expected {list(shape)}")
    return array


def _text(value: Any) -> str:
    """A BYTES element as text (tritonclient gives bytes; be lenient about a str)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def parse_response(
    result: InferResult, info: ModelInfo, indices: Sequence[int]
) -> list[Union[LesionResult, UndecodableImageError]]:
    """Turn one response into one item per row, in row order: a LesionResult, or for a row whose
    ``error`` output is non-empty, UndecodableImageError(indices[row], that error).

    ``indices[row]`` is the row's image's position in the caller's list.
    """
    count = len(indices)
    classes, backbones = info.class_names, info.backbones
    probs = _output(result, "probs", (count, len(classes)))
    labels = _output(result, "label", (count, 1))
    backbone_probs = _output(result, "backbone_probs", (count, len(backbones), len(classes)))
    fired = _output(result, "thresholds_fired", (count, len(classes))).astype(bool)
    errors = _output(result, ERROR_OUTPUT, (count, 1))

    results: list[Union[LesionResult, UndecodableImageError]] = []
    for row, index in enumerate(indices):
        error = _text(errors[row, 0])
        if error:
            # The server's words, as decode_image gave them; that row's other outputs mean nothing.
            results.append(UndecodableImageError(index, error))
            continue
        raw_label = labels[row, 0]
        label = raw_label.decode("utf-8") if isinstance(raw_label, bytes) else str(raw_label)
        if label not in classes:
            raise ServerError(f"server returned label {label!r}, which is not one of {', '.join(classes)}")
        results.append(
            LesionResult(
                label=label,
                probabilities={c: _to_float(p) for c, p in zip(classes, probs[row])},
                backbone_probabilities={
                    b: {c: _to_float(p) for c, p in zip(classes, backbone_probs[row, i])}
                    for i, b in enumerate(backbones)
                },
                thresholds_fired=tuple(c for c, hit in zip(classes, fired[row]) if hit),
            )
        )
    return results


#: Extra outputs of the crop-guided classifier (lesion_crop).
CROP_OUTPUTS: tuple[str, ...] = ("box", "cropped")


def with_crops(result: InferResult, rows: list[Union[LesionResult, UndecodableImageError]]
               ) -> list[Union[LesionResult, UndecodableImageError]]:
    """``rows`` with each result's crop rectangle and cropped flag from a lesion_crop response."""
    from dataclasses import replace

    boxes = _output(result, "box", (len(rows), 4))
    cropped = _output(result, "cropped", (len(rows), 1)).astype(bool)
    return [row if isinstance(row, UndecodableImageError) else
            replace(row, crop_box=tuple(int(v) for v in boxes[i]), cropped=bool(cropped[i, 0]))
            for i, row in enumerate(rows)]


#: Outputs of the segmentation ensemble (lesion_segment).
SEGMENT_OUTPUTS: tuple[str, ...] = ("mask", "box", "area", "found", "image_size", ERROR_OUTPUT)


@dataclass(frozen=True)
class SegmentationResult:
    """The lesion of one image, as ISIC 2018 Task 1 defines one (one region, no holes).

    ``mask``: H x W bool at the image's own size. ``box``: (x0, y0, x1, y1) in the image's pixels,
    x1 and y1 exclusive, or None when ``found`` is False (nothing passed the threshold; the mask is
    then empty). ``area_fraction``: the mask's share of the image.
    """

    mask: np.ndarray = field(compare=False, repr=False)
    box: Optional[tuple[int, int, int, int]]
    area_fraction: float
    found: bool

    def to_dict(self) -> dict[str, Any]:
        return {"found": self.found, "box": list(self.box) if self.box else None,
                "area_fraction": self.area_fraction, "mask_shape": list(self.mask.shape)}

    def overlay(self, image: Any) -> np.ndarray:
        """The image with the mask's outline (green) and the box (yellow): HxWx3 uint8 RGB. Needs Pillow."""
        from .overlay import draw_segmentation

        return draw_segmentation(image, self.mask, self.box,
                                 f"lesion {self.area_fraction:.0%} of image" if self.found else "no lesion found")


def parse_segmentation(result: InferResult, indices: Sequence[int]) -> list[Union[SegmentationResult, UndecodableImageError]]:
    """One SegmentationResult (or UndecodableImageError for a row whose ``error`` is non-empty) per row."""
    count = len(indices)
    masks = result.as_numpy("mask")
    if masks is None or masks.ndim != 3 or len(masks) != count:
        raise ServerError(f"segmentation response has no mask per image (got {None if masks is None else masks.shape})")
    boxes = _output(result, "box", (count, 4))
    areas = _output(result, "area", (count, 1))
    found = _output(result, "found", (count, 1)).astype(bool)
    sizes = _output(result, "image_size", (count, 2))
    errors = _output(result, ERROR_OUTPUT, (count, 1))
    out: list[Union[SegmentationResult, UndecodableImageError]] = []
    for row, index in enumerate(indices):
        error = _text(errors[row, 0])
        if error:
            out.append(UndecodableImageError(index, error))
            continue
        width, height = (int(v) for v in sizes[row])
        hit = bool(found[row, 0])
        out.append(SegmentationResult(masks[row, :height, :width].astype(bool), tuple(int(v) for v in boxes[row]) if hit else None,
                                      _to_float(areas[row, 0]), hit))
    return out


#: Outputs of the detection ensemble (lesion_detect).
DETECT_OUTPUTS: tuple[str, ...] = ("boxes", "scores", "classes", "count", ERROR_OUTPUT)


@dataclass(frozen=True)
class Detection:
    """One detected lesion: box (x0, y0, x1, y1 in the image's pixels, floats), class name, score."""

    box: tuple[float, float, float, float]
    class_name: str
    score: float


@dataclass(frozen=True)
class DetectionResult:
    """The detector's boxes in one image, highest score first (empty: nothing passed conf)."""

    detections: tuple[Detection, ...]
    #: With ``detect(..., explain=True)``: the EigenCAM of layer 8 (H x W float32 in [0, 1]); else None.
    heatmap: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"detections": [{"box": list(d.box), "class": d.class_name, "score": d.score} for d in self.detections]}

    def overlay(self, image: Any) -> np.ndarray:
        """The image with each box and its class and score drawn: HxWx3 uint8 RGB. Needs Pillow."""
        from .overlay import draw_boxes

        return draw_boxes(image, [(d.box, f"{d.class_name} {d.score:.2f}") for d in self.detections])


def parse_detections(result: InferResult, indices: Sequence[int], config: dict,
                     explain: bool = False) -> list[Union[DetectionResult, UndecodableImageError]]:
    """One DetectionResult (or UndecodableImageError) per row of a lesion_detect response."""
    count = len(indices)
    names = _parameter(config, "class_names").split(",")
    boxes = result.as_numpy("boxes")
    if boxes is None or boxes.ndim != 3 or len(boxes) != count:
        raise ServerError(f"detection response has no boxes per image (got {None if boxes is None else boxes.shape})")
    scores = _output(result, "scores", boxes.shape[:2])
    classes = _output(result, "classes", boxes.shape[:2])
    counts = _output(result, "count", (count, 1))
    errors = _output(result, ERROR_OUTPUT, (count, 1))
    heatmaps = result.as_numpy("heatmap") if explain else None
    sizes = _output(result, "image_size", (count, 2)) if explain else None
    if explain and (heatmaps is None or heatmaps.ndim != 3 or len(heatmaps) != count):
        raise ServerError(f"detection response has no heatmap per image (got {None if heatmaps is None else heatmaps.shape})")
    out: list[Union[DetectionResult, UndecodableImageError]] = []
    for row, index in enumerate(indices):
        error = _text(errors[row, 0])
        if error:
            out.append(UndecodableImageError(index, error))
            continue
        n = int(counts[row, 0])
        if n and (classes[row, :n].min() < 0 or classes[row, :n].max() >= len(names)):
            raise ServerError(f"server returned class indices {classes[row, :n].tolist()} outside {len(names)} classes")
        heatmap = heatmaps[row, :int(sizes[row, 1]), :int(sizes[row, 0])] if explain else None
        out.append(DetectionResult(tuple(Detection(tuple(float(v) for v in boxes[row, i]), names[int(classes[row, i])],
                                                   _to_float(scores[row, i])) for i in range(n)), heatmap))
    return out


def _parameter(config: dict, key: str) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise ServerError(f"model config of {config.get('name')!r} has no parameter {key!r}") from None


#: Per-head outputs of the melanoma ensemble (melanoma_vit), each ``<what>_<head>``.
MELANOMA_HEAD_OUTPUTS: tuple[str, ...] = ("probs", "label", "melanoma", "threshold")
#: Its per-image outputs.
MELANOMA_OUTPUTS: tuple[str, ...] = ("attention", "image_size", ERROR_OUTPUT)


@dataclass(frozen=True)
class HeadPrediction:
    """One head's answer for one image: probabilities over its classes, the label (the melanoma
    class when P(melanoma) >= the head's calibrated ``threshold``, else the likeliest other class)."""

    head: str
    class_names: tuple[str, ...]
    probs: tuple[float, ...]
    label: str
    melanoma: bool
    threshold: float
    #: The class the threshold is set on (the server's ``positive_<head>``).
    positive: str

    @property
    def p_melanoma(self) -> float:
        return self.probs[self.class_names.index(self.positive)]

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "label": self.label, "melanoma": self.melanoma, "threshold": self.threshold,
                "probs": dict(zip(self.class_names, self.probs))}


@dataclass(frozen=True)
class MelanomaResult:
    """The ViT's answer for one image: ``prediction`` of the head asked for, ``heads`` every head
    answered, ``attention`` the map (H x W float32 in [0, 1] at the image's size; ``map_kind``
    rollout or cls) of where the network attended."""

    prediction: HeadPrediction
    heads: dict[str, HeadPrediction] = field(compare=False)
    attention: np.ndarray = field(compare=False, repr=False)
    map_kind: str = "rollout"

    def to_dict(self) -> dict[str, Any]:
        return {**self.prediction.to_dict(), "heads": {k: v.to_dict() for k, v in self.heads.items()},
                "attention_map": self.map_kind, "attention_shape": list(self.attention.shape)}

    def overlay(self, image: Any) -> np.ndarray:
        """The image with the attention map blended in (jet) and the head's label: HxWx3 uint8 RGB. Needs Pillow."""
        from .overlay import draw_overlay

        p = self.prediction
        return draw_overlay(image, self.attention, f"{p.head}: {p.label} (P(melanoma) {p.p_melanoma:.2f}, "
                                                   f"threshold {p.threshold:.2f}; attention {self.map_kind})")


def melanoma_heads(config: dict) -> dict[str, tuple[tuple[str, ...], str]]:
    """Head name -> (class names, the melanoma class), from the melanoma ensemble's config parameters."""
    return {h: (tuple(_parameter(config, f"class_names_{h}").split(",")), _parameter(config, f"positive_{h}"))
            for h in _parameter(config, "heads").split(",")}


def parse_melanoma(result: InferResult, indices: Sequence[int], config: dict,
                   heads: Sequence[str], chosen: str) -> list[Union[MelanomaResult, UndecodableImageError]]:
    """One MelanomaResult (or UndecodableImageError) per row of a melanoma_vit response."""
    count = len(indices)
    classes = melanoma_heads(config)
    maps = result.as_numpy("attention")
    if maps is None or maps.ndim != 3 or len(maps) != count:
        raise ServerError(f"melanoma response has no attention map per image (got {None if maps is None else maps.shape})")
    sizes = _output(result, "image_size", (count, 2))
    errors = _output(result, ERROR_OUTPUT, (count, 1))
    per = {h: {"probs": _output(result, f"probs_{h}", (count, len(classes[h][0]))),
               "label": _output(result, f"label_{h}", (count, 1)),
               "melanoma": _output(result, f"melanoma_{h}", (count, 1)).astype(bool),
               "threshold": _output(result, f"threshold_{h}", (count, 1))} for h in heads}
    out: list[Union[MelanomaResult, UndecodableImageError]] = []
    for row, index in enumerate(indices):
        error = _text(errors[row, 0])
        if error:
            out.append(UndecodableImageError(index, error))
            continue
        answers = {h: HeadPrediction(h, classes[h][0], tuple(_to_float(v) for v in per[h]["probs"][row]), _text(per[h]["label"][row, 0]),
                                     bool(per[h]["melanoma"][row, 0]), _to_float(per[h]["threshold"][row, 0]), classes[h][1])
                   for h in heads}
        width, height = (int(v) for v in sizes[row])
        out.append(MelanomaResult(answers[chosen], answers, maps[row, :height, :width], _parameter(config, "map")))
    return out
