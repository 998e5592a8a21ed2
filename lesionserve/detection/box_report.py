"""How far seed 000's saliency boxes are from the real lesion boxes, per class.

    lesionserve detect-boxes --data ../shared/data/isic-real/ham10000_metadata.csv \\
        --masks ../shared/data/isic-real/ham10000_masks.csv --out runs/det/boxes

Every image with an expert mask: the saliency box (detection.boxes.saliency_box) against the mask's
box (mask_box). Writes ``box_iou.json`` (per class: images, mean and median IoU, the share with
IoU >= 0.5 and >= 0.75, the share of fallback boxes), ``box_iou.md`` and ``box_iou.png`` (the IoU
distribution per class). Images without a mask are skipped and counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from lesionserve import prog
from lesionserve.spec import CLASS_NAMES


def measure(masked: Sequence, progress: bool = True) -> list[dict]:
    """One row per masked sample: class, IoU of its saliency box with its mask box, fallback."""
    from tqdm import tqdm

    from lesionserve.detection.boxes import box_iou, mask_box, saliency_box
    from lesionserve.preprocessing import decode_image
    from lesionserve.training.masks import read_mask

    rows = []
    for m in tqdm(masked, desc="boxes", unit="img", disable=not progress, file=sys.stderr):
        rgb = decode_image(Path(m.sample.path).read_bytes())
        real = mask_box(read_mask(m.mask_path, (rgb.shape[1], rgb.shape[0])))
        guess = saliency_box(rgb)
        rows.append({"image": m.image_id, "class": CLASS_NAMES[m.sample.label], "fell_back": guess.fell_back,
                     "iou": box_iou(guess.box, real) if real is not None else 0.0, "empty_mask": real is None})
    return rows


def summarise(rows: Sequence[dict]) -> dict[str, dict]:
    """Per class (and "all"): images, mean/median IoU, share >= 0.5 and >= 0.75, fallback share."""
    out = {}
    for name in (*CLASS_NAMES, "all"):
        part = [r for r in rows if name == "all" or r["class"] == name]
        if not part:
            continue
        iou = np.array([r["iou"] for r in part])
        out[name] = {"images": len(part), "mean_iou": float(iou.mean()), "median_iou": float(np.median(iou)),
                     "iou_ge_0.5": float((iou >= 0.5).mean()), "iou_ge_0.75": float((iou >= 0.75).mean()),
                     "fallback": float(np.mean([r["fell_back"] for r in part]))}
    return out


def plot(rows: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in CLASS_NAMES if any(r["class"] == c for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.boxplot([[r["iou"] for r in rows if r["class"] == c] for c in names], tick_labels=names, showmeans=True)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("IoU, saliency box vs mask box")
    ax.set_ylim(0, 1)
    ax.set_title(f"Seed 000's saliency boxes against the expert masks' boxes ({len(rows)} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict[str, dict], skipped: int) -> str:
    lines = ["| class | images | mean IoU | median IoU | IoU >= 0.5 | IoU >= 0.75 | fallback box |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['images']} | {s['mean_iou']:.3f} | {s['median_iou']:.3f} | {s['iou_ge_0.5']:.1%} | "
                     f"{s['iou_ge_0.75']:.1%} | {s['fallback']:.1%} |")
    return "\n".join(lines) + f"\n\n{skipped} image(s) without a mask were skipped.\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-boxes"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="dataset (training.data.load_dataset): a folder or metadata CSV")
    parser.add_argument("--layout", default="auto", help="layout of --data (default %(default)s)")
    parser.add_argument("--masks", type=Path, help="masks CSV (image,mask); default: <data>/masks.csv")
    parser.add_argument("--out", required=True, type=Path, help="report folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lesionserve.training.data import DatasetError, load_dataset
    from lesionserve.training.masks import attach_masks, load_mask_index

    args = get_args_parser().parse_args(argv)
    masks = args.masks or (args.data / "masks.csv" if args.data.is_dir() else None)
    if masks is None:
        print("error: --masks CSV is required when --data is a file", file=sys.stderr)
        return 2
    try:
        masked, skipped = attach_masks(load_dataset(args.data, args.layout), load_mask_index(masks))
        rows = measure(masked, progress=not args.no_progress)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no image of {args.data} has a mask in {masks}", file=sys.stderr)
        return 2
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "box_iou.json").write_text(json.dumps({"summary": summary, "skipped": len(skipped), "rows": rows}, indent=1) + "\n")
    (args.out / "box_iou.md").write_text(markdown(summary, len(skipped)))
    plot(rows, args.out / "box_iou.png")
    print(markdown(summary, len(skipped)) + f"wrote {args.out / 'box_iou.md'}, box_iou.json, box_iou.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
