"""Evaluate a trained ensemble on the validation or test split: the seed's ablation, row by row.

    python -m training.evaluate --artifacts runs/exp --split test --views 8

Models go through ``lesionserve.reference.ReferencePipeline`` (the served preprocessing, views,
fusion and decision rule, at each backbone's serving input size), so these numbers are the
pipeline's numbers. The report has one row per stage, side by side:

* each single model: T=1 (identity view), argmax of its softmax
* ensemble:          T=1, weighted fusion (``calibration.json`` weights), argmax
* + TTA:             T views, fused, argmax
* + thresholds:      T views, fused, ``Calibration.decide`` (argmax, then AKIEC / MEL thresholds)

All rows come from two pipeline passes per image (T=1 and T views), and the single-model rows
are the per-backbone probabilities of the T=1 pass. Metrics: balanced accuracy (BACC) with a
seeded percentile bootstrap 95% interval (images resampled; every row uses the same resamples),
malignant BACC (mean sensitivity of MEL, BCC, AKIEC), per-class sensitivity / specificity and
one-vs-rest ROC AUC (macro mean).

Images come from the split file (default ``<artifacts>/splits.csv``, written by
``training.splits`` / training). Outputs in --out (default ``<artifacts>/eval_<split>``):
``metrics.json``, ``report.md``, ``confusion_matrix.png`` (+ thresholds row), ``roc.png``
(fused T-view probabilities) and ``predictions.csv`` (one line per image).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from lesionserve.calibration import Calibration
from lesionserve.spec import ALLOWED_VIEWS, BACKBONE_NAMES, CLASS_NAMES, NUM_CLASSES, backbone_arg, check_views, get_backbone
from lesionserve.training.data import Sample, class_counts
from lesionserve.training.metrics import (
    MALIGNANT_CLASSES,
    bootstrap_confusions,
    confusion_matrix,
    malignant_from_recall,
    one_vs_rest_auc,
    percentile_interval,
    recall_from_confusions,
    roc_curve,
    sensitivity_specificity_from_confusion,
)
from lesionserve.training.reports import fmt, fmt_ci, markdown_table, plot_confusion, plot_roc

SPLITS_FILENAME = "splits.csv"
CALIBRATION_FILENAME = "calibration.json"
METRICS_FILENAME = "metrics.json"
REPORT_FILENAME = "report.md"
CONFUSION_FILENAME = "confusion_matrix.png"
ROC_FILENAME = "roc.png"
PREDICTIONS_FILENAME = "predictions.csv"
EVAL_SPLITS: tuple[str, ...] = ("val", "test")
DEFAULT_CHUNK = 8  # images per pipeline call: bounds memory (T views x 3 sizes) and paces the progress bar


class EvaluationError(ValueError):
    """The artifacts, split file or options cannot be evaluated; the message says what to fix."""


# ------------------------------------------------------------------------------------------ inputs


def available_backbones(artifacts: str | Path) -> list[str]:
    """Backbones with ``<artifacts>/<backbone>/checkpoint.pt``, in BACKBONE_NAMES order."""
    artifacts = Path(artifacts)
    return [b for b in BACKBONE_NAMES if (artifacts / b / "checkpoint.pt").is_file()]


@dataclass
class EvalSet:
    """The images to score and where they came from."""

    samples: list[Sample]
    source: str  # human-readable origin (split file path, or the fallback used)
    lesion_overlap: dict[str, int]  # other split -> lesions shared with the evaluated one (0 = clean)
    image_overlap: dict[str, int]  # other split -> images shared with the evaluated one


def evaluation_samples(artifacts: str | Path, split: str, splits_file: str | Path | None = None) -> EvalSet:
    """Samples of ``split`` from the split file (default ``<artifacts>/splits.csv``).

    Without any split file, ``split="val"`` falls back to the validation split recorded in the
    first backbone's ``config.json`` (``training.data.validation_samples``); ``test`` has no
    fallback, because a test set rebuilt from a training config cannot be shown to be unseen.
    """
    from lesionserve.training.data import validation_samples
    from lesionserve.training.splits import read_splits

    if split not in EVAL_SPLITS:
        raise EvaluationError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    artifacts = Path(artifacts)
    path = Path(splits_file) if splits_file is not None else artifacts / SPLITS_FILENAME
    if not path.is_file():
        if splits_file is not None:
            raise EvaluationError(f"split file not found: {path}")
        configs = [artifacts / b / "config.json" for b in available_backbones(artifacts)]
        if split == "val" and configs and configs[0].is_file():
            config = json.loads(configs[0].read_text())
            return EvalSet(validation_samples(config), f"validation split of {configs[0]} (no {path.name})", {}, {})
        raise EvaluationError(
            f"no split file at {path}; pass --splits FILE (python -m training.splits --data DATA --out FILE "
            "writes one; use the file the models were trained with)"
        )
    splits = read_splits(path)
    if not splits.get(split):
        raise EvaluationError(f"split file {path} has no {split!r} rows (made with a {split} fraction of 0?)")
    chosen = splits[split]
    lesions = {s.lesion_id for s in chosen if s.lesion_id}
    images = {s.image_id for s in chosen}
    lesion_overlap, image_overlap = {}, {}
    for name, members in splits.items():
        if name != split:
            lesion_overlap[name] = len(lesions & {s.lesion_id for s in members if s.lesion_id})
            image_overlap[name] = len(images & {s.image_id for s in members})
    return EvalSet(chosen, str(path), lesion_overlap, image_overlap)


# ------------------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Everything the report rows need, from one T=1 and one T-view pass."""

    backbones: tuple[str, ...]
    views: int
    single: np.ndarray  # N x B x 7 per-backbone softmax at T=1
    ensemble: np.ndarray  # N x 7 fused at T=1
    tta: np.ndarray  # N x 7 fused over T views
    decided: np.ndarray  # N final labels (Calibration.decide on tta)
    fired: np.ndarray  # N x 7 thresholds fired


def predict(pipeline: Any, samples: Sequence[Sample], chunk_size: int = DEFAULT_CHUNK,
            progress: bool = True) -> Predictions:
    """Run ``pipeline`` (a ReferencePipeline at T views) and its T=1 twin over ``samples`` in chunks."""
    from lesionserve.reference import ReferencePipeline

    views = pipeline.views
    # The T=1 twin shares the loaded models: no second copy of the weights.
    single_view = pipeline if views == 1 else ReferencePipeline(
        pipeline.models, pipeline.calibration, views=1, batch_size=pipeline.batch_size, max_pixels=pipeline.max_pixels
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("single", "ensemble", "tta", "decided", "fired")}
    with tqdm(total=len(samples), desc=f"evaluating (T=1 and T={views})", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for start in range(0, len(samples), chunk_size):
            chunk = samples[start:start + chunk_size]
            images = [Path(s.path).read_bytes() for s in chunk]
            one = single_view.run(images)
            many = one if views == 1 else pipeline.run(images)
            decided, fired = pipeline.calibration.decide(many.probs)
            for key, value in (("single", one.backbone_probs), ("ensemble", one.probs), ("tta", many.probs),
                               ("decided", decided), ("fired", fired)):
                parts[key].append(np.asarray(value))
            bar.update(len(chunk))
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Predictions(tuple(pipeline.backbones), views, **joined)


@dataclass(frozen=True)
class RowSpec:
    """One report row: how its predictions were made."""

    key: str  # stable id across seeds: "single:<backbone>", "ensemble", "tta", "thresholds"
    title: str
    views: int
    fusion: str
    decision: str


def report_rows(pred: Predictions) -> list[tuple[RowSpec, np.ndarray, np.ndarray]]:
    """(row, predicted labels N, scores N x 7) for each row; duplicate stages are left out.

    The ensemble row needs 2+ backbones and the TTA row T > 1; otherwise they equal a row above.
    """
    rows = []
    for b, name in enumerate(pred.backbones):
        scores = pred.single[:, b]
        rows.append((RowSpec(f"single:{name}", name, 1, "-", "argmax"), scores.argmax(axis=1), scores))
    if len(pred.backbones) > 1:
        rows.append((RowSpec("ensemble", "ensemble", 1, "weighted", "argmax"), pred.ensemble.argmax(axis=1),
                     pred.ensemble))
    if pred.views > 1:
        rows.append((RowSpec("tta", "+ TTA", pred.views, "weighted", "argmax"), pred.tta.argmax(axis=1), pred.tta))
    rows.append((RowSpec("thresholds", "+ thresholds", pred.views, "weighted", "thresholds"), pred.decided,
                 pred.tta))
    return rows


# ----------------------------------------------------------------------------------------- metrics


def _clean(value: Any) -> Any:
    """NaN -> None, numpy -> Python: strict JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def score(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
          confidence: float = 0.95) -> dict[str, Any]:
    """Metrics of one row. Intervals are percentile bootstrap over images (None when n_boot is 0)."""
    cm = confusion_matrix(y_true, y_pred, NUM_CLASSES)
    sensitivity, specificity = sensitivity_specificity_from_confusion(cm)
    present = ~np.isnan(sensitivity)
    bacc = float(sensitivity[present].mean()) if present.any() else float("nan")
    auc = one_vs_rest_auc(y_true, scores, NUM_CLASSES)
    result: dict[str, Any] = {
        "balanced_accuracy": bacc,
        "balanced_accuracy_ci": None,
        "malignant_balanced_accuracy": malignant_from_recall(sensitivity),
        "malignant_balanced_accuracy_ci": None,
        "accuracy": float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan"),
        "macro_auc": float(np.nanmean(auc)) if (~np.isnan(auc)).any() else float("nan"),
        "auc": dict(zip(CLASS_NAMES, auc)),
        "sensitivity": dict(zip(CLASS_NAMES, sensitivity)),
        "specificity": dict(zip(CLASS_NAMES, specificity)),
        "confusion_matrix": cm,
    }
    if n_boot > 0:
        recall = recall_from_confusions(bootstrap_confusions(y_true, y_pred, n_boot, seed, NUM_CLASSES))
        with np.errstate(all="ignore"):
            baccs = np.nanmean(recall, axis=1)
        malignant = np.array([malignant_from_recall(r) for r in recall])
        result["balanced_accuracy_ci"] = list(percentile_interval(baccs, confidence))
        result["malignant_balanced_accuracy_ci"] = list(percentile_interval(malignant, confidence))
    return result


# ------------------------------------------------------------------------------------------ report


def _training_sizes(artifacts: Path, backbones: Sequence[str]) -> dict[str, int | None]:
    sizes = {}
    for b in backbones:
        config = artifacts / b / "config.json"
        try:
            sizes[b] = int(json.loads(config.read_text()).get("input_size"))
        except (OSError, ValueError, TypeError):
            sizes[b] = None
    return sizes


def render_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report for an ``evaluate`` result dict."""
    rows = result["rows"]
    counts = result["class_counts"]
    lines = [f"# Evaluation: {result['split']} split", ""]
    lines.append(f"- artifacts: `{result['artifacts']}`")
    lines.append(f"- images: {result['images']} ({result['lesions']} lesions) from {result['source']}")
    lines.append("- per class: " + ", ".join(f"{c} {counts[c]}" for c in CLASS_NAMES))
    overlap = result["lesion_overlap"]
    if overlap:
        shared = {k: v for k, v in overlap.items() if v} | {f"{k} (images)": v for k, v in result["image_overlap"].items() if v}
        lines.append("- lesion-clean: " + ("yes: no lesion or image of this split is in " + "/".join(overlap)
                                           if not shared else "**NO**: shared with " +
                                           ", ".join(f"{k}: {v}" for k, v in shared.items())))
    else:
        lines.append("- lesion-clean: unknown (no split file)")
    backbone_notes = []
    for b in result["backbones"]:
        trained = result["training_input_size"].get(b)
        served = get_backbone(b).input_size
        size = trained if trained is not None else served
        # The reference pipeline evaluates each model at the resolution it was trained at.
        note = f"{b} (weight {result['calibration']['weights'].get(b, float('nan')):.3f}, evaluated at {size}px"
        if size != served:
            note += f"; the committed repository serves {served}px: serve it with `export.assemble --out`, which rewrites the copy for {size}px"
        backbone_notes.append(note + ")")
    lines.append("- backbones: " + "; ".join(backbone_notes))
    thresholds = result["calibration"]["thresholds"]
    lines.append(f"- views: T={result['views']} (dihedral prefix); thresholds: "
                 + (", ".join(f"{k} > {v:.3f}" for k, v in thresholds.items()) or "none")
                 + f" (from {result['calibration']['source']})")
    boot = result["bootstrap"]
    lines.append(f"- intervals: {boot['resamples']} bootstrap resamples of the images, seed {boot['seed']}, "
                 f"{int(boot['confidence'] * 100)}% percentile" if boot["resamples"] else "- intervals: none (--bootstrap 0)")
    lines += ["", "## Ensemble report", ""]
    mal = "/".join(MALIGNANT_CLASSES)
    table = []
    for row in rows:
        table.append([
            row["title"], row["views"], row["fusion"], row["decision"],
            fmt_ci(row["balanced_accuracy"], row["balanced_accuracy_ci"]),
            fmt_ci(row["malignant_balanced_accuracy"], row["malignant_balanced_accuracy_ci"]),
            fmt(row["macro_auc"]), fmt(row["sensitivity"]["MEL"]), fmt(row["specificity"]["MEL"]),
        ])
    lines.append(markdown_table(
        ["model", "T", "fusion", "decision", "BACC [95% CI]", f"malignant BACC ({mal})", "macro AUC",
         "MEL sens", "MEL spec"], table, align="lrllrrrrr"))
    final = rows[-1]
    lines += ["", f"## Per class: {final['title']} (T={final['views']})", ""]
    per_class = [[c, counts[c], fmt(final["sensitivity"][c]), fmt(final["specificity"][c]), fmt(final["auc"][c])]
                 for c in CLASS_NAMES]
    lines.append(markdown_table(["class", "images", "sensitivity", "specificity", "AUC (one-vs-rest)"], per_class))
    lines += ["", f"![confusion matrix]({CONFUSION_FILENAME})", "", f"![ROC curves]({ROC_FILENAME})", ""]
    return "\n".join(lines)


def _write_predictions(path: Path, samples: Sequence[Sample], pred: Predictions) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "label", "predicted", "thresholds_fired", *(f"p_{c}" for c in CLASS_NAMES)])
        for i, s in enumerate(samples):
            fired = "|".join(c for c, f in zip(CLASS_NAMES, pred.fired[i]) if f)
            writer.writerow([s.image_id, CLASS_NAMES[s.label], CLASS_NAMES[int(pred.decided[i])], fired,
                             *(f"{p:.6f}" for p in pred.tta[i])])


def evaluate(
    artifacts: str | Path,
    split: str = "test",
    splits_file: str | Path | None = None,
    views: int = 8,
    backbones: Sequence[str] | None = None,
    out: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    calibration: Calibration | str | Path | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``<artifacts>`` on ``split``; writes the report files to ``out`` and returns the metrics dict.

    ``backbones`` defaults to every backbone with a checkpoint; ``calibration`` (a Calibration or
    a file) defaults to ``<artifacts>/calibration.json``.
    """
    from lesionserve.reference import ReferencePipeline

    started = time.perf_counter()
    artifacts = Path(artifacts)
    if not artifacts.is_dir():
        raise FileNotFoundError(f"artifacts folder not found: {artifacts}")
    views = check_views(views)
    if n_boot < 0:
        raise EvaluationError(f"bootstrap resamples must be >= 0, got {n_boot}")
    backbones = list(backbones) if backbones else available_backbones(artifacts)
    if not backbones:
        raise EvaluationError(f"no <backbone>/checkpoint.pt under {artifacts} (backbones: {', '.join(BACKBONE_NAMES)})")
    for b in backbones:
        get_backbone(b)  # ValueError listing the valid names
    if calibration is None or isinstance(calibration, (str, Path)):
        calibration_path = Path(calibration) if calibration is not None else artifacts / CALIBRATION_FILENAME
        if not calibration_path.is_file():
            raise EvaluationError(f"calibration file not found: {calibration_path} (run python -m training.calibrate "
                                  f"--artifacts {artifacts}, or pass --calibration FILE)")
        calibration_source = str(calibration_path)
        calibration = Calibration.load(calibration_path)
    else:
        calibration_source = "given Calibration"
    eval_set = evaluation_samples(artifacts, split, splits_file)
    samples = eval_set.samples
    out = Path(out) if out is not None else artifacts / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)

    pipeline = ReferencePipeline.from_artifacts(artifacts, views=views, backbones=backbones, calibration=calibration)
    pred = predict(pipeline, samples, chunk_size=chunk_size, progress=progress)
    y_true = np.array([s.label for s in samples], dtype=np.int64)

    rows = []
    for spec, y_pred, scores in report_rows(pred):
        rows.append({"key": spec.key, "title": spec.title, "views": spec.views, "fusion": spec.fusion,
                     "decision": spec.decision, **score(y_true, y_pred, scores, n_boot=n_boot, seed=seed)})
    result = {
        "artifacts": str(artifacts),
        "split": split,
        "source": eval_set.source,
        "images": len(samples),
        "lesions": len({s.lesion_id or f"image:{s.image_id}" for s in samples}),
        "class_counts": class_counts(samples),
        "lesion_overlap": eval_set.lesion_overlap,
        "image_overlap": eval_set.image_overlap,
        "views": views,
        "backbones": list(backbones),
        "training_input_size": _training_sizes(artifacts, backbones),
        "calibration": {
            "source": calibration_source,
            "weights": {b: float(w) for b, w in zip(backbones, calibration.weight_vector(backbones))},
            "thresholds": {k: float(calibration.thresholds[k]) for k in calibration.threshold_order},
        },
        "bootstrap": {"resamples": n_boot, "seed": seed, "confidence": 0.95},
        "rows": rows,
    }
    result["seconds"] = time.perf_counter() - started
    result = _clean(result)

    (out / METRICS_FILENAME).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / REPORT_FILENAME).write_text(render_markdown(result), encoding="utf-8")
    final = rows[-1]
    plot_confusion(final["confusion_matrix"], out / CONFUSION_FILENAME,
                   f"{split}: {final['title']} (T={views}), BACC {fmt(final['balanced_accuracy'])}")
    curves = {}
    for c, name in enumerate(CLASS_NAMES):
        positive = y_true == c
        if positive.any() and (~positive).any():
            fpr, tpr = roc_curve(pred.tta[:, c], positive)
            curves[name] = (fpr, tpr, final["auc"][name])
    plot_roc(curves, out / ROC_FILENAME, f"{split}: fused probabilities, T={views}")
    _write_predictions(out / PREDICTIONS_FILENAME, samples, pred)
    return result


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Score a trained ensemble on the val or test split through the reference pipeline: each "
                    "single model (T=1), the weighted ensemble (T=1), + TTA (T views), + thresholds. Writes "
                    "metrics.json, report.md, confusion_matrix.png, roc.png and predictions.csv.",
        epilog="Example: python -m training.evaluate --artifacts runs/exp --split test --views 8 "
               "(expects runs/exp/<backbone>/checkpoint.pt, runs/exp/calibration.json, runs/exp/splits.csv).",
    )
    parser.add_argument("--artifacts", required=True, type=Path, metavar="DIR",
                        help="folder with <backbone>/checkpoint.pt and calibration.json")
    parser.add_argument("--split", choices=EVAL_SPLITS, default="test", help="which split to score (default: test)")
    parser.add_argument("--splits", type=Path, default=None, metavar="CSV",
                        help="split file (default: DIR/splits.csv; for --split val without one, the validation "
                             "split recorded in the first backbone's config.json)")
    parser.add_argument("--views", type=int, choices=ALLOWED_VIEWS, default=8, help="TTA views T (default: 8)")
    parser.add_argument("--backbones", nargs="+", type=backbone_arg, default=None, metavar="NAME",
                        help=f"backbones to use, of {', '.join(BACKBONE_NAMES)} (default: every one with a checkpoint)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                        help="calibration file (default: DIR/calibration.json)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="report folder (default: DIR/eval_SPLIT)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals; 0 to skip (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N",
                        help=f"images per pipeline call (default: {DEFAULT_CHUNK})")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = evaluate(args.artifacts, split=args.split, splits_file=args.splits, views=args.views,
                          backbones=args.backbones, out=args.out, n_boot=args.bootstrap, seed=args.seed,
                          calibration=args.calibration, chunk_size=args.chunk, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:  # EvaluationError, DatasetError, CalibrationError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for row in result["rows"]:
        print(f"{row['title']:>14} T={row['views']}: BACC {fmt_ci(row['balanced_accuracy'], row['balanced_accuracy_ci'])}"
              f"  malignant {fmt(row['malignant_balanced_accuracy'])}  macro AUC {fmt(row['macro_auc'])}")
    out = args.out or args.artifacts / f"eval_{args.split}"
    print(f"wrote {out / REPORT_FILENAME} and {out / METRICS_FILENAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
