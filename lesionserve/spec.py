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


def backbone_arg(value: str) -> str:
    """argparse ``type=`` for a backbone name: the error lists the valid names."""
    import argparse  # only command lines need it

    try:
        return get_backbone(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def input_sizes(backbones: tuple[str, ...] = BACKBONE_NAMES) -> tuple[int, ...]:
    """Distinct input resolutions needed by ``backbones``, ascending."""
    return tuple(sorted({get_backbone(b).input_size for b in backbones}))


def check_views(views: int) -> int:
    """Validate a TTA view count."""
    if views not in ALLOWED_VIEWS:
        raise ValueError(f"views must be one of {ALLOWED_VIEWS}, got {views!r}")
    return views


#: Tensor names of every backbone, in ONNX files, TensorRT engines and configs alike.
BACKBONE_INPUT = "pixel_values"
BACKBONE_OUTPUT = "logits"
#: Images per ensemble request (``lesion_ensemble`` and ``preprocess`` max_batch_size).
ENSEMBLE_MAX_BATCH = 8
#: Rows one backbone batch must hold: a whole request's fan-out (images x the largest view count).
#: The backbone configs' max_batch_size and the TensorRT profiles' max batch are this number.
BACKBONE_MAX_BATCH = ENSEMBLE_MAX_BATCH * max(ALLOWED_VIEWS)
#: TensorRT profiles (engines and the gpu_ort variant alike) are tuned for this batch: four images of
#: eight views, the middle of the members' preferred batch sizes.
TENSORRT_OPT_BATCH = 32


@dataclass(frozen=True)
class ServingVariant:
    """A GPU variant of the model repository, chosen with ``--model-config-name=<name>``.

    Models holding ``configs/<name>.pbtxt`` use it; the CPU variant is every ``config.pbtxt``.
    """

    name: str
    backbones: str
    triton_backends: tuple[str, ...]
    needs_tensorrt_engines: bool = False
    needs_checkpoints: bool = False


#: The GPU variants; in each, the python steps (preprocess, tta, fusion, threshold) run their tensor
#: work on the GPU (torch tensors exchanged through DLPack).
GPU_VARIANTS: dict[str, ServingVariant] = {
    v.name: v
    for v in (
        ServingVariant("gpu", "TensorRT FP16 engines (tensorrt_plan, <backbone>/1/model.plan)",
                       ("tensorrt", "python"), needs_tensorrt_engines=True),
        ServingVariant("gpu_ort", "Triton's onnxruntime backend, TensorRT execution provider in FP16 (model.onnx)",
                       ("onnxruntime", "python")),
        ServingVariant("gpu_torch", "PyTorch FP16 with CUDA graphs in the python backend (<backbone>/1/checkpoint.pt)",
                       ("python",), needs_checkpoints=True),
    )
}


def get_variant(name: str) -> ServingVariant:
    """The GPU variant called ``name``, or a ValueError listing the valid names."""
    try:
        return GPU_VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(GPU_VARIANTS)}") from None
