"""Constants every declaration shares, declared once.

The ISIC class order, the allowed view counts, the members' tensor names and batch limits, and the
GPU serving variants. What can be trained is declared in lesionserve.architectures; what is served,
in lesionserve.pipelines.
"""
from __future__ import annotations

from dataclasses import dataclass

#: ISIC 2018 Task 3 classes, in the order of the official ground-truth CSV columns.
CLASS_NAMES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
NUM_CLASSES = len(CLASS_NAMES)

#: Test-time augmentation view counts the pipeline supports (prefixes of the dihedral group).
ALLOWED_VIEWS: tuple[int, ...] = (1, 2, 4, 8)


def check_views(views: int) -> int:
    """Validate a TTA view count."""
    if views not in ALLOWED_VIEWS:
        raise ValueError(f"views must be one of {ALLOWED_VIEWS}, got {views!r}")
    return views


#: Tensor names of every backbone, in ONNX files, TensorRT engines and configs alike.
BACKBONE_INPUT = "pixel_values"
BACKBONE_OUTPUT = "logits"
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
