"""Score detector weights on a split against one or more label sets, side by side with seed 000.

    lesionserve detect-evaluate --weights runs/det/yolo/train/weights/best.pt --split test \\
        --data masks=runs/det/data_masks/data.yaml --data saliency=runs/det/data_saliency/data.yaml --out runs/det/eval

Per label set (``NAME=data.yaml``; the same images labelled by the expert masks' boxes or by seed
000's saliency boxes): mAP@0.5, mAP@0.5:0.95, precision, recall and AP@0.5 per class, from
ultralytics' validator, which also draws the PR curves, the confusion matrix and a few predictions
on images (under <out>/<name>/; keep them out of the repository when the images are real).
Writes ``detector_eval.json`` and ``detector_eval.md`` with seed 000's own figures beside (measured
by the seed against its saliency boxes, on an image-level split, with pretrained weights).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from lesionserve import prog
from lesionserve.spec import CLASS_NAMES

#: Seed 000's reported figures (internal split, boxes from its saliency rule, yolo11s.pt pretrained).
SEED_000 = {"map50": 0.603, "map50_95": 0.526,
            "ap50": {"MEL": 0.546, "NV": 0.956, "BCC": 0.556, "AKIEC": 0.441, "BKL": 0.569, "DF": 0.200, "VASC": 0.850}}


def evaluate(weights: str | Path, datasets: dict[str, Path], split: str, out: str | Path, imgsz: int | None = None,
             batch: int = 16) -> dict:
    from lesionserve.detection.train import offline_environment

    out = Path(out).resolve()
    offline_environment(out / ".ultralytics")
    from ultralytics import YOLO

    model = YOLO(str(weights))
    trained = ((getattr(model, "ckpt", None) or {}).get("train_args") or {}).get("imgsz")
    imgsz = imgsz or int(trained or 640)  # by default, the size the weights were trained at
    results = {}
    for name, data in datasets.items():
        metrics = model.val(data=str(Path(data).resolve()), split=split, imgsz=imgsz, batch=batch, device="cpu" if not _cuda() else 0,
                            project=str(out), name=name, exist_ok=True, plots=True, workers=0, verbose=False)
        box = metrics.box
        ap50 = {CLASS_NAMES[int(c)]: float(box.ap50[i]) for i, c in enumerate(box.ap_class_index)}
        results[name] = {"data": str(data), "map50": float(box.map50), "map50_95": float(box.map),
                         "precision": float(box.mp), "recall": float(box.mr), "ap50": ap50}
    report = {"weights": str(weights), "split": split, "imgsz": imgsz, "label_sets": results, "seed_000": SEED_000}
    out.mkdir(parents=True, exist_ok=True)
    (out / "detector_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "detector_eval.md").write_text(markdown(report))
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def markdown(report: dict) -> str:
    sets = report["label_sets"]
    columns = [*sets, "seed 000 (its saliency boxes, pretrained)"]
    rows = [("mAP@0.5", [s["map50"] for s in sets.values()] + [SEED_000["map50"]]),
            ("mAP@0.5:0.95", [s["map50_95"] for s in sets.values()] + [SEED_000["map50_95"]]),
            ("precision", [s["precision"] for s in sets.values()] + [None]),
            ("recall", [s["recall"] for s in sets.values()] + [None])]
    rows += [(f"AP@0.5 {c}", [s["ap50"].get(c) for s in sets.values()] + [SEED_000["ap50"][c]]) for c in CLASS_NAMES]
    lines = [f"Split {report['split']}, {report['imgsz']} px, weights `{report['weights']}`", "",
             "| metric | " + " | ".join(f"against {c}" if c in sets else c for c in columns) + " |",
             "| :--- |" + " ---: |" * len(columns)]
    lines += [f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |" for name, values in rows]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-evaluate"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="ultralytics .pt weights")
    parser.add_argument("--data", required=True, action="append", metavar="NAME=YAML",
                        help="a label set to score against (repeatable), e.g. masks=runs/det/data_masks/data.yaml")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="(default %(default)s)")
    parser.add_argument("--imgsz", type=int, help="default: the size the weights were trained at")
    parser.add_argument("--batch", type=int, default=16, help="(default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="report folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    datasets = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--data {item!r}: expected NAME=path/to/data.yaml of an existing file")
        datasets[name] = Path(path)
    if not args.weights.is_file():
        parser.error(f"weights not found: {args.weights}")
    report = evaluate(args.weights, datasets, args.split, args.out, args.imgsz, args.batch)
    print(markdown(report))
    print(f"wrote {args.out / 'detector_eval.md'} and detector_eval.json; plots under {args.out}/<label set>/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
