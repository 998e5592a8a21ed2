"""The pipeline's constants, declared once.

Class order, backbones and their input sizes, normalisation and the allowed view counts are read
from here by training, export, the model repository checks and the reference pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

#: ISIC 2018 Task 3 classes, in the order of the official ground-truth CSV columns.
CLASS_NAMES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NUM_CLASSES = len(CLASS_NAMES)

#: ImageNet statistics (RGB), as used by every timm backbone here.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Test-time augmentation view counts the pipeline supports (prefixes of the dihedral group).
ALLOWED_VIEWS: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone of the ensemble: its serving name, timm architecture and input size."""

    name: str
    timm_name: str
    input_size: int

    @property
    def input_tensor(self) -> str:
        """Name of the ensemble tensor carrying this backbone's resolution."""
        return f"views_{self.input_size}"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", "resnet50", 224),
        BackboneSpec("densenet121", "densenet121", 224),
        BackboneSpec("efficientnet_b3", "efficientnet_b3", 300),
    )
}
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """Return the spec for ``name`` or raise a ValueError listing the valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}") from None


def input_sizes(backbones: tuple[str, ...] = BACKBONE_NAMES) -> tuple[int, ...]:
    """Distinct input resolutions needed by ``backbones``, ascending."""
    return tuple(sorted({get_backbone(b).input_size for b in backbones}))


def check_views(views: int) -> int:
    """Validate a TTA view count."""
    if views not in ALLOWED_VIEWS:
        raise ValueError(f"views must be one of {ALLOWED_VIEWS}, got {views!r}")
    return views
