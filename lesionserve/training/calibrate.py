"""Calibrate the ensemble on validation data: fusion weights and class-specific thresholds.

    python -m training.calibrate --artifacts runs/demo --views 8

Weights are proportional to each backbone's validation balanced accuracy (from its metrics.json).
Thresholds follow the seed rule on validation TTA outputs, with the pipeline's single comparison
operator (``lesionserve.calibration.exceeds``): sweep theta over linspace(0.01, 0.99, 199), keep the
HIGHEST theta whose one-vs-rest sensitivity and specificity meet the floors; if none, relax the
specificity floor to 0.50; if still none, use 0.5.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lesionserve.calibration import Calibration, exceeds
from lesionserve.pipelines import GENERATED_PIPELINES, LESION_ENSEMBLE, PIPELINES, EnsemblePipeline, get_pipeline
from lesionserve.segmentation.boxes import CropBoxes
from lesionserve.spec import CLASS_NAMES

THETA_GRID = np.linspace(0.01, 0.99, 199)
FALLBACK_THETA = 0.5
RELAXED_SPECIFICITY = 0.50
CHUNK = 8  # images per reference-pipeline call: bounds memory and paces the progress bar


@dataclass(frozen=True)
class ThresholdRule:
    """Floors for one thresholded class, in decision order (later classes win)."""

    name: str
    min_sensitivity: float
    min_specificity: float


#: The seed's clinical targets: AKIEC applied first, MEL last so MEL wins.
DEFAULT_RULES = (ThresholdRule("AKIEC", 0.75, 0.70), ThresholdRule("MEL", 0.85, 0.85))


def sensitivity_specificity(scores: np.ndarray, positive: np.ndarray, theta: float) -> tuple[float, float]:
    """One-vs-rest sensitivity and specificity of the decision ``exceeds(score, theta)``."""
    predicted = exceeds(scores, theta)
    pos, neg = positive.sum(), (~positive).sum()
    sens = float((predicted & positive).sum() / pos) if pos else float("nan")
    spec = float((~predicted & ~positive).sum() / neg) if neg else float("nan")
    return sens, spec


def select_threshold(
    scores: np.ndarray, positive: np.ndarray, min_sensitivity: float, min_specificity: float, grid: np.ndarray = THETA_GRID
) -> tuple[float, str]:
    """The highest theta on ``grid`` meeting both floors; returns (theta, how it was chosen)."""
    positive = positive.astype(bool)
    for floor, how in ((min_specificity, "met"), (RELAXED_SPECIFICITY, "relaxed specificity to 0.50")):
        ok = [t for t in grid if _meets(scores, positive, t, min_sensitivity, floor)]
        if ok:
            return float(max(ok)), how
    return FALLBACK_THETA, "fallback 0.5 (no theta met the floors)"


def _meets(scores: np.ndarray, positive: np.ndarray, theta: float, min_sens: float, min_spec: float) -> bool:
    sens, spec = sensitivity_specificity(scores, positive, theta)
    return sens >= min_sens and spec >= min_spec


def fusion_weights(balanced_accuracies: dict[str, float]) -> dict[str, float]:
    """w_m = BACC_m / sum(BACC); equal weights if every BACC is zero."""
    total = sum(balanced_accuracies.values())
    if total <= 0:
        return {k: 1.0 / len(balanced_accuracies) for k in balanced_accuracies}
    return {k: v / total for k, v in balanced_accuracies.items()}


def calibrate_thresholds(
    probs: np.ndarray, labels: np.ndarray, rules: tuple[ThresholdRule, ...] = DEFAULT_RULES
) -> tuple[dict[str, float], dict[str, str]]:
    """Thresholds per rule from fused validation probabilities (N x 7) and true label indices (N)."""
    thresholds, notes = {}, {}
    for rule in rules:
        c = CLASS_NAMES.index(rule.name)
        thresholds[rule.name], notes[rule.name] = select_threshold(
            probs[:, c], labels == c, rule.min_sensitivity, rule.min_specificity
        )
    return thresholds, notes


def calibrate(
    artifacts: str | Path,
    views: int = 8,
    rules: tuple[ThresholdRule, ...] = DEFAULT_RULES,
    backbones: Sequence[str] | None = None,
    pipeline: EnsemblePipeline = LESION_ENSEMBLE,
) -> Calibration:
    """Compute and write ``<artifacts>/calibration.json`` from the members' validation data.

    ``backbones``: the members to fuse (default: every member of ``pipeline``).
    """
    backbones = tuple(backbones or pipeline.member_names)
    from lesionserve.reference import ReferencePipeline
    from lesionserve.training.data import validation_samples

    artifacts = Path(artifacts)
    baccs = {}
    for name in backbones:
        metrics = json.loads((artifacts / name / "metrics.json").read_text())
        baccs[name] = float(metrics["val_balanced_accuracy"])
    weights = fusion_weights(baccs)
    # The backbones share one validation split (same data, fraction and seed); read it from the first.
    config = json.loads((artifacts / backbones[0] / "config.json").read_text())
    samples = validation_samples(config)
    crops = CropBoxes.of_training(config)  # crop-trained members are calibrated on the crops they classify
    # Thresholds are chosen on the fused outputs these weights produce, before any threshold exists.
    pipeline = ReferencePipeline.from_artifacts(
        artifacts, views=views, backbones=backbones, calibration=Calibration(weights=weights), pipeline=pipeline,
        **({"crop_margin": crops.margin} if crops else {}),
    )
    chunks = [samples[i : i + CHUNK] for i in range(0, len(samples), CHUNK)]
    probs = []
    for chunk in tqdm(chunks, desc=f"validation TTA x{views}" + (" on lesion crops" if crops else ""), unit="batch", file=sys.stderr):
        images = [Path(s.path).read_bytes() for s in chunk]
        probs.append(pipeline.run(images, crops.boxes_of([s.image_id for s in chunk], images) if crops else None).probs)
    probs = np.concatenate(probs)
    labels = np.array([s.label for s in samples])
    thresholds, notes = calibrate_thresholds(probs, labels, rules)  # rules name classes of CLASS_NAMES
    calibration = Calibration(
        weights=weights,
        thresholds=thresholds,
        threshold_order=tuple(r.name for r in rules),
        meta={
            "val_balanced_accuracy": baccs,
            "views": views,
            "validation_images": len(samples),
            "threshold_selection": notes,
            "rules": [r.__dict__ for r in rules],
            "operator": "p > theta",
            "crop_boxes": crops and str(crops.path),
        },
    )
    calibration.save(artifacts / "calibration.json")
    return calibration


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="folder with <backbone>/{checkpoint.pt,metrics.json,config.json}")
    parser.add_argument("--views", type=int, default=8, choices=(1, 2, 4, 8), help="TTA views (default %(default)s)")
    parser.add_argument("--pipeline", default=LESION_ENSEMBLE.name, choices=sorted({**PIPELINES, **GENERATED_PIPELINES}),
                        help="the declared pipeline the artifacts are for (default %(default)s)")
    parser.add_argument("--backbones", nargs="+", metavar="NAME",
                        help="members to fuse (default: every member of the pipeline)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    pipeline = get_pipeline(args.pipeline)
    unknown = sorted(set(args.backbones or ()) - set(pipeline.member_names))
    if unknown:
        parser.error(f"{', '.join(unknown)}: not a member of {pipeline.name}; members: {', '.join(pipeline.member_names)}")
    c = calibrate(args.artifacts, views=args.views, backbones=args.backbones, pipeline=pipeline)
    print("fusion weights: " + ", ".join(f"{k} {v:.3f}" for k, v in c.weights.items()))
    for name in c.threshold_order:
        print(f"threshold {name}: {c.thresholds[name]:.3f} ({c.meta['threshold_selection'][name]})")
    print(f"wrote {Path(args.artifacts) / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
