"""The ViT melanoma classifier, declared once: backbone, input size and normalisation, the heads
(one per dataset and label set), tensor names and the served pipeline.

Training (recipe.yaml), export, the model repository, the reference and the SDK read it from here.
Seed 001's network: a ViT-Base/16 in the DeiT configuration at 224 px, each head
Linear(768, 64) - ReLU - Linear(64, k).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lesionserve.architectures import Normalization
from lesionserve.pipelines import Preprocessing
from lesionserve.spec import CLASS_NAMES

#: ONNX input of the exported backbone + heads; one output per head, then the two attention maps.
VIT_INPUT = "pixel_values"
#: The two attention maps, named for what they are: the last block's CLS-token attention averaged
#: over heads, and attention rollout (Abnar and Zuidema 2020) through every block.
MAP_KINDS: tuple[str, ...] = ("rollout", "cls")
DEFAULT_MAP = "rollout"
#: DeiT's input statistics (timm's pretrained_cfg of deit_*_patch16_224, checked by a unit test): a
#: pretrained DeiT file must be fed what it was trained with. Named for the ViT, so its tensors
#: (``pixel_values_224_deit``) never mix with the CNNs' even where the numbers agree.
DEIT = Normalization("deit", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Melanoma sensitivity the operating threshold is chosen for on validation (``vit-evaluate``).
DEFAULT_TARGET_SENSITIVITY = 0.90


def logits_name(head: str) -> str:
    return f"logits_{head}"


def map_name(kind: str) -> str:
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown attention map {kind!r}; maps: {', '.join(MAP_KINDS)}")
    return f"attention_{kind}"


@dataclass(frozen=True)
class Head:
    """A classifier head: the dataset it is trained on, its classes and the melanoma class the
    operating threshold is set on."""

    name: str
    dataset: str
    class_names: tuple[str, ...]
    positive: str = "melanoma"

    def __post_init__(self) -> None:
        if self.positive not in self.class_names:
            raise ValueError(f"head {self.name!r}: positive class {self.positive!r} is not one of {', '.join(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive)


#: HAM10000, melanoma against every other diagnosis.
HAM10000_HEAD = Head("ham10000", "HAM10000 (ISIC 2018 Task 3 pool)", ("not_melanoma", "melanoma"))
#: PH2's three diagnoses (../shared/data/isic-real/ph2_labels.csv, column ``diagnosis``).
PH2_HEAD = Head("ph2", "PH2", ("common_nevus", "atypical_nevus", "melanoma"))
#: Optional: the 7 ISIC 2018 classes on HAM10000.
ISIC7_HEAD = Head("isic7", "HAM10000 (ISIC 2018 Task 3 pool)", CLASS_NAMES, positive="MEL")
HEADS: dict[str, Head] = {h.name: h for h in (HAM10000_HEAD, PH2_HEAD, ISIC7_HEAD)}


def get_head(name: str) -> Head:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; heads: {', '.join(HEADS)}")
    return HEADS[name]


@dataclass(frozen=True)
class ViTModel:
    """The network: a timm ViT/DeiT configuration (``deit_tiny_patch16_224`` for CPU runs), its own
    input size and normalisation (DeiT's, declared here, not taken from the CNNs),
    and the hidden width of every head's MLP."""

    name: str = "melanoma_vit_backbone"
    timm_name: str = "deit_base_patch16_224"
    input_size: int = 224
    patch_size: int = 16
    normalization: Normalization = DEIT
    head_hidden: int = 64
    heads: tuple[str, ...] = ("ham10000", "ph2")

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"{self.name}: input_size {self.input_size} is not a multiple of the patch size {self.patch_size}")
        if not self.heads:
            raise ValueError(f"{self.name}: at least one head is needed; heads: {', '.join(HEADS)}")
        for head in self.heads:
            get_head(head)
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"{self.name}: heads {self.heads} name one head twice")

    @property
    def grid(self) -> int:
        """Patches per side: the attention maps' resolution."""
        return self.input_size // self.patch_size

    @property
    def preprocessing(self) -> Preprocessing:
        """What it is fed: square resize to input_size, then its normalisation (the same function in
        training, the reference and the server: lesionserve.preprocessing)."""
        return Preprocessing(self.input_size, self.normalization)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(logits_name(h) for h in self.heads) + tuple(map_name(k) for k in MAP_KINDS)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "timm_name": self.timm_name, "input_size": self.input_size, "patch_size": self.patch_size,
                "normalization": {"name": self.normalization.name, "mean": list(self.normalization.mean),
                                  "std": list(self.normalization.std)},
                "head_hidden": self.head_hidden, "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTModel":
        norm = data["normalization"]
        return cls(data["name"], data["timm_name"], int(data["input_size"]), int(data["patch_size"]),
                   Normalization(norm["name"], tuple(norm["mean"]), tuple(norm["std"])),  # type: ignore[arg-type]
                   int(data["head_hidden"]), tuple(data["heads"]))


#: Seed 001's network with the two heads trained here.
VIT_MODEL = ViTModel()


@dataclass(frozen=True)
class MelanomaPipeline:
    """Encoded images -> ``<name>_preprocess`` (the classifiers' preprocess model, the ViT's own size
    and normalisation) -> the backbone + heads (ONNX Runtime; logits per head and both attention
    maps) -> ``<name>_post``: per head softmax probabilities and the decision at its calibrated
    threshold, and one attention map (``map_kind``) at each image's own size."""

    name: str = "melanoma_vit"
    model: ViTModel = VIT_MODEL
    map_kind: str = DEFAULT_MAP
    max_batch_size: int = 8
    description: str = "ViT melanoma classifier, a head per dataset, attention maps (seed 001's system)"

    def __post_init__(self) -> None:
        map_name(self.map_kind)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    @property
    def preprocessings(self) -> tuple[Preprocessing, ...]:
        return (self.preprocessing,)

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(get_head(h) for h in self.model.heads)

    def step(self, role: str) -> str:
        names = {"preprocess": f"{self.name}_preprocess", "backbone": self.model.name, "post": f"{self.name}_post"}
        if role not in names:
            raise ValueError(f"unknown step role {role!r}; roles: {', '.join(names)}")
        return names[role]

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.step("preprocess"), self.step("backbone"), self.step("post"), self.name)

    def with_model(self, model: ViTModel) -> "MelanomaPipeline":
        """The same pipeline over the network as it was trained (configuration, size, heads)."""
        return replace(self, model=model)


#: The served melanoma pipeline.
MELANOMA_VIT = MelanomaPipeline()
