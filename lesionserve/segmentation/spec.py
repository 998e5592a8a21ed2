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
