"""Score a ViT checkpoint per head, as a clinician asks: sensitivity, specificity, balanced accuracy
and melanoma ROC AUC with bootstrap intervals, at an operating threshold on P(melanoma) chosen on
the validation split for a target sensitivity; confidence histograms of TP / FP / FN / TN.

    lesionserve vit-evaluate --checkpoint runs/vit/gradual/checkpoint.pt --splits runs/vit/gradual/splits.json \\
        --out runs/vit/gradual/eval [--target-sensitivity 0.9]

Writes metrics.json, metrics.md, confidence_<head>.png and thresholds.json (what ``assemble``
serves as each head's operating threshold). ``--masks HEAD=CSV`` (an ``image,mask_path`` CSV:
ham10000_masks.csv, ph2_labels.csv) also scores both attention maps against the lesion masks of
that head's test images: the share of the map's mass inside the lesion and whether its hottest pixel
is on it, beside a centred Gaussian and a uniform map.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.export.tensorrt import file_sha256  # ties thresholds.json to one checkpoint (assembly compares)
from lesionserve.vit.spec import DEFAULT_TARGET_SENSITIVITY, Head

THRESHOLDS_FILE = "thresholds.json"


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity (share of positives with score >= t) >= ``target``;
    0.5 when there are no positives."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos = np.sort(np.asarray(scores, np.float64)[np.asarray(positive, bool)])[::-1]
    if pos.size == 0:
        return 0.5
    # The fewest positives that reach the target; the small epsilon keeps float noise (0.07 * 100 =
    # 7.000000000000001) from asking for one more than needed.
    needed = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[needed - 1])


def binary_rates(melanoma: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of the melanoma decisions: training.metrics' one-vs-rest rates of
    the positive class; NaN where a side has no images."""
    from lesionserve.training.metrics import confusion_matrix, sensitivity_specificity_from_confusion

    cm = confusion_matrix(np.asarray(positive, np.int64).ravel(), np.asarray(melanoma, np.int64).ravel(), 2)
    sens, spec = sensitivity_specificity_from_confusion(cm)
    return float(sens[1]), float(spec[1])


def bootstrap(fn: Any, n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``fn(indices)`` over ``n_boot`` resamples of range(n) with replacement."""
    rng = np.random.default_rng(seed)
    return np.array([fn(rng.integers(0, n, n)) for _ in range(n_boot)], np.float64)


def head_metrics(head: Head, val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                 test_labels: np.ndarray, target: float, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Item by item what ``metrics.json`` holds for one head (threshold from validation, figures on test)."""
    from lesionserve.training.metrics import balanced_accuracy, binary_auc, percentile_interval
    from lesionserve.vit.decision import decide

    pos_i = head.positive_index
    t = threshold_for_sensitivity(val_probs[:, pos_i], val_labels == pos_i, target)
    labels, melanoma = decide(test_probs, head, t)
    positive = test_labels == pos_i
    score = test_probs[:, pos_i].astype(np.float64)

    def sens_spec(idx: np.ndarray) -> tuple[float, float]:
        return binary_rates(melanoma[idx], positive[idx])

    def bacc(idx: np.ndarray) -> float:
        return float(np.mean(sens_spec(idx)))

    n = len(test_labels)
    boot = {"sensitivity": bootstrap(lambda i: sens_spec(i)[0], n, n_boot, seed),
            "specificity": bootstrap(lambda i: sens_spec(i)[1], n, n_boot, seed),
            "balanced_accuracy": bootstrap(bacc, n, n_boot, seed),
            "auc": bootstrap(lambda i: binary_auc(score[i], positive[i]), n, n_boot, seed)}
    sens, spec = binary_rates(melanoma, positive)
    point = {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
             "auc": binary_auc(score, positive)}
    out: dict[str, Any] = {"head": head.name, "classes": list(head.class_names), "positive": head.positive,
                           "threshold": t, "target_sensitivity": target,
                           "val_sensitivity": binary_rates(val_probs[:, pos_i] >= t, val_labels == pos_i)[0],
                           "test_images": n, "test_melanoma": int(positive.sum()),
                           **{k: {"value": v, "ci95": list(percentile_interval(boot[k]))} for k, v in point.items()}}
    if head.num_classes > 2:  # every class, with the melanoma decision at the threshold
        idx = np.array([head.class_names.index(str(x)) for x in labels])
        out["class_balanced_accuracy"] = balanced_accuracy(test_labels, idx, head.num_classes)
    outcome = np.where(melanoma & positive, "TP", np.where(melanoma & ~positive, "FP", np.where(~melanoma & positive, "FN", "TN")))
    out["counts"] = {k: int((outcome == k).sum()) for k in ("TP", "FP", "FN", "TN")}
    out["_scores"] = {k: score[outcome == k].tolist() for k in ("TP", "FP", "FN", "TN")}
    return out


def plot_confidences(metrics: Mapping[str, Any], path: Path) -> None:
    """Seed 001's confidence histograms: P(melanoma) of the test images, one panel per outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(13, 3), sharex=True)
    for ax, kind in zip(axes, ("TP", "FP", "FN", "TN")):
        values = metrics["_scores"][kind]
        ax.hist(values, bins=np.linspace(0, 1, 21), color={"TP": "tab:green", "TN": "tab:blue"}.get(kind, "tab:red"))
        ax.axvline(metrics["threshold"], color="k", ls="--", lw=1)
        ax.set(title=f"{kind} ({len(values)})", xlabel="P(melanoma)")
    axes[0].set_ylabel("test images")
    fig.suptitle(f"head {metrics['head']}: confidence by outcome at threshold {metrics['threshold']:.3f} "
                 f"(dashed; chosen on validation for sensitivity {metrics['target_sensitivity']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_against_masks(model: Any, samples: Sequence[Any], masks_csv: str | Path, limit: int = 200) -> dict[str, Any]:
    """Both maps (as served: at the mask's size, scaled to [0, 1]) of the test images that have a
    mask, scored with training.map_eval against the lesion, beside its two baselines."""
    import torch

    from lesionserve.preprocessing import decode_image, preprocess_rgb
    from lesionserve.training.map_eval import mean_scores
    from lesionserve.training.masks import load_mask_index, read_mask
    from lesionserve.explain import upsample_map
    from lesionserve.vit.model import forward_with_attention

    index = load_mask_index(masks_csv)
    items = [s for s in samples if s.image_id in index][:limit]
    if not items:
        return {"images": 0}
    masks = [read_mask(index[s.image_id]) for s in items]
    device = next(model.parameters()).device
    maps: dict[str, list[np.ndarray]] = {"rollout": [], "cls": []}
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        x = np.stack([preprocess_rgb(decode_image(s.path.read_bytes()), model.spec.input_size, model.spec.normalization) for s in chunk])
        with torch.no_grad():
            _, grid = forward_with_attention(model, torch.from_numpy(x).to(device))
        for kind in maps:
            for g, mask in zip(grid[kind].float().cpu().numpy(), masks[start:start + 16]):
                maps[kind].append(upsample_map(g, mask.shape[1], mask.shape[0]))
    area = float(np.mean([m.mean() for m in masks]))
    out: dict[str, Any] = {"images": len(items), "mean_lesion_area": area}
    for kind, heat in maps.items():
        scores = mean_scores(heat, masks, area)
        out[kind] = scores["maps"]
        out["gaussian"], out["uniform"] = scores["gaussian"], scores["uniform"]
    return out


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    def ci(m: Mapping[str, Any]) -> str:
        lo, hi = m["ci95"]
        return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = ["| head | test images (melanoma) | threshold | sensitivity | specificity | BACC | AUC | TP/FP/FN/TN |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in results.items():
        c = m["counts"]
        lines.append(f"| {name} | {m['test_images']} ({m['test_melanoma']}) | {m['threshold']:.3f} | {ci(m['sensitivity'])} | "
                     f"{ci(m['specificity'])} | {ci(m['balanced_accuracy'])} | {ci(m['auc'])} | "
                     f"{c['TP']}/{c['FP']}/{c['FN']}/{c['TN']} |")
    extra = [f"- {n}: balanced accuracy over its {len(m['classes'])} classes {m['class_balanced_accuracy']:.3f}"
             for n, m in results.items() if "class_balanced_accuracy" in m]
    for n, m in results.items():
        a = m.get("attention_vs_masks")
        if a and a.get("images"):
            extra.append(f"- {n}: attention against the lesion masks of {a['images']} test images (mass inside / hottest pixel "
                         "on the lesion): " + ", ".join(f"{k} {a[k]['mass']:.3f} / {a[k]['hit']:.3f}"
                                                        for k in ("rollout", "cls", "gaussian", "uniform")))
    return "\n".join(lines + [""] + extra) + "\n"


def evaluate_checkpoint(checkpoint: str | Path, splits: str | Path, out: str | Path,
                        target: float = DEFAULT_TARGET_SENSITIVITY, n_boot: int = 1000, progress: bool = True,
                        device: str = "auto", masks: Mapping[str, str] | None = None) -> dict[str, Any]:
    from lesionserve.vit.data import read_split_file, resized_pixels
    from lesionserve.vit.decision import softmax
    from lesionserve.vit.model import load_checkpoint
    from lesionserve.vit.spec import get_head
    from lesionserve.vit.train import predict, resolve_device

    model, _ = load_checkpoint(checkpoint)
    model.to(resolve_device(device))
    split = read_split_file(Path(splits))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in model.spec.heads:
        if name not in split:
            raise ValueError(f"{splits} has no split for head {name!r} (heads there: {', '.join(split)})")
        probs, labels = {}, {}
        for part in ("val", "test"):
            pixels = resized_pixels(split[name][part], model.spec.input_size, progress, f"{name} {part}")
            probs[part] = softmax(predict(model, pixels, 32, progress, f"{name} {part}")[name])
            labels[part] = np.array([s.label for s in split[name][part]])
        results[name] = head_metrics(get_head(name), probs["val"], labels["val"], probs["test"], labels["test"], target, n_boot)
        if masks and name in masks:
            results[name]["attention_vs_masks"] = attention_against_masks(model, split[name]["test"], masks[name])
        plot_confidences(results[name], out / f"confidence_{name}.png")
    (out / THRESHOLDS_FILE).write_text(json.dumps({"thresholds": {n: m["threshold"] for n, m in results.items()},
                                                   "target_sensitivity": target, "chosen_on": "val",
                                                   "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint)},
                                                  indent=1))
    public = {n: {k: v for k, v in m.items() if not k.startswith("_")} for n, m in results.items()}
    (out / "metrics.json").write_text(json.dumps(public, indent=1))
    (out / "metrics.md").write_text(markdown(results))
    return public


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.vit.evaluate"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt of `lesionserve vit-train`")
    parser.add_argument("--splits", type=Path, required=True, help="splits.json of the same run")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json/.md, PNGs, thresholds.json")
    parser.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                        help=f"melanoma sensitivity the threshold is chosen for on validation (default {DEFAULT_TARGET_SENSITIVITY})")
    parser.add_argument("--masks", action="append", default=[], metavar="HEAD=CSV",
                        help="score the attention maps of HEAD's test images against lesion masks (image,mask_path CSV)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        from lesionserve.vit.train import parse_assignments

        masks = parse_assignments(args.masks, "--masks")
        evaluate_checkpoint(args.checkpoint, args.splits, args.out, args.target_sensitivity, args.boot, not args.no_progress,
                            args.device, masks)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "metrics.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
