"""Trainable architectures, declared once: what a model is, apart from where it is served.

An :class:`Architecture` says how to build a network (its family and timm name), the input it was
designed for (side length, :class:`Normalization`), how many classes its head has and which outputs
its exported graph carries. Training, export, checkpoints and the runtimes read it from here.
Which architectures are served together, at which size and with which fusion, is a pipeline's
business (:mod:`lesionserve.pipelines`), not an architecture's.

    from lesionserve.architectures import Architecture, register_architecture
    register_architecture(Architecture("resnet18", "timm_classifier", "resnet18", input_size=160))
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from lesionserve.spec import NUM_CLASSES


@dataclass(frozen=True)
class Normalization:
    """Per-channel RGB statistics applied after scaling pixels to [0, 1]: ``(x/255 - mean) / std``.

    ``name`` keys the served tensors (``pixel_values_<size>_<name>``): two members that share a size
    and a name share one preprocessed tensor, so the name must identify the statistics.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Tuples of floats, whatever was given: the statistics key caches and tensor names (hashable).
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.name.isidentifier():
            raise ValueError(f"normalization name must be an identifier (it names tensors), got {self.name!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"normalization {self.name!r}: mean and std need 3 values, std > 0; got {self.mean}, {self.std}")

    def to_parameter(self) -> str:
        """The config parameter form read back by :meth:`from_parameter` (exact float reprs)."""
        return f"mean={','.join(repr(float(m)) for m in self.mean)};std={','.join(repr(float(s)) for s in self.std)}"

    @classmethod
    def from_parameter(cls, name: str, value: str) -> "Normalization":
        """Parse :meth:`to_parameter`'s form; a malformed value names itself."""
        try:
            parts = dict(item.split("=", 1) for item in value.split(";"))
            mean = tuple(float(v) for v in parts["mean"].split(","))
            std = tuple(float(v) for v in parts["std"].split(","))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"normalization {name!r}: expected 'mean=a,b,c;std=d,e,f', got {value!r} ({exc})") from None
        return cls(name, mean, std)  # type: ignore[arg-type]


#: ImageNet statistics, as every timm CNN here was designed with.
IMAGENET = Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Inception/ViT-style statistics (timm's IMAGENET_INCEPTION_MEAN/STD).
INCEPTION = Normalization("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: Architecture families: how a network is built and which preprocessing family feeds it.
#: ``timm_classifier``: ``timm.create_model(timm_name, num_classes=k)``, square resize, one ``logits`` output.
FAMILIES: tuple[str, ...] = ("timm_classifier",)


@dataclass(frozen=True)
class Architecture:
    """A network the project can train, export and serve."""

    name: str
    family: str
    timm_name: str
    input_size: int
    normalization: Normalization = IMAGENET
    num_classes: int = NUM_CLASSES
    outputs: tuple[str, ...] = ("logits",)
    #: The module whose output the global pooling averages (dotted path in the timm model): where
    #: Grad-CAM and Grad-CAM++ have their closed form (lesionserve.explain).
    cam_layer: str = ""
    #: Whether the head is global average pooling + one linear layer, where Grad-CAM and Grad-CAM++
    #: have a closed form: then its exported graph carries ``cams`` and its pipelines can explain.
    explainable: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"architecture {self.name!r}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if not (isinstance(self.input_size, int) and self.input_size > 0):
            raise ValueError(f"architecture {self.name!r}: input_size must be a positive int, got {self.input_size!r}")
        if self.num_classes < 1:
            raise ValueError(f"architecture {self.name!r}: num_classes must be >= 1, got {self.num_classes}")

    def create(self, num_classes: int | None = None) -> Any:
        """A randomly initialised network (weights are loaded separately; nothing is downloaded)."""
        import timm  # torch + timm only where a network is built

        return timm.create_model(self.timm_name, pretrained=False, num_classes=num_classes or self.num_classes)

    def differences(self, other: "Architecture") -> list[str]:
        """What would make weights of ``self`` wrong for ``other``: network, classes, statistics, outputs
        (the native input size may differ: a model is served at the size it was trained at)."""
        fields = ("name", "family", "timm_name", "num_classes", "normalization", "outputs")
        return [f"{f} {getattr(self, f)!r} (declared {getattr(other, f)!r})" for f in fields
                if getattr(self, f) != getattr(other, f)]

    def to_dict(self) -> dict[str, Any]:
        """Plain fields, stored in checkpoints so a checkpoint describes its own network."""
        return {
            "name": self.name, "family": self.family, "timm_name": self.timm_name, "input_size": self.input_size,
            "normalization": {"name": self.normalization.name, "mean": list(self.normalization.mean),
                              "std": list(self.normalization.std)},
            "num_classes": self.num_classes, "outputs": list(self.outputs), "cam_layer": self.cam_layer,
            "explainable": self.explainable,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Architecture":
        norm = data["normalization"]
        return cls(
            data["name"], data["family"], data["timm_name"], int(data["input_size"]),
            Normalization(norm["name"], tuple(norm["mean"]), tuple(norm["std"])),  # type: ignore[arg-type]
            int(data["num_classes"]), tuple(data["outputs"]), data.get("cam_layer", ""), bool(data.get("explainable", True)),
        )


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(architecture: Architecture) -> Architecture:
    """Add ``architecture`` to the registry; re-registering a name with other fields is refused."""
    known = ARCHITECTURES.get(architecture.name)
    if known is not None and known != architecture:
        raise ValueError(f"architecture {architecture.name!r} is already registered as {known}")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


@contextmanager
def registered(*architectures: Architecture) -> Iterator[tuple[Architecture, ...]]:
    """Register ``architectures`` for the duration of a block (an experiment, a test), then remove
    those that were not registered before, so the registry (and every --help listing it) is as it was."""
    added = [a.name for a in architectures if a.name not in ARCHITECTURES]
    try:
        yield tuple(register_architecture(a) for a in architectures)
    finally:
        for name in added:
            ARCHITECTURES.pop(name, None)


for _arch in (
    Architecture("resnet50", "timm_classifier", "resnet50", 224, cam_layer="layer4"),
    Architecture("densenet121", "timm_classifier", "densenet121", 224, cam_layer="features.norm5"),
    Architecture("efficientnet_b3", "timm_classifier", "efficientnet_b3", 300, cam_layer="bn2"),
):
    register_architecture(_arch)


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``, or a ValueError listing the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}") from None


def architecture_arg(value: str) -> str:
    """argparse ``type=`` for an architecture name: the error lists the valid names."""
    import argparse  # only command lines need it

    try:
        return get_architecture(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
