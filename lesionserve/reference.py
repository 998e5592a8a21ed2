"""The reference pipeline: the served pipeline re-implemented in-process with PyTorch eager.

Same weights (the training checkpoints), same preprocessing, views, fusion and decision functions.
It is the parity oracle for the Triton ensemble and the baseline the benchmarks compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lesionserve.calibration import Calibration
from lesionserve.cropping import CROP_MARGIN, Box
from lesionserve.fusion import fuse
from lesionserve.models import load_checkpoint, trained_input_size
from lesionserve.pipelines import LESION_ENSEMBLE, EnsemblePipeline, Preprocessing
from lesionserve.preprocessing import DEFAULT_MAX_PIXELS, preprocess_batch_rows
from lesionserve.spec import check_views
from lesionserve.views import make_views


@dataclass
class PipelineOutput:
    """Per-image outputs, the same tensors the ensemble returns."""

    probs: np.ndarray  # N x C fused probabilities
    backbone_probs: np.ndarray  # N x members x C
    labels: list[str]  # final class names after thresholds
    thresholds_fired: np.ndarray  # N x C bool


class ReferencePipeline:
    """``ReferencePipeline.from_artifacts("runs/demo", views=8).run([jpeg_bytes, ...])``.

    Runs the members in ``models`` (a subset of ``pipeline``'s, in that order), each on the input
    its declaration names, at ``input_sizes[member]`` where given (the size it was trained at).
    """

    def __init__(
        self,
        models: dict[str, torch.nn.Module],
        calibration: Calibration,
        views: int = 8,
        batch_size: int = 16,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        input_sizes: dict[str, int] | None = None,
        pipeline: EnsemblePipeline = LESION_ENSEMBLE,
        crop_margin: float = CROP_MARGIN,
    ) -> None:
        self.crop_margin = crop_margin  # used where run() / views_of() get lesion boxes
        self.models = {name: self.prepare(model) for name, model in models.items()}
        self.backbones = tuple(models)
        # A model trained at a reduced resolution (CPU experiments) is evaluated at that resolution.
        self.pipeline = pipeline.with_input_sizes({b: s for b, s in (input_sizes or {}).items() if b in self.backbones})
        self.inputs: dict[str, Preprocessing] = {b: self.pipeline.member(b).preprocessing for b in self.backbones}
        self.input_sizes = {b: pre.size for b, pre in self.inputs.items()}
        self.calibration = calibration
        self.weights = calibration.weight_vector(self.backbones)
        self.views = check_views(views)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.preprocessings = tuple(dict.fromkeys(self.inputs.values()))

    @classmethod
    def from_artifacts(
        cls,
        artifacts: str | Path,
        views: int = 8,
        backbones: Sequence[str] | None = None,
        calibration: Calibration | None = None,
        pipeline: EnsemblePipeline = LESION_ENSEMBLE,
        **kwargs,
    ) -> "ReferencePipeline":
        """Load ``<artifacts>/<member>/checkpoint.pt`` for ``backbones`` (default: every member of
        ``pipeline``) and (unless given) ``<artifacts>/calibration.json``."""
        artifacts = Path(artifacts)
        models, sizes = {}, {}
        for name in backbones or pipeline.member_names:
            declared = pipeline.member(name).arch
            arch, model, payload = load_checkpoint(artifacts / name / "checkpoint.pt")
            wrong = arch.differences(declared)
            if wrong:
                raise ValueError(f"{artifacts / name / 'checkpoint.pt'} does not hold member {name}'s declared "
                                 f"architecture: {'; '.join(wrong)}")
            models[name] = model
            sizes[name] = trained_input_size(payload, arch)
        calibration = calibration or Calibration.load(artifacts / "calibration.json")
        return cls(models, calibration, views=views, input_sizes=sizes, pipeline=pipeline, **kwargs)

    @staticmethod
    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        """Make one backbone ready to run (eval mode); subclasses with other runtimes override it."""
        return model.eval()

    @torch.inference_mode()
    def backbone_logits(self, name: str, views: np.ndarray) -> np.ndarray:
        """Logits of one backbone over (N*T) x 3 x S x S views, in mini-batches."""
        model = self.models[name]
        chunks = [model(torch.from_numpy(views[i : i + self.batch_size])) for i in range(0, len(views), self.batch_size)]
        return torch.cat(chunks).numpy()

    def run(self, images: Sequence[bytes], boxes: Sequence[Box] | None = None) -> PipelineOutput:
        """Classify encoded images (each cut to its lesion box first where ``boxes`` is given: NO_BOX
        for the whole image); raises ImageDecodeError naming the first bad index."""
        return self.classify_views(self.views_of(images, boxes)[0])

    def views_of(self, images: Sequence[bytes], boxes: Sequence[Box] | None = None
                 ) -> tuple[dict[Preprocessing, np.ndarray], list[tuple[int, int]]]:
        """(the T views of every image per member input, each image's (width, height)); raises
        ImageDecodeError naming the first bad index. ``boxes``: crop each image first (crop_margin)."""
        batch = preprocess_batch_rows(list(images), self.preprocessings, max_pixels=self.max_pixels,
                                      boxes=boxes, margin=self.crop_margin)
        batch.raise_first_error()
        return {pre: make_views(pixels, self.views) for pre, pixels in batch.pixels.items()}, batch.image_sizes

    def classify_views(self, views: dict[Preprocessing, np.ndarray]) -> PipelineOutput:
        """The members, fusion and decision over views_of's views."""
        logits = [self.backbone_logits(b, views[self.inputs[b]]) for b in self.backbones]
        probs, backbone_probs = fuse(logits, self.weights, self.views)
        labels, fired = self.calibration.decide(probs, self.pipeline.class_names)
        return PipelineOutput(probs, backbone_probs, [self.pipeline.class_names[i] for i in labels], fired)


@dataclass
class Explanation:
    """Heatmaps of one method for a batch: per image the fused map (its height x width, in [0, 1])
    and each member's, and the class each image's maps explain."""

    method: str
    classes: list[str]
    maps: list[np.ndarray]
    member_maps: list[dict[str, np.ndarray]]


def _explain_member(pipeline: "ReferencePipeline", name: str, views: np.ndarray, classes: list[int],
                    methods: Sequence[str], oracle: bool) -> dict[str, np.ndarray]:
    """One member's per-view maps (N*T x S x S) per method: the closed form (as exported; one forward
    gives every method) or pytorch-grad-cam (one gradient pass per method)."""
    from lesionserve.explain import CAM_METHODS, explained, view_maps

    model, size, t = pipeline.models[name], pipeline.input_sizes[name], pipeline.views
    if not oracle:
        with torch.inference_mode():
            cams = torch.cat([explained(model)(torch.from_numpy(views[i:i + pipeline.batch_size]))[1]
                              for i in range(0, len(views), pipeline.batch_size)]).numpy()
        return {m: view_maps(cams[:, CAM_METHODS.index(m)], np.asarray(classes), t, size) for m in methods}
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus  # the oracle: real gradients
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model
    for part in pipeline.pipeline.member(name).arch.cam_layer.split("."):
        layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    rows = np.repeat(classes, t)
    maps = {}
    for method in methods:
        out = []
        with {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method](model=model, target_layers=[layer]) as cam:
            for i in range(0, len(views), pipeline.batch_size):
                chunk = torch.from_numpy(views[i:i + pipeline.batch_size])
                out.append(cam(input_tensor=chunk, targets=[ClassifierOutputTarget(int(c)) for c in rows[i:i + len(chunk)]]))
        maps[method] = np.concatenate(out)
    return maps


def explain(pipeline: "ReferencePipeline", images: Sequence[bytes], method: str = "gradcam",
            classes: Sequence[str | None] | None = None, oracle: bool = False) -> tuple[PipelineOutput, Explanation]:
    """Classify ``images`` and explain each: for its predicted label, or ``classes[i]`` where given.

    ``oracle=False`` computes the maps as the exported graphs do (lesionserve.explain's closed form);
    ``oracle=True`` with pytorch-grad-cam's gradients at each architecture's pooling input. Both
    then go through the same fusion (explain.fuse_view_maps), so they must agree.
    """
    result, explanations = explain_methods(pipeline, images, (method,), classes, oracle)
    return result, explanations[method]


def explain_methods(pipeline: "ReferencePipeline", images: Sequence[bytes], methods: Sequence[str],
                    classes: Sequence[str | None] | None = None,
                    oracle: bool = False) -> tuple[PipelineOutput, dict[str, Explanation]]:
    """explain() for several methods at once: the images are decoded and classified once and, in
    closed form, each member runs once for all the methods."""
    from lesionserve.explain import CAM_METHODS, explanation_classes, fuse_view_maps

    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown explanation method {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"methods: {', '.join(CAM_METHODS)}")
    images = list(images)
    names = list(classes) if classes is not None else [None] * len(images)
    if len(names) != len(images):
        raise ValueError(f"{len(names)} classes for {len(images)} images")
    views, sizes = pipeline.views_of(images)  # decoded once, for the classification and the maps
    result = pipeline.classify_views(views)
    index = explanation_classes(names, result.labels, pipeline.pipeline.class_names)
    per_member = [_explain_member(pipeline, b, views[pipeline.inputs[b]], index, methods, oracle)
                  for b in pipeline.backbones]
    explanations = {}
    for method in methods:
        fused, by_member = fuse_view_maps([maps[method] for maps in per_member], pipeline.weights, pipeline.views, sizes)
        explanations[method] = Explanation(method, [pipeline.pipeline.class_names[i] for i in index], fused,
                                           [dict(zip(pipeline.backbones, maps)) for maps in by_member])
    return result, explanations
