"""Served pipelines, declared once.

A pipeline is what a client calls: one Triton ensemble (``name``) and the steps behind it. Its
declaration lists the members (which trained architecture, served at which input size with which
normalisation), the TTA view count, the batch limit, the class axis and the fusion. Everything
served is derived from it: the committed model repository (:mod:`lesionserve.repository` writes
every ``config.pbtxt``), assembly, the reference pipeline, calibration and the demo.

    from lesionserve.pipelines import EnsemblePipeline, Member
    register_architecture(Architecture("resnet18", "timm_classifier", "resnet18", 160))
    tiny = EnsemblePipeline("tiny_ensemble", (Member("r18", "resnet18"),), views=4)
    lesionserve.repository.write_repository(out, [LESION_ENSEMBLE, tiny])   # served side by side

The committed repository serves :data:`PIPELINES`; see docs/architecture.md for adding one.

Tensors between steps are keyed by preprocessing (size and normalisation name), not by size alone:
two members at 224 px with other statistics get ``pixel_values_224_imagenet`` and
``pixel_values_224_inception``; two with the same get one shared tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from lesionserve.architectures import Architecture, Normalization, get_architecture
from lesionserve.spec import ALLOWED_VIEWS, CLASS_NAMES, check_views

#: Fusions an ensemble pipeline may declare. ``weighted_mean``: softmax per view, mean over the T
#: views, weighted sum over members with the calibrated weights (calibration.json).
FUSIONS: tuple[str, ...] = ("weighted_mean",)
#: Roles of an ensemble pipeline's steps, in data order; a step's model is ``<step_prefix><role>``.
STEP_ROLES: tuple[str, ...] = ("preprocess", "tta", "fusion", "threshold", "heatmap")


@dataclass(frozen=True)
class Preprocessing:
    """The input one member needs: square resize to ``size``, then ``normalization``."""

    size: int
    normalization: Normalization

    @property
    def key(self) -> str:
        """Suffix of the tensors carrying this input (``pixel_values_<key>``, ``views_<key>``)."""
        return f"{self.size}_{self.normalization.name}"


@dataclass(frozen=True)
class Member:
    """One network of an ensemble: the served model ``name`` (also its artifacts sub-folder).

    Its normalisation is its architecture's (what it was trained with); its input size may differ
    from the architecture's native one (a model trained at another size is served at that size).
    """

    name: str
    architecture: str
    input_size: int | None = None  # None: the architecture's own

    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.input_size or self.arch.input_size, self.arch.normalization)

    @property
    def views_tensor(self) -> str:
        return f"views_{self.preprocessing.key}"


@dataclass(frozen=True)
class EnsemblePipeline:
    """Encoded images -> decode/resize/normalise -> T dihedral views -> members -> fusion -> decision."""

    name: str
    members: tuple[Member, ...]
    class_names: tuple[str, ...] = CLASS_NAMES
    views: int = max(ALLOWED_VIEWS)
    max_batch_size: int = 8
    fusion: str = "weighted_mean"
    #: Prefix of the step models' names; None: ``<name>_`` (so two pipelines never share a step).
    step_prefix: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not self.members:
            problems.append("it has no members")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            problems.append(f"member names repeat: {names}")
        try:
            check_views(self.views)
        except ValueError as exc:
            problems.append(str(exc))
        if self.fusion not in FUSIONS:
            problems.append(f"fusion {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        for member in self.members:
            try:
                arch = member.arch
            except ValueError as exc:
                problems.append(f"member {member.name!r}: {exc}")
                continue
            if arch.num_classes != len(self.class_names):
                problems.append(f"member {member.name!r}: {arch.name} has {arch.num_classes} classes, "
                                f"the pipeline {len(self.class_names)} ({', '.join(self.class_names)})")
            if member.input_size is not None and not (isinstance(member.input_size, int) and member.input_size > 0):
                problems.append(f"member {member.name!r}: input_size must be a positive int, got {member.input_size!r}")
        if not problems:
            keys: dict[str, Preprocessing] = {}
            for pre in self.preprocessings:  # one tensor name must mean one input
                if keys.setdefault(pre.key, pre) != pre:
                    problems.append(f"normalisation name {pre.normalization.name!r} stands for two statistics at "
                                    f"{pre.size} px ({keys[pre.key].normalization} and {pre.normalization})")
        if problems:
            raise ValueError(f"pipeline {self.name!r}: " + "; ".join(problems))

    # -- names -------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"{self.name}_" if self.step_prefix is None else self.step_prefix

    def step(self, role: str) -> str:
        """Model name of the step ``role`` (one of STEP_ROLES)."""
        if role not in STEP_ROLES:
            raise ValueError(f"unknown step {role!r}; steps: {', '.join(STEP_ROLES)}")
        return f"{self.prefix}{role}"

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise ValueError(f"pipeline {self.name!r} has no member {name!r}; members: {', '.join(self.member_names)}")

    @property
    def explainable(self) -> bool:
        """Whether every member has closed-form maps: only then is the ``<name>_explain`` ensemble served."""
        return all(m.arch.explainable for m in self.members)

    @property
    def explain_name(self) -> str:
        """The ensemble that answers with heatmaps as well (the same steps plus ``explain``)."""
        return f"{self.name}_explain"

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every Triton model this pipeline serves: its steps, members and its two ensembles."""
        steps = [self.step(r) for r in STEP_ROLES if r != "heatmap" or self.explainable]
        return (*steps[:2], *self.member_names, *steps[2:], self.name, *([self.explain_name] if self.explainable else []))

    # -- shapes --------------------------------------------------------------------------------

    @property
    def preprocessings(self) -> tuple[Preprocessing, ...]:
        """Distinct member inputs in member order: one preprocess output (and one views tensor) each."""
        return tuple(dict.fromkeys(m.preprocessing for m in self.members))

    @property
    def member_max_batch(self) -> int:
        """Rows one member batch must hold: a whole request's fan-out (images x the largest view count)."""
        return self.max_batch_size * max(ALLOWED_VIEWS)

    @property
    def input_sizes(self) -> dict[str, int]:
        return {m.name: m.preprocessing.size for m in self.members}

    # -- variants ----------------------------------------------------------------------------

    def with_views(self, views: int) -> "EnsemblePipeline":
        """The same pipeline serving ``views`` TTA views."""
        return dataclasses.replace(self, views=check_views(views))

    def with_input_sizes(self, sizes: Mapping[str, int]) -> "EnsemblePipeline":
        """The same pipeline with members served at ``sizes[member]`` (e.g. the size they were trained at)."""
        unknown = sorted(set(sizes) - set(self.member_names))
        if unknown:
            raise ValueError(f"pipeline {self.name!r} has no member(s) {', '.join(unknown)}; members: {', '.join(self.member_names)}")
        # A size equal to the current one changes nothing, so an unchanged pipeline stays equal to its declaration.
        members = tuple(m if sizes.get(m.name, m.preprocessing.size) == m.preprocessing.size
                        else dataclasses.replace(m, input_size=sizes[m.name]) for m in self.members)
        return dataclasses.replace(self, members=members)


#: The seed ensemble: ResNet50 and DenseNet121 at 224 px, EfficientNet-B3 at 300 px, 8 dihedral views.
LESION_ENSEMBLE = EnsemblePipeline(
    "lesion_ensemble",
    (Member("resnet50", "resnet50"), Member("densenet121", "densenet121"), Member("efficientnet_b3", "efficientnet_b3")),
    step_prefix="",  # its steps keep the plain names (preprocess, tta, fusion, threshold)
    description="ResNet50 + DenseNet121 + EfficientNet-B3 ensemble with dihedral TTA, calibrated fusion and MEL/AKIEC thresholds",
)

#: The same ensemble trained and served on lesion crops (seed 004's CropBest): its members are
#: trained with ``--crop-boxes`` and reached through the ``lesion_crop`` pipeline
#: (lesionserve.segmentation.spec.LESION_CROP), which segments, crops and calls its steps; its own
#: ensemble classifies an image that is already a crop.
LESION_CROP_CLASSIFIER = EnsemblePipeline(
    "lesion_crop_classify",
    (Member("crop_resnet50", "resnet50"), Member("crop_densenet121", "densenet121"),
     Member("crop_efficientnet_b3", "efficientnet_b3")),
    description="the seed ensemble trained on lesion crops (classifies an image that is already a crop)",
)

#: The pipelines of the committed model repository, by ensemble name.
PIPELINES: dict[str, EnsemblePipeline] = {LESION_ENSEMBLE.name: LESION_ENSEMBLE}
#: Declared pipelines served from generated repositories only (``lesionserve assemble --out``), beside
#: the committed ones: the committed repository must load without their weights.
GENERATED_PIPELINES: dict[str, EnsemblePipeline] = {LESION_CROP_CLASSIFIER.name: LESION_CROP_CLASSIFIER}


def declared_pipeline(member: str) -> EnsemblePipeline:
    """The committed pipeline serving ``member`` (members' names are unique across a repository)."""
    for pipeline in PIPELINES.values():
        if member in pipeline.member_names:
            return pipeline
    known = [m for p in PIPELINES.values() for m in p.member_names]
    raise ValueError(f"no committed pipeline has a member {member!r}; members: {', '.join(known)}")


def declared_member(name: str) -> Member:
    """The member ``name`` of a committed pipeline."""
    return declared_pipeline(name).member(name)


def get_pipeline(name: str) -> EnsemblePipeline:
    """The declared pipeline ``name`` (committed or generated-only), or a ValueError listing the known names."""
    known = {**PIPELINES, **GENERATED_PIPELINES}
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(known)}") from None
