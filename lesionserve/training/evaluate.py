"""Evaluate a trained ensemble on a split or on any labelled dataset: the seed's ablation, row by row.

    python -m training.evaluate --artifacts runs/exp --split test --views 8
    python -m training.evaluate --artifacts runs/exp --data DIR [--layout isic2018|ham10000|folders]

Models go through ``lesionserve.reference.ReferencePipeline`` (the served preprocessing, views,
fusion and decision rule, each backbone at the input size it was trained at), so these numbers are the
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

Images come from one of:

* ``--split val|test``: that part of the split file (default ``<artifacts>/splits.csv``, written
  by ``training.splits`` / training), checked against the file's other parts.
* ``--data DIR``: every labelled image of a dataset in any ``training.data.load_dataset`` layout
  (detected unless ``--layout``), e.g. the official ISIC 2018 Task 3 test set. The lesion-clean
  check compares it with the train and val splits the artifacts were trained and selected on:
  the split file each backbone's ``config.json`` (or checkpoint ``config``) records. It compares
  image ids, and lesion ids too where both sides have them, and says which it could do.

Outputs in --out (default ``<artifacts>/eval_<split>`` or ``<artifacts>/eval_<data folder name>``):
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from lesionserve import prog
from lesionserve.calibration import Calibration
from lesionserve.cropping import CROP_MARGIN, NO_BOX
from lesionserve.pipelines import GENERATED_PIPELINES, LESION_ENSEMBLE, PIPELINES, EnsemblePipeline, get_pipeline
from lesionserve.spec import ALLOWED_VIEWS, CLASS_NAMES, NUM_CLASSES, check_views
from lesionserve.training.data import ISIC_SPLITS, LAYOUTS, Sample, class_counts
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

def backbone_arg(value: str) -> str:
    """argparse ``type=`` for a member name: the error lists the valid names."""
    known = {m for p in (*PIPELINES.values(), *GENERATED_PIPELINES.values()) for m in p.member_names}
    if value not in known:
        raise argparse.ArgumentTypeError(f"unknown backbone {value!r}; choose one of {', '.join(sorted(known))}")
    return value


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


def available_backbones(artifacts: str | Path, pipeline: EnsemblePipeline = LESION_ENSEMBLE) -> list[str]:
    """Members of ``pipeline`` with ``<artifacts>/<member>/checkpoint.pt``, in declaration order."""
    artifacts = Path(artifacts)
    return [b for b in pipeline.member_names if (artifacts / b / "checkpoint.pt").is_file()]


@dataclass
class EvalSet:
    """The images to score, where they came from, and what they were checked against."""

    samples: list[Sample]
    source: str  # human-readable origin (split file path, or the dataset and its layout)
    lesion_overlap: dict[str, int | None]  # compared split -> lesions shared with them (None: not compared)
    image_overlap: dict[str, int]  # compared split -> images shared with them
    lesion_clean: dict[str, Any] = field(default_factory=dict)  # the full check (``compare_ids``)
    layout: str | None = None  # dataset layout (--data) or None (split file)


def compare_ids(samples: Sequence[Sample], splits: Mapping[str, Sequence[Sample]], names: Sequence[str],
                leaks: Sequence[str]) -> dict[str, Any]:
    """The image ids (and lesion ids, where both sides have them) ``samples`` share with each ``splits[name]``.

    ``leaks``: the names whose overlap makes the evaluation unclean (the others are only counted).
    Returns ``check`` ("image and lesion ids" or "image ids only"), ``why`` that check,
    ``clean`` (no shared image or lesion with a ``leaks`` split) and per split ``overlap``:
    shared ``images`` / ``lesions`` (None when lesions are not compared), the split's size and
    a few shared ids.
    """
    images = {s.image_id for s in samples}
    lesions = {s.lesion_id for s in samples if s.lesion_id}
    with_lesion = sum(1 for s in samples if s.lesion_id)
    split_lesions = {n: {s.lesion_id for s in splits.get(n, ()) if s.lesion_id} for n in names}
    unseen = "; another photograph of a compared lesion would go unnoticed"
    if not lesions:
        check, why = "image ids only", "the evaluated images carry no lesion ids" + unseen
    elif not any(split_lesions.values()):
        check, why = "image ids only", "the compared splits list no lesion ids" + unseen
    else:
        check = "image and lesion ids"
        why = f"{with_lesion} of {len(samples)} evaluated images and the compared splits carry lesion ids"
        if with_lesion < len(samples):
            why += "; the others are compared by image id only"
    overlap: dict[str, dict[str, Any]] = {}
    for name in names:
        members = splits.get(name, ())
        shared = sorted(images & {s.image_id for s in members})
        shared_lesions = sorted(lesions & split_lesions[name]) if check == "image and lesion ids" else None
        overlap[name] = {
            "images": len(shared),
            "lesions": None if shared_lesions is None else len(shared_lesions),
            "split_images": len({s.image_id for s in members}),
            "split_lesions": len(split_lesions[name]),
            "examples": shared[:5] or (shared_lesions or [])[:5],
        }
    clean = not any(overlap[n]["images"] or overlap[n]["lesions"] for n in leaks if n in overlap)
    return {"check": check, "why": why, "clean": clean, "compared": list(names), "leaks": list(leaks),
            "overlap": overlap}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class SplitSource(NamedTuple):
    """Where a run's split file is: ``path`` (None when unknown), ``note`` saying how it was found
    (or why not), and ``moved`` when the recorded path was gone and a copy in the artifacts was used."""

    path: Path | None
    note: str
    moved: bool = False


def recorded_split_file(artifacts: str | Path, backbone: str) -> SplitSource:
    """The split file ``<artifacts>/<backbone>`` was trained with.

    Read from the run's ``config.json`` (``splits``: the file ``training.splits`` wrote), else from
    the ``config`` entry of its ``checkpoint.pt``. A recorded path that no longer exists is looked
    for under the same name in ``artifacts`` (a moved artifacts folder).
    """
    artifacts = Path(artifacts)
    run = artifacts / backbone
    config, origin = _read_json(run / "config.json"), f"{backbone}/config.json"
    if config is None and (run / "checkpoint.pt").is_file():
        import torch

        # weights_only=False: the config entry holds plain Python values; the file is a training output.
        payload = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        config = payload.get("config") if isinstance(payload, dict) else None
        origin = f"{backbone}/checkpoint.pt (its config entry)"
    if not config:
        return SplitSource(None, f"{backbone} has no readable config.json and its checkpoint.pt holds no config")
    recorded = config.get("splits")
    if not recorded:
        return SplitSource(None, f"{origin} records no split file (a run from before lesion-grouped split files)")
    path = Path(recorded)
    if path.is_file():
        return SplitSource(path, f"recorded in {origin}")
    local = artifacts / path.name
    if local.is_file():
        return SplitSource(local, f"{origin} records {path}, which is gone; used {local.name} in the artifacts "
                                  "folder", moved=True)
    return SplitSource(None, f"{origin} records split file {path}, which is not there (nor {local})")


def _count_note(artifacts: Path, backbone: str, splits: Mapping[str, Sequence[Sample]]) -> str | None:
    """A warning when the run's metrics.json image counts differ from the split file's."""
    metrics = _read_json(artifacts / backbone / "metrics.json")
    if metrics is None:
        return None
    differ = [f"{name} {len(splits.get(name, ()))} in the file, {metrics[key]} in metrics.json"
              for name, key in (("train", "train_samples"), ("val", "val_samples"))
              if isinstance(metrics.get(key), int) and metrics[key] != len(splits.get(name, ()))]
    if not differ:
        return None
    return f"{backbone}: image counts differ ({'; '.join(differ)}): the file may not be this run's split"


def training_overlap(artifacts: str | Path, backbones: Sequence[str], samples: Sequence[Sample]) -> dict[str, Any]:
    """The lesion-clean check of an external evaluation set against the artifacts' own splits.

    ``compare_ids`` against the train and val splits each backbone was trained and selected with
    (``recorded_split_file``); their test split is counted too, but is no leak. Adds ``against``
    (the split files read) and ``notes``. ``check`` is "none" (``clean`` None) when no backbone's
    split could be read; ``clean`` is None when some could not and the others show no overlap.
    """
    from lesionserve.training.splits import read_splits

    artifacts = Path(artifacts)
    files: dict[Path, list[str]] = {}
    notes: list[str] = []
    unresolved: list[str] = []
    for backbone in backbones:
        source = recorded_split_file(artifacts, backbone)
        if source.path is None:
            unresolved.append(backbone)
        if source.path is None or source.moved:
            notes.append(source.note)
        if source.path is not None:
            files.setdefault(source.path.resolve(), []).append(backbone)
    union: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    read: list[str] = []
    for path, users in files.items():
        try:
            splits = read_splits(path, check_files=False)
        except (OSError, ValueError) as exc:
            unresolved += users
            notes.append(f"cannot read the split file of {', '.join(users)}: {exc}")
            continue
        read.append(str(path))
        notes += [n for n in (_count_note(artifacts, b, splits) for b in users) if n]
        for name in union:
            union[name].extend(splits.get(name, ()))
    if not read:
        return {"check": "none", "why": "; ".join(notes) or "no backbones", "clean": None, "compared": [],
                "leaks": [], "overlap": {}, "against": [], "notes": notes}
    names = ("train", "val", "test") if union["test"] else ("train", "val")
    result = compare_ids(samples, union, names, leaks=("train", "val"))
    if unresolved and result["clean"]:
        result["clean"] = None
        result["why"] += f"; not checked for {', '.join(unresolved)}"
    result.update(against=read, notes=notes)
    return result


def _split_file_of(artifacts: Path, splits_file: str | Path | None,
                   backbones: Sequence[str] | None = None) -> tuple[Path, str | None]:
    """The split file for --split mode, and a note when it is not the given or default one."""
    if splits_file is not None:
        return Path(splits_file), None
    default = artifacts / SPLITS_FILENAME
    if default.is_file():
        return default, None
    for backbone in backbones or available_backbones(artifacts):
        source = recorded_split_file(artifacts, backbone)
        if source.path is not None:
            return source.path, f"no {SPLITS_FILENAME} in the artifacts folder; split file {source.note}"
    return default, None


def evaluation_samples(artifacts: str | Path, split: str, splits_file: str | Path | None = None,
                       backbones: Sequence[str] | None = None) -> EvalSet:
    """Samples of ``split`` from a split file, checked against the file's other splits.

    The split file is ``splits_file``, else ``<artifacts>/splits.csv``, else the one the first
    backbone's run recorded (``recorded_split_file``).
    """
    from lesionserve.training.splits import read_splits

    if split not in EVAL_SPLITS:
        raise EvaluationError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    artifacts = Path(artifacts)
    path, note = _split_file_of(artifacts, splits_file, backbones)
    if not path.is_file():
        if splits_file is not None:
            raise EvaluationError(f"split file not found: {path}")
        raise EvaluationError(
            f"no split file at {path}; pass --splits FILE (python -m training.splits --data DATA --out FILE "
            "writes one; use the file the models were trained with), or --data DIR to score a whole dataset"
        )
    splits = read_splits(path)
    if not splits.get(split):
        raise EvaluationError(f"split file {path} has no {split!r} rows (made with a {split} fraction of 0?)")
    chosen = splits[split]
    others = [name for name in splits if name != split]
    check = compare_ids(chosen, splits, others, leaks=others)
    check.update(against=[str(path)], notes=[note] if note else [])
    lesion_overlap = {n: check["overlap"][n]["lesions"] or 0 for n in others}
    image_overlap = {n: check["overlap"][n]["images"] for n in others}
    return EvalSet(chosen, str(path), lesion_overlap, image_overlap, check)


def dataset_samples(data: str | Path, layout: str = "auto", isic_split: str | None = None) -> EvalSet:
    """Every labelled image of a dataset in a ``training.data.load_dataset`` layout, for ``--data``.

    An ISIC folder holding several ground-truth sets (the official Training, Validation and Test
    side by side) needs ``isic_split``: scoring them together, or the Training set by default,
    would mix in images the models may have been trained on. The overlap fields are left empty
    for ``evaluate`` to fill with ``training_overlap``, which needs the backbones.
    """
    from lesionserve.training.data import detect_layout, isic_ground_truths, load_dataset

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data path not found: {path}")
    if layout not in LAYOUTS:
        raise EvaluationError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    chosen = detect_layout(path) if layout == "auto" else layout
    if isic_split is not None and chosen != "isic2018":
        raise EvaluationError(f"--isic-split applies to the isic2018 layout only; {path} is read as {chosen}")
    if chosen == "isic2018" and isic_split is None and path.is_dir():
        sets = isic_ground_truths(path)
        if len(sets) > 1:
            names = ", ".join(entry.name for entry in sets.values())
            raise EvaluationError(f"{path} holds several ground-truth sets ({names}); pass --isic-split "
                                  f"{'|'.join(ISIC_SPLITS)} to choose one, or point --data at a folder holding one")
    samples = load_dataset(path, layout=chosen, split=isic_split)
    with_lesion = sum(1 for s in samples if s.lesion_id)
    how = "detected" if layout == "auto" else "given"
    chosen_set = f", {isic_split} set" if isic_split else ""
    source = f"{path} ({chosen} layout, {how}{chosen_set}; lesion ids for {with_lesion} of {len(samples)} images)"
    return EvalSet(samples, source, {}, {}, {}, layout=chosen)


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
            progress: bool = True, crops: Any = None) -> Predictions:
    """Run ``pipeline`` (a ReferencePipeline at T views) and its T=1 twin over ``samples`` in chunks,
    each image cut to its lesion box first where ``crops`` (segmentation.boxes.CropBoxes) is given."""
    from lesionserve.reference import ReferencePipeline

    views = pipeline.views
    # The T=1 twin shares the loaded models: no second copy of the weights.
    single_view = pipeline if views == 1 else ReferencePipeline(
        pipeline.models, pipeline.calibration, views=1, batch_size=pipeline.batch_size, max_pixels=pipeline.max_pixels,
        input_sizes=pipeline.input_sizes, pipeline=pipeline.pipeline,  # the trained sizes, as the T-view pass
        crop_margin=pipeline.crop_margin,
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("single", "ensemble", "tta", "decided", "fired")}
    with tqdm(total=len(samples), desc=f"evaluating (T=1 and T={views})", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for start in range(0, len(samples), chunk_size):
            chunk = samples[start:start + chunk_size]
            images = [Path(s.path).read_bytes() for s in chunk]
            boxes = crops.boxes_of([s.image_id for s in chunk], images) if crops is not None else None
            one = single_view.run(images, boxes)
            many = one if views == 1 else pipeline.run(images, boxes)
            decided, fired = pipeline.calibration.decide(many.probs, pipeline.pipeline.class_names)
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


def lesion_clean_text(check: Mapping[str, Any]) -> str:
    """One line saying whether the evaluated images are lesion-clean, what was compared and why."""
    if not check or check.get("check") == "none":
        why = check.get("why") if check else "no split file"
        return f"unknown: no check was possible ({why})"
    overlap = check["overlap"]
    lesions = check["check"] == "image and lesion ids"

    def count(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    def size(name: str) -> str:
        o = overlap[name]
        return f"{name} ({count(o['split_images'], 'image')}" + (
            f", {count(o['split_lesions'], 'lesion')})" if lesions else ")")

    def shared(name: str) -> str:
        o = overlap[name]
        text = f"{name}: {count(o['images'], 'image')}" + (
            f" / {count(o['lesions'], 'lesion')}" if o["lesions"] is not None else "")
        return text + (f" (e.g. {', '.join(o['examples'])})" if o["examples"] else "")

    def any_shared(name: str) -> bool:
        return bool(overlap[name]["images"] or overlap[name]["lesions"])

    leaks = [n for n in check["leaks"] if n in overlap]
    head = {True: "yes", False: "**NO**", None: "unknown"}[check["clean"]]
    if check["clean"] is False:
        body = "shared with " + ", ".join(shared(n) for n in leaks if any_shared(n))
    else:
        body = f"no evaluated image{' or lesion' if lesions else ''} is in " + ", ".join(size(n) for n in leaks)
    text = f"{head}: {body}; checked {check['check']} ({check['why']})"
    held_out = [n for n in check["compared"] if n not in check["leaks"] and any_shared(n)]
    if held_out:
        text += "; also shared with the held-out " + ", ".join(shared(n) for n in held_out) + " (not a leak)"
    text += f"; split file {', '.join(check['against'])}"
    if check.get("notes"):
        text += "; note: " + "; ".join(check["notes"])
    return text


def render_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report for an ``evaluate`` result dict."""
    rows = result["rows"]
    counts = result["class_counts"]
    title = f"{result['split']} split" if result.get("split") else f"{result['data']} ({result['layout']} layout)"
    lines = [f"# Evaluation: {title}", ""]
    lines.append(f"- artifacts: `{result['artifacts']}`")
    lines.append(f"- images: {result['images']} ({result['lesions']} lesions) from {result['source']}")
    lines.append("- per class: " + ", ".join(f"{c} {counts[c]}" for c in CLASS_NAMES))
    lines.append("- lesion-clean: " + lesion_clean_text(result.get("lesion_clean") or {}))
    backbone_notes = []
    for b in result["backbones"]:
        trained = result["training_input_size"].get(b)
        served = get_pipeline(result.get("pipeline", LESION_ENSEMBLE.name)).member(b).preprocessing.size
        size = trained if trained is not None else served
        # The reference pipeline evaluates each model at the resolution it was trained at.
        note = f"{b} (weight {result['calibration']['weights'].get(b, float('nan')):.3f}, evaluated at {size}px"
        if size != served:
            note += f"; the committed repository serves {served}px: serve it with `export.assemble --out`, which generates a repository for {size}px"
        backbone_notes.append(note + ")")
    lines.append("- backbones: " + "; ".join(backbone_notes))
    crops = result.get("crops") or {}
    lines.append("- input: " + (f"each image cut to its lesion box (+{crops['margin']:g} margin) from `{crops['boxes']}`; "
                                f"lesion found in {crops['found']} of {result['images']}, the others classified whole"
                                if crops.get("boxes") else "whole images")
                 + (f" (the models were trained on {'crops' if crops.get('trained_on_crops') else 'whole images'})"
                    if crops else ""))
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


def default_out(artifacts: str | Path, split: str | None = None, data: str | Path | None = None) -> Path:
    """The report folder when --out is not given: ``<artifacts>/eval_<split>`` or ``<artifacts>/eval_<data name>``."""
    if data is None:
        return Path(artifacts) / f"eval_{split}"
    data = Path(data)
    name = data.stem if data.is_file() else data.resolve().name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"
    return Path(artifacts) / f"eval_{safe}"


def _crops(artifacts: Path, backbones: Sequence[str], crop_boxes: str | Path | None) -> tuple[Any, bool]:
    """(the CropBoxes to cut, or None; whether the members were trained on crops), refusing members
    trained on different crops: their fused outputs would mix two inputs."""
    from lesionserve.segmentation.boxes import CropBoxes

    configs = {b: _read_json(artifacts / b / "config.json") or {} for b in backbones}
    trained = {(c.get("crop_boxes"), c.get("crop_margin") if c.get("crop_boxes") else None) for c in configs.values()}
    if len(trained) > 1:
        raise EvaluationError(f"the members were trained on different inputs ({sorted(map(str, trained))}): "
                              "evaluate them separately with --backbones")
    (trained_boxes, trained_margin), = trained
    if crop_boxes == "auto":
        return (CropBoxes.read(trained_boxes, trained_margin) if trained_boxes else None), bool(trained_boxes)
    if crop_boxes is None:
        return None, bool(trained_boxes)
    return CropBoxes.read(crop_boxes, trained_margin if trained_margin is not None else CROP_MARGIN), bool(trained_boxes)


def evaluate(
    artifacts: str | Path,
    split: str | None = None,
    splits_file: str | Path | None = None,
    views: int = 8,
    backbones: Sequence[str] | None = None,
    out: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    calibration: Calibration | str | Path | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
    data: str | Path | None = None,
    layout: str = "auto",
    isic_split: str | None = None,
    pipeline: EnsemblePipeline = LESION_ENSEMBLE,
    crop_boxes: str | Path | None = "auto",
) -> dict[str, Any]:
    """Evaluate ``<artifacts>``; writes the report files to ``out`` and returns the metrics dict.

    Either ``split`` (default "test") of a split file (``evaluation_samples``), or with ``data``
    every labelled image of that dataset (``dataset_samples``; ``layout`` and ``isic_split`` as in
    ``training.data.load_dataset``), checked against the artifacts' own train and val splits
    (``training_overlap``). ``backbones`` defaults to every backbone with a checkpoint;
    ``calibration`` (a Calibration or a file) defaults to ``<artifacts>/calibration.json``.
    ``pipeline``: the declaration the members belong to. ``crop_boxes``: "auto" cuts the crops the
    members were trained on (none for whole-image models); a boxes file crops with it (at the
    members' training margin, else CROP_MARGIN); None classifies whole images.
    """
    from lesionserve.reference import ReferencePipeline

    started = time.perf_counter()
    artifacts = Path(artifacts)
    if not artifacts.is_dir():
        raise FileNotFoundError(f"artifacts folder not found: {artifacts}")
    if data is not None and (split is not None or splits_file is not None):
        raise EvaluationError("give either a split (split / splits_file) or data, not both")
    if data is None and (layout != "auto" or isic_split is not None):
        raise EvaluationError("layout and isic_split apply to data only")
    split = split or ("test" if data is None else None)
    views = check_views(views)
    if n_boot < 0:
        raise EvaluationError(f"bootstrap resamples must be >= 0, got {n_boot}")
    backbones = list(backbones) if backbones else available_backbones(artifacts, pipeline)
    if not backbones:
        raise EvaluationError(f"no <backbone>/checkpoint.pt under {artifacts} (members of {pipeline.name}: "
                              f"{', '.join(pipeline.member_names)})")
    for b in backbones:
        pipeline.member(b)  # ValueError listing the valid names
    crops, trained_on_crops = _crops(artifacts, backbones, crop_boxes)
    if calibration is None or isinstance(calibration, (str, Path)):
        calibration_path = Path(calibration) if calibration is not None else artifacts / CALIBRATION_FILENAME
        if not calibration_path.is_file():
            raise EvaluationError(f"calibration file not found: {calibration_path} (run python -m training.calibrate "
                                  f"--artifacts {artifacts}, or pass --calibration FILE)")
        calibration_source = str(calibration_path)
        calibration = Calibration.load(calibration_path)
    else:
        calibration_source = "given Calibration"
    if data is None:
        eval_set = evaluation_samples(artifacts, split, splits_file, backbones)
    else:
        eval_set = dataset_samples(data, layout=layout, isic_split=isic_split)
        check = training_overlap(artifacts, backbones, eval_set.samples)
        eval_set.lesion_clean = check
        eval_set.image_overlap = {n: o["images"] for n, o in check["overlap"].items()}
        eval_set.lesion_overlap = {n: o["lesions"] for n, o in check["overlap"].items()}
    samples = eval_set.samples
    label = split if data is None else Path(data).name
    out = Path(out) if out is not None else default_out(artifacts, split, data)
    out.mkdir(parents=True, exist_ok=True)

    declared = pipeline
    pipeline = ReferencePipeline.from_artifacts(artifacts, views=views, backbones=backbones, calibration=calibration,
                                                pipeline=declared, **({"crop_margin": crops.margin} if crops else {}))
    pred = predict(pipeline, samples, chunk_size=chunk_size, progress=progress, crops=crops)
    y_true = np.array([s.label for s in samples], dtype=np.int64)

    rows = []
    for spec, y_pred, scores in report_rows(pred):
        rows.append({"key": spec.key, "title": spec.title, "views": spec.views, "fusion": spec.fusion,
                     "decision": spec.decision, **score(y_true, y_pred, scores, n_boot=n_boot, seed=seed)})
    result = {
        "artifacts": str(artifacts),
        "split": split,
        "data": None if data is None else str(data),
        "layout": eval_set.layout,
        "source": eval_set.source,
        "images": len(samples),
        "lesions": len({s.lesion_id or f"image:{s.image_id}" for s in samples}),
        "class_counts": class_counts(samples),
        "lesion_overlap": eval_set.lesion_overlap,
        "image_overlap": eval_set.image_overlap,
        "lesion_clean": eval_set.lesion_clean,
        "views": views,
        "pipeline": declared.name,
        "backbones": list(backbones),
        "crops": {"boxes": str(crops.path) if crops else None, "margin": crops.margin if crops else None,
                  "found": sum(crops.boxes[s.image_id].box != NO_BOX for s in samples) if crops else None,
                  "trained_on_crops": trained_on_crops},
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
                   f"{label}: {final['title']} (T={views}), BACC {fmt(final['balanced_accuracy'])}")
    curves = {}
    for c, name in enumerate(CLASS_NAMES):
        positive = y_true == c
        if positive.any() and (~positive).any():
            fpr, tpr = roc_curve(pred.tta[:, c], positive)
            curves[name] = (fpr, tpr, final["auc"][name])
    plot_roc(curves, out / ROC_FILENAME, f"{label}: fused probabilities, T={views}")
    _write_predictions(out / PREDICTIONS_FILENAME, samples, pred)
    return result


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m training.evaluate"),
        description="Score a trained ensemble through the reference pipeline, on a split of its split file "
                    "(--split) or on every labelled image of a dataset (--data): each single model (T=1), the "
                    "weighted ensemble (T=1), + TTA (T views), + thresholds. Writes metrics.json, report.md, "
                    "confusion_matrix.png, roc.png and predictions.csv. The report's lesion-clean line says "
                    "whether the scored images share image or lesion ids with the images the models were "
                    "trained and selected on.",
        epilog="Examples: python -m training.evaluate --artifacts runs/exp --split test --views 8 "
               "(expects runs/exp/<backbone>/checkpoint.pt, runs/exp/calibration.json, runs/exp/splits.csv). "
               "python -m training.evaluate --artifacts runs/exp --data ISIC2018_Task3_Test (a folder with "
               "ISIC2018_Task3_Test_Input/ and ISIC2018_Task3_Test_GroundTruth.csv; also HAM10000_metadata.csv + "
               "its image folders, or one folder per class); checked against the split file each backbone's "
               "config.json records.",
    )
    parser.add_argument("--artifacts", required=True, type=Path, metavar="DIR",
                        help="folder with <backbone>/checkpoint.pt and calibration.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=EVAL_SPLITS, default=None,
                        help="which split of the split file to score (default: test)")
    source.add_argument("--data", type=Path, default=None, metavar="PATH",
                        help="score every labelled image of this dataset instead: a folder in the isic2018, "
                             "ham10000 or folders layout, or a HAM10000 metadata CSV")
    parser.add_argument("--splits", type=Path, default=None, metavar="CSV",
                        help="with --split: the split file (default: DIR/splits.csv, else the one recorded in the "
                             "first backbone's config.json)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="with --data: dataset layout (default: auto, detected)")
    parser.add_argument("--isic-split", choices=tuple(ISIC_SPLITS), default=None,
                        help="with --data: which ground-truth set of an ISIC folder holding several "
                             "(ISIC2018_Task3_{Training,Validation,Test}_*)")
    parser.add_argument("--views", type=int, choices=ALLOWED_VIEWS, default=8, help="TTA views T (default: 8)")
    parser.add_argument("--backbones", nargs="+", type=backbone_arg, default=None, metavar="NAME",
                        help="members to use (default: every member of --pipeline with a checkpoint)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                        help="calibration file (default: DIR/calibration.json)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="report folder (default: DIR/eval_SPLIT, or DIR/eval_NAME for --data NAME)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals; 0 to skip (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N",
                        help=f"images per pipeline call (default: {DEFAULT_CHUNK})")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--pipeline", default=LESION_ENSEMBLE.name, choices=sorted({**PIPELINES, **GENERATED_PIPELINES}),
                        help="the declared pipeline the artifacts' members belong to (default %(default)s)")
    crop = parser.add_mutually_exclusive_group()
    crop.add_argument("--crop-boxes", type=Path, default=None, metavar="CSV",
                      help="cut every image to its lesion box from this file (`lesionserve crop-boxes`) before "
                           "classifying (default: the crops the members were trained on, none for whole-image models)")
    crop.add_argument("--no-crop", action="store_true", help="classify whole images, even with crop-trained members")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None and args.splits is not None:
        parser.error("--splits applies to --split; --data is checked against the artifacts' own split files")
    if args.data is None and (args.layout != "auto" or args.isic_split is not None):
        parser.error("--layout and --isic-split apply to --data only")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = evaluate(args.artifacts, split=args.split, splits_file=args.splits, views=args.views,
                          backbones=args.backbones, out=args.out, n_boot=args.bootstrap, seed=args.seed,
                          calibration=args.calibration, chunk_size=args.chunk, progress=not args.no_progress,
                          data=args.data, layout=args.layout, isic_split=args.isic_split,
                          pipeline=get_pipeline(args.pipeline),
                          crop_boxes=None if args.no_crop else (args.crop_boxes or "auto"))
    except (FileNotFoundError, ValueError) as exc:  # EvaluationError, DatasetError, CalibrationError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for row in result["rows"]:
        print(f"{row['title']:>14} T={row['views']}: BACC {fmt_ci(row['balanced_accuracy'], row['balanced_accuracy_ci'])}"
              f"  malignant {fmt(row['malignant_balanced_accuracy'])}  macro AUC {fmt(row['macro_auc'])}")
    print("lesion-clean: " + lesion_clean_text(result["lesion_clean"]).replace("**", ""))
    out = args.out or default_out(args.artifacts, result["split"], args.data)
    print(f"wrote {out / REPORT_FILENAME} and {out / METRICS_FILENAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
