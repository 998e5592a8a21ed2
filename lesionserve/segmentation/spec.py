"""The lesion segmenter, declared once: network, input, normalisation, tensor names, threshold.

Training, export, the model repository, the reference and the SDK read it from here. Seed 004's
network: a U-Net whose encoder is a ResNet34 (segmentation_models_pytorch), one output channel of
lesion logits, trained with progressive resizing 128 -> 256 (``SIZES``), served at the last size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lesionserve.architectures import IMAGENET, Normalization
from lesionserve.cropping import CROP_MARGIN
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


#: How the crop pipeline is served: a Triton ensemble (segmenter logits -> crop step -> the
#: classifier's steps, no image re-encoded) or a BLS python model (calls the segmentation
#: pipeline, crops, re-encodes the crop and calls the crop classifier's ensemble).
CROP_MODES: tuple[str, ...] = ("ensemble", "bls")


@dataclass(frozen=True)
class CropPipeline:
    """Crop-guided classification: segment, cut the lesion's bounding rectangle grown by ``margin``
    from the original image, classify the crop with ``classifier`` (views, fusion, thresholds as
    any ensemble). An image where no lesion is found is classified whole and says so (``cropped``).

    It owns one or two models (``model_names``); the segmentation and classifier pipelines it calls
    must be served from the same repository.
    """

    name: str = "lesion_crop"
    segmentation: SegmentationPipeline = LESION_SEGMENT
    classifier: Any = None  # an EnsemblePipeline; None: pipelines.LESION_CROP_CLASSIFIER
    margin: float = CROP_MARGIN
    mode: str = "ensemble"
    description: str = "segment the lesion, crop its bounding rectangle (+ margin), classify the crop with the crop-trained ensemble"

    def __post_init__(self) -> None:
        if self.classifier is None:
            from lesionserve.pipelines import LESION_CROP_CLASSIFIER

            object.__setattr__(self, "classifier", LESION_CROP_CLASSIFIER)
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop pipeline {self.name!r}: mode must be one of {', '.join(CROP_MODES)}, got {self.mode!r}")
        if not self.margin >= 0:
            raise ValueError(f"crop pipeline {self.name!r}: margin must be >= 0, got {self.margin}")

    @property
    def max_batch_size(self) -> int:
        return min(self.classifier.max_batch_size, self.segmentation.max_batch_size)

    def step(self, role: str) -> str:
        """``preprocess``: the crop step of the ensemble mode (lesion from the logits, crop, resize, normalise)."""
        if role != "preprocess":
            raise ValueError(f"unknown step role {role!r}; roles: preprocess")
        return f"{self.name}_preprocess"

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.step("preprocess"), self.name) if self.mode == "ensemble" else (self.name,)

    @property
    def requires(self) -> tuple[str, ...]:
        """The pipelines it calls, which the same repository must serve."""
        return (self.segmentation.name, self.classifier.name)

    def with_parts(self, segmentation: SegmentationPipeline, classifier: Any) -> "CropPipeline":
        """The same crop pipeline over served variants of its parts (trained sizes, view count)."""
        from dataclasses import replace

        return replace(self, segmentation=segmentation, classifier=classifier)


#: The served crop-guided classifier.
LESION_CROP = CropPipeline()
