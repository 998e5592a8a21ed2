"""The lesion segmenter, declared once: network, input, normalisation, tensor names, threshold.

Training, export, the model repository, the reference and the SDK read it from here. Seed 004's
network: a U-Net whose encoder is a ResNet34 (segmentation_models_pytorch), one output channel of
lesion logits, trained with progressive resizing 128 -> 256 (``SIZES``), served at the last size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.pipelines import Preprocessing
from lesionserve.segmentation.postprocess import MASK_THRESHOLD

#: ONNX input/output names of the exported segmenter.
SEGMENTER_INPUT = "pixel_values"
SEGMENTER_OUTPUT = "mask_logits"


@dataclass(frozen=True)
class Segmenter:
    """A segmentation network the project trains, exports and serves."""

    name: str = "segmenter"
    encoder: str = "resnet34"
    input_size: int = 256
    normalization: Normalization = IMAGENET
    threshold: float = MASK_THRESHOLD

    def __post_init__(self) -> None:
        # The U-Net halves the resolution five times: any side must be a multiple of 32.
        if self.input_size % 32 or self.input_size < 32:
            raise ValueError(f"segmenter {self.name!r}: input_size must be a positive multiple of 32, got {self.input_size}")

    def create(self) -> Any:
        """A randomly initialised U-Net (``encoder_weights=None``: nothing is downloaded)."""
        import segmentation_models_pytorch as smp

        return smp.Unet(encoder_name=self.encoder, encoder_weights=None, in_channels=3, classes=1)

    def preprocessing(self, size: int | None = None) -> Preprocessing:
        """The input it is fed: the classifiers' square resize and its normalisation, at ``size``
        (default its serving size) so training, reference and server share one preprocessing."""
        return Preprocessing(size or self.input_size, self.normalization)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "encoder": self.encoder, "input_size": self.input_size,
                "normalization": {"name": self.normalization.name, "mean": list(self.normalization.mean),
                                  "std": list(self.normalization.std)}, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Segmenter":
        norm = data["normalization"]
        return cls(data["name"], data["encoder"], int(data["input_size"]),
                   Normalization(norm["name"], tuple(norm["mean"]), tuple(norm["std"])), float(data["threshold"]))  # type: ignore[arg-type]


#: Seed 004's segmenter.
SEGMENTER = Segmenter()
#: Its progressive resizing: trained at each size in turn, served at the last.
SIZES: tuple[int, ...] = (128, 256)


@dataclass(frozen=True)
class SegmentationPipeline:
    """A served segmentation pipeline: encoded images in; per image the lesion mask at the image's
    size, its bounding box, its area fraction and whether a lesion was found (``postprocess``).

    Steps: ``<name>_preprocess`` (the classifiers' preprocess model, one input), the segmenter
    (``segmenter.name``: ONNX Runtime like the backbones), ``<name>_post`` (post-processing).
    """

    name: str = "lesion_segment"
    segmenter: Segmenter = SEGMENTER
    input_size: int | None = None  # None: the segmenter's own; a model trained at another size is served at it
    max_batch_size: int = 8
    description: str = "U-Net (ResNet34 encoder) lesion segmentation, post-processed as ISIC 2018 Task 1 defines a lesion"

    @property
    def size(self) -> int:
        return self.input_size or self.segmenter.input_size

    @property
    def preprocessing(self) -> Preprocessing:
        return self.segmenter.preprocessing(self.size)

    @property
    def preprocessings(self) -> tuple[Preprocessing, ...]:
        return (self.preprocessing,)

    def step(self, role: str) -> str:
        """Model name of a step: ``preprocess``, ``segmenter`` or ``post``."""
        names = {"preprocess": f"{self.name}_preprocess", "segmenter": self.segmenter.name, "post": f"{self.name}_post"}
        if role not in names:
            raise ValueError(f"unknown step role {role!r}; roles: {', '.join(names)}")
        return names[role]

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.step("preprocess"), self.step("segmenter"), self.step("post"), self.name)

    def with_input_size(self, size: int) -> "SegmentationPipeline":
        from dataclasses import replace

        return replace(self, input_size=None if size == self.segmenter.input_size else int(size))


#: The served segmentation pipeline.
LESION_SEGMENT = SegmentationPipeline()
