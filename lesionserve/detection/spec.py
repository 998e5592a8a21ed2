"""The lesion detector, declared once: network, input size, tensor names, NMS defaults.

Training (recipe.yaml), export, the model repository, the reference and the SDK read it from here.
Seed 000's network: YOLO11s (ultralytics), one box class per ISIC class, letterboxed input.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from lesionserve.spec import CLASS_NAMES

#: ONNX input/output names of an ultralytics detection export.
DETECTOR_INPUT = "images"
DETECTOR_OUTPUT = "output0"
#: NMS defaults: ultralytics predict's (conf 0.25, IoU 0.7, at most 300 boxes per image).
DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET = 0.25, 0.7, 300
#: Largest max_det a request may ask for (bounds each response).
MAX_MAX_DET = 1000


@dataclass(frozen=True)
class DetectionPipeline:
    """Encoded images -> letterbox (``<name>_preprocess``) -> the detector (ONNX Runtime, ``detector``)
    -> NMS and boxes in original pixels (``<name>_nms``), with conf / iou / max_det per request;
    ``<name>_explain`` also runs ``<name>_eigencam`` on the detector's layer-8 features."""

    name: str = "lesion_detect"
    detector: str = "detector"
    imgsz: int = 640
    class_names: tuple[str, ...] = CLASS_NAMES
    max_batch_size: int = 8
    description: str = "YOLO11 lesion detector with server-side NMS (seed 000's system)"

    def __post_init__(self) -> None:
        if self.imgsz % 32 or self.imgsz < 32:
            raise ValueError(f"detection pipeline {self.name!r}: imgsz must be a positive multiple of 32, got {self.imgsz}")

    def step(self, role: str) -> str:
        names = {"preprocess": f"{self.name}_preprocess", "detector": self.detector, "nms": f"{self.name}_nms",
                 "eigencam": f"{self.name}_eigencam"}
        if role not in names:
            raise ValueError(f"unknown step role {role!r}; roles: {', '.join(names)}")
        return names[role]

    @property
    def explain_name(self) -> str:
        """The twin ensemble that also answers with EigenCAM heatmaps."""
        return f"{self.name}_explain"

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.step("preprocess"), self.step("detector"), self.step("nms"), self.step("eigencam"), self.name, self.explain_name)

    def with_imgsz(self, imgsz: int) -> "DetectionPipeline":
        return replace(self, imgsz=int(imgsz))


#: The served detector.
LESION_DETECT = DetectionPipeline()


def check_nms_parameters(conf: float, iou: float, max_det: int) -> None:
    """ValueError naming each out-of-range NMS parameter and what is allowed."""
    problems = []
    if not 0.0 <= conf <= 1.0:
        problems.append(f"conf {conf} is not in [0, 1]")
    if not 0.0 <= iou <= 1.0:
        problems.append(f"iou {iou} is not in [0, 1]")
    if not 1 <= max_det <= MAX_MAX_DET:
        problems.append(f"max_det {max_det} is not in [1, {MAX_MAX_DET}]")
    if problems:
        raise ValueError("; ".join(problems))
