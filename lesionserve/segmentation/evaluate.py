"""Score segmenter checkpoints with ISIC 2018 Task 1's metrics on a lesion-grouped test split and on PH2.

    lesionserve segment-evaluate --checkpoint runs/seg/segmenter/checkpoint.pt \\
        --data ../shared/data/isic-real/ham10000_metadata.csv --masks ../shared/data/isic-real/ham10000_masks.csv \\
        --ph2 ../shared/data/isic-real/ph2_labels.csv
    lesionserve segment-evaluate --checkpoint fold0/checkpoint.pt fold1/checkpoint.pt ...   # fold ensemble

Each image goes through what serving does: the serving preprocessing at the size the checkpoint was
trained at, the U-Net's probabilities (averaged over checkpoints: a fold ensemble), resized to the
original image, thresholded, largest component, holes filled (``postprocess``). Scored per image
against its expert mask at the original size: IoU (Jaccard) and Dice; reported: mean Jaccard, the
Task 1 thresholded Jaccard (IoU < 0.65 counts 0), Dice, the share of failures, beside seed 004's
figures. Writes ``report.md``, ``metrics.json``, ``per_image.csv`` and ``iou_hist.png`` to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lesionserve import prog

#: Seed 004's published figures (ImageNet-pretrained encoder, image-level split; seed-recipes.md).
SEED_FIGURES = {"jaccard (internal)": 0.854, "thresholded jaccard (internal)": 0.784,
                "thresholded jaccard (official validation)": 0.755}


def score_pairs(reference: Any, pairs, name: str, batch_size: int = 8, progress: bool = True) -> list[dict[str, Any]]:
    """Per-image rows: image, IoU, Dice, found, predicted and true area fractions, the lesions
    coming from ``reference`` (a SegmentationReference: what the server computes, in process)."""
    from tqdm import tqdm

    from lesionserve.segmentation.metrics import dice, iou
    from lesionserve.training.masks import read_mask

    rows = []
    with tqdm(total=len(pairs), desc=f"segment {name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            for pair, lesion in zip(chunk, reference.segment([p.sample.path.read_bytes() for p in chunk])):
                truth = read_mask(pair.mask_path, (lesion.mask.shape[1], lesion.mask.shape[0]))
                rows.append({"dataset": name, "image": pair.image_id, "iou": iou(lesion.mask, truth),
                             "dice": dice(lesion.mask, truth), "found": lesion.found,
                             "area": lesion.area_fraction, "true_area": float(truth.mean())})
            bar.update(len(chunk))
    return rows


def plot_iou_hist(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Histogram of per-image IoU per dataset, the Task 1 cut marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lesionserve.segmentation.metrics import TASK1_CUT

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    figure = Figure(figsize=(5 * len(datasets), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    for i, name in enumerate(datasets):
        axis = figure.add_subplot(1, len(datasets), i + 1)
        values = [r["iou"] for r in rows if r["dataset"] == name]
        axis.hist(values, bins=np.linspace(0, 1, 41), color="tab:blue")
        axis.axvline(TASK1_CUT, color="tab:red", linestyle="--", label=f"Task 1 cut {TASK1_CUT}")
        axis.set(title=f"{name}: per-image IoU ({len(values)} images)", xlabel="IoU", ylabel="images")
        axis.legend(fontsize=8)
    figure.savefig(path, format="png")


def render_report(summaries: dict[str, dict[str, float]], context: dict[str, Any]) -> str:
    lines = ["# Segmenter evaluation (ISIC 2018 Task 1 metrics)", ""] + [f"- {k}: {v}" for k, v in context.items()] + [
        "", "| set | images | Jaccard | thresholded Jaccard | Dice | IoU < 0.65 | not found |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['images']} | {s['jaccard']:.3f} | {s['thresholded_jaccard']:.3f} | {s['dice']:.3f} | "
                     f"{s['failed_fraction']:.1%} | {s['not_found']} |")
    lines += ["", "Seed 004 (ImageNet-pretrained encoder, 3-fold ensemble, image-level split): "
              + ", ".join(f"{k} {v}" for k, v in SEED_FIGURES.items()) + "."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.segmentation.evaluate"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, type=Path, help="segmenter checkpoint(s); several = fold ensemble")
    parser.add_argument("--data", type=Path, help="the training data (as segment-train's --data), to score its split")
    parser.add_argument("--masks", type=Path, help="image,mask_path CSV for --data")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split of the checkpoint's split file (default %(default)s)")
    parser.add_argument("--ph2", type=Path, help="PH2's ph2_labels.csv: a second hospital")
    parser.add_argument("--limit", type=int, help="score the first N images of each set only")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="report folder (default: beside the first checkpoint, eval/)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lesionserve.segmentation.data import load_pairs, pairs_for
    from lesionserve.segmentation.metrics import summary
    from lesionserve.segmentation.reference import SegmentationReference
    from lesionserve.training.masks import load_ph2
    from lesionserve.training.splits import read_splits

    if args.data is None and args.ph2 is None:
        raise ValueError("nothing to score: give --data (the checkpoint's split is scored) and/or --ph2")
    reference = SegmentationReference(args.checkpoint, threads=args.threads)
    ensemble = reference.ensemble
    sets, context = {}, {"checkpoints": ", ".join(map(str, args.checkpoint)), "input size": ensemble.size,
                         "post-processing": f"probability > {ensemble.spec.threshold} at the original size, largest "
                                            "component, holes filled"}
    if args.data is not None:
        config = torch.load(args.checkpoint[0], map_location="cpu", weights_only=False).get("config") or {}
        if not config.get("splits"):
            raise ValueError(f"{args.checkpoint[0]} records no split file: it was not trained by segment-train")
        pairs, _ = load_pairs(args.data, config.get("layout", "auto"), args.masks)
        chosen = read_splits(config["splits"])[args.split]
        sets[f"{args.split} split"] = pairs_for(chosen, pairs)
        context["split file"] = f"{config['splits']} ({len(chosen)} {args.split} images, lesion-grouped)"
    if args.ph2 is not None:
        sets["PH2"] = load_ph2(args.ph2)
    rows = []
    for name, pairs in sets.items():
        rows += score_pairs(reference, pairs[:args.limit] if args.limit else pairs, name, progress=not args.no_progress)
    summaries = {}
    for name in sets:
        mine = [r for r in rows if r["dataset"] == name]
        summaries[name] = {**summary([r["iou"] for r in mine], [r["dice"] for r in mine]),
                           "not_found": sum(not r["found"] for r in mine)}
    out = args.out or args.checkpoint[0].parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"context": context, "summary": summaries, "seed": SEED_FIGURES}, indent=2) + "\n")
    with (out / "per_image.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    plot_iou_hist(rows, out / "iou_hist.png")
    (out / "report.md").write_text(render_report(summaries, context))
    args.out = out
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    from lesionserve.training.reports import run_report_command

    return run_report_command(run, get_args_parser().parse_args(argv), ("report.md", "metrics.json", "per_image.csv", "iou_hist.png"))


if __name__ == "__main__":
    raise SystemExit(main())
