"""Do the heatmaps point at the lesion? Explanation maps scored against expert lesion masks.

    lesionserve evaluate-maps --artifacts runs/ham10000_cpu \\
        --masks ../shared/data/isic-real/ham10000_masks.csv --ph2 ../shared/data/isic-real/ph2_labels.csv

For every image of the artifacts' (lesion-grouped) test split that has a mask, and for every PH2
image (another hospital), the ensemble explains its predicted label (``--explain-class``) with
Grad-CAM and Grad-CAM++, as the server does (reference pipeline, the exported closed form, T views).
Each map (the fused one and each backbone's, at the image's size, in [0, 1]) is scored with

- **mass inside**: the fraction of the map's total value that lies inside the mask;
- **pointing game**: whether the hottest pixel lies inside the mask (ties: the fraction of the tied
  maxima inside, i.e. the expected hit of a random pick among them);

next to two maps that know nothing of the image:

- **centred Gaussian** of the lesions' mean size: centred in the image, sigma along each side that
  side times sqrt(a / pi), so its one-sigma ellipse covers the fraction ``a`` of the image, ``a``
  being the mean mask area of the *training* split (never of the images scored);
- **uniform**: a flat map; its mass inside is the mask's area fraction and its pointing hit the
  same (every pixel ties). A map that is flat after scaling counts as uniform.

Writes ``report.md``, ``maps_eval.json``, ``per_image.csv`` and ``localisation.png`` (the table as
bars with 95% bootstrap intervals, no image in it) to ``--out``; with ``--cases K`` also the K best
and K worst images of each set as overlays with the mask's outline, under ``--out``/cases, ranked
by the fused Grad-CAM's mass inside *minus the mask's area* (its gain over the uniform map: by mass
alone the "best" would be the images whose lesion fills the frame). Those are drawn on real images: keep ``--out`` outside the
repository (the default is under ``runs/``, which git ignores).

What the numbers mean: a CAM shows where the evidence for one class lies; it is not a segmentation,
and a map can sit on the lesion and still explain a wrong diagnosis (docs/explanations.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.explain import CAM_METHODS, scale_map
from lesionserve.training.masks import MaskedSample, read_mask

BASELINES: tuple[str, ...] = ("gaussian", "uniform")
FUSED = "fused"
TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "gaussian": "centred Gaussian", "uniform": "uniform",
          FUSED: "fused ensemble"}


# ---------------------------------------------------------------------------------------- metrics


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the map's total value inside ``mask``; a map of zeros is read as uniform."""
    total = float(heatmap.sum(dtype=np.float64))
    if total <= 0.0:
        return float(mask.mean())
    return float(heatmap[mask].sum(dtype=np.float64) / total)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """1.0 if the hottest pixel is inside ``mask``, 0.0 if outside; with several equal maxima, the
    fraction of them inside (a random pick's expected hit: a flat map scores the mask's area)."""
    top = heatmap >= heatmap.max()
    return float(mask[top].mean())


def centred_gaussian(width: int, height: int, area_fraction: float) -> np.ndarray:
    """height x width map of a Gaussian at the image centre whose one-sigma ellipse covers
    ``area_fraction`` of the image (sigma_x = width sqrt(a/pi), sigma_y = height sqrt(a/pi)), scaled
    to [0, 1] like the heatmaps. Above pi/4 the ellipse spills past the frame and covers less."""
    if not 0.0 < area_fraction <= 1.0:
        raise ValueError(f"area_fraction must be in (0, 1], got {area_fraction}")
    k = math.sqrt(area_fraction / math.pi)
    x = (np.arange(width, dtype=np.float64) - (width - 1) / 2.0) / (width * k)
    y = (np.arange(height, dtype=np.float64) - (height - 1) / 2.0) / (height * k)
    return scale_map(np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)))


def uniform_map(width: int, height: int) -> np.ndarray:
    """A flat height x width map (what a viewer shows when nothing is explained)."""
    return np.zeros((height, width), np.float32)


def score_maps(maps: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, dict[str, float]]:
    """``{name: {"mass": ..., "hit": ...}}`` for each map (each the mask's shape)."""
    out = {}
    for name, heat in maps.items():
        if heat.shape != mask.shape:
            raise ValueError(f"map {name!r} is {heat.shape[1]}x{heat.shape[0]}, the mask {mask.shape[1]}x{mask.shape[0]}")
        out[name] = {"mass": mass_inside(heat, mask), "hit": pointing_hit(heat, mask)}
    return out


def mean_area_fraction(mask_paths: Iterable[Path]) -> tuple[float, int]:
    """(mean lesion area fraction over the masks at ``mask_paths``, how many masks)."""
    fractions = [float(read_mask(path).mean()) for path in mask_paths]
    if not fractions:
        raise ValueError("no masks to measure the lesions' mean size on")
    return float(np.mean(fractions)), len(fractions)


def mean_scores(heatmaps: Sequence[np.ndarray], masks: Sequence[np.ndarray], gaussian_area: float) -> dict[str, dict[str, float]]:
    """Mean mass inside and pointing hit of ``heatmaps`` (any source: the server's, the reference's)
    and of both baselines, over images with their masks: ``{"maps"|"gaussian"|"uniform": {"mass", "hit"}}``."""
    rows = []
    for heat, mask in zip(heatmaps, masks, strict=True):
        h, w = mask.shape
        rows.append(score_maps({"maps": heat, "gaussian": centred_gaussian(w, h, gaussian_area),
                                "uniform": uniform_map(w, h)}, mask))
    return {k: {m: float(np.mean([r[k][m] for r in rows])) for m in ("mass", "hit")} for k in rows[0]}


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th and 97.5th percentile of the mean over ``n_boot`` resamples of the values)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if n_boot <= 0 or len(values) < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)


# ------------------------------------------------------------------------------------- evaluation


@dataclass
class ScoredImage:
    """One image's scores: ``scores[method][source]`` = {"mass", "hit"}, sources being the fused map,
    each backbone's and the baselines (the same under every method)."""

    dataset: str
    image: str
    label: str
    predicted: str
    explained: str
    confidence: float
    area: float
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def explained_classes(choice: str, items: Sequence[MaskedSample], class_names: Sequence[str]) -> list[str | None]:
    """Per image the class to explain: None (the predicted label) for "predicted", the true label
    for "truth", else the named class."""
    if choice == "predicted":
        return [None] * len(items)
    if choice == "truth":
        return [class_names[item.sample.label] for item in items]
    if choice not in class_names:
        raise ValueError(f"--explain-class must be predicted, truth or one of {', '.join(class_names)}; got {choice!r}")
    return [choice] * len(items)


def score_dataset(reference: Any, dataset: str, items: Sequence[MaskedSample], gaussian_area: float,
                  explain_class: str = "predicted", methods: Sequence[str] = CAM_METHODS, batch_size: int = 8,
                  progress: bool = True, keep_maps: bool = False) -> tuple[list[ScoredImage], dict[str, dict]]:
    """Explain and score every item; returns (scores per image, and when ``keep_maps`` each image's
    fused maps per method, for the case figures)."""
    from tqdm import tqdm

    from lesionserve.reference import explain_methods

    names = list(reference.pipeline.class_names)
    wanted = explained_classes(explain_class, items, names)
    scored, kept = [], {}
    with tqdm(total=len(items), desc=f"maps {dataset}", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            blobs = [item.sample.path.read_bytes() for item in chunk]
            result, per_method = explain_methods(reference, blobs, methods, classes=wanted[start:start + len(chunk)])
            first = per_method[methods[0]]
            for i, item in enumerate(chunk):
                height, width = first.maps[i].shape
                mask = read_mask(item.mask_path, (width, height))
                explained_name = first.classes[i]
                row = ScoredImage(dataset, item.image_id, names[item.sample.label], result.labels[i], explained_name,
                                  float(result.probs[i][names.index(explained_name)]), float(mask.mean()))
                baselines = score_maps({"gaussian": centred_gaussian(width, height, gaussian_area),
                                        "uniform": uniform_map(width, height)}, mask)
                for method, explanation in per_method.items():
                    maps = {FUSED: explanation.maps[i], **explanation.member_maps[i]}
                    row.scores[method] = {**score_maps(maps, mask), **baselines}
                    if keep_maps:
                        kept.setdefault(item.image_id, {})[method] = explanation.maps[i]
                scored.append(row)
            bar.update(len(chunk))
    return scored, kept


def summarise(scored: Sequence[ScoredImage], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per dataset, method and source: mean mass inside and pointing hit rate with 95% intervals."""
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r.dataset for r in scored):
        rows = [r for r in scored if r.dataset == dataset]
        entry: dict[str, Any] = {"images": len(rows), "mean_mask_area": float(np.mean([r.area for r in rows])),
                                 "correct": int(sum(r.label == r.predicted for r in rows)), "methods": {}}
        for method in rows[0].scores:
            table = {}
            for source in rows[0].scores[method]:
                table[source] = {metric: dict(zip(("mean", "low", "high"), bootstrap_mean(
                    np.array([r.scores[method][source][metric] for r in rows]), n_boot, seed)))
                    for metric in ("mass", "hit")}
            entry["methods"][method] = table
        out[dataset] = entry
    return out


# ---------------------------------------------------------------------------------------- outputs


def _source_title(source: str) -> str:
    return TITLES.get(source, source)


def render_markdown(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """The report: one table per dataset, rows = method x map source, then the baselines."""
    lines = ["# Do the heatmaps point at the lesion?", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines.append("")
    for dataset, entry in summary.items():
        lines += [f"## {dataset}: {entry['images']} images with masks "
                  f"(mean lesion area {entry['mean_mask_area']:.3f} of the image; "
                  f"{entry['correct']} predicted correctly)", "",
                  "| map | source | mass inside [95% CI] | pointing game [95% CI] |", "| :--- | :--- | ---: | ---: |"]

        def cell(s: Mapping[str, float]) -> str:
            return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"

        first = next(iter(entry["methods"].values()))
        for method, table in entry["methods"].items():
            for source, stats in table.items():
                if source not in BASELINES:
                    lines.append(f"| {TITLES[method]} | {_source_title(source)} | {cell(stats['mass'])} | {cell(stats['hit'])} |")
        for source in BASELINES:
            lines.append(f"| baseline | {_source_title(source)} | {cell(first[source]['mass'])} | {cell(first[source]['hit'])} |")
        lines.append("")
    return "\n".join(lines)


def plot_summary(summary: Mapping[str, Any], path: Path) -> None:
    """Bars of mass inside and pointing hit per map source (fused, backbones, baselines), one
    panel pair per dataset, 95% intervals as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = list(summary)
    figure = Figure(figsize=(11, 3.4 * len(datasets)))
    for row, dataset in enumerate(datasets):
        methods = summary[dataset]["methods"]
        sources = [s for s in next(iter(methods.values())) if s not in BASELINES]
        for col, metric in enumerate(("mass", "hit")):
            axis = figure.add_subplot(len(datasets), 2, 2 * row + col + 1)
            width = 0.8 / len(methods)
            x = np.arange(len(sources))
            for k, (method, table) in enumerate(methods.items()):
                means = [table[s][metric]["mean"] for s in sources]
                err = [[table[s][metric]["mean"] - table[s][metric]["low"] for s in sources],
                       [table[s][metric]["high"] - table[s][metric]["mean"] for s in sources]]
                axis.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=TITLES[method])
            first = next(iter(methods.values()))
            for source, style in zip(BASELINES, ("--", ":")):
                axis.axhline(first[source][metric]["mean"], color="black", linestyle=style, linewidth=1,
                             label=f"{_source_title(source)} baseline")
            axis.set_xticks(x, [_source_title(s) for s in sources], fontsize=8)
            axis.set_ylim(0, 1)
            axis.set_title(f"{dataset}: {'heatmap mass inside the mask' if metric == 'mass' else 'pointing game hit rate'}",
                           fontsize=9)
            if row == 0 and col == 0:
                axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


def write_per_image(path: Path, scored: Sequence[ScoredImage]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        columns = [(m, s, k) for m, table in scored[0].scores.items() for s in table for k in ("mass", "hit")]
        writer.writerow(["dataset", "image", "label", "predicted", "explained", "confidence", "mask_area",
                         *(f"{m}_{s}_{k}" for m, s, k in columns)])
        for r in scored:
            writer.writerow([r.dataset, r.image, r.label, r.predicted, r.explained, f"{r.confidence:.4f}", f"{r.area:.4f}",
                             *(f"{r.scores[m][s][k]:.4f}" for m, s, k in columns)])


def write_cases(out: Path, items: Mapping[str, MaskedSample], scored: Sequence[ScoredImage],
                maps: Mapping[str, Mapping[str, np.ndarray]], k: int) -> list[Path]:
    """The k best and k worst images per dataset as overlays with the mask's outline (green), ranked
    by the fused Grad-CAM's gain over the uniform map (mass inside minus mask area), named by rank,
    truth and that gain."""
    import cv2

    from lesionserve.explain import overlay
    from lesionserve.preprocessing import decode_image

    method = next(iter(scored[0].scores))
    written = []
    for dataset in dict.fromkeys(r.dataset for r in scored):
        gain = lambda r: r.scores[method][FUSED]["mass"] - r.area  # noqa: E731
        rows = sorted((r for r in scored if r.dataset == dataset), key=gain)
        for tag, chosen in (("worst", rows[:k]), ("best", rows[::-1][:k])):
            for rank, r in enumerate(chosen, start=1):
                item = items[r.image]
                rgb = decode_image(item.sample.path.read_bytes())
                picture = overlay(rgb, maps[r.image][method], r.explained, r.confidence)
                contours, _ = cv2.findContours(read_mask(item.mask_path).astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(picture, contours, -1, (0, 255, 0), max(1, min(picture.shape[:2]) // 200))
                target = out / "cases" / dataset / f"{tag}{rank:02d}_{r.image}_truth-{r.label}_gain{gain(r):+.2f}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                written.append(target)
    return written


# -------------------------------------------------------------------------------------------- CLI


def masked_split(artifacts: Path, masks_csv: Path, split: str, splits_file: Path | None) -> dict[str, Any]:
    """The split's images that have a mask (``items``), a line saying how many lack one (``note``),
    the lesion-clean line (``clean``) and the train split's masked images (``train``, for the
    Gaussian baseline's size)."""
    from lesionserve.training.evaluate import evaluation_samples, lesion_clean_text
    from lesionserve.training.masks import attach_masks, load_mask_index
    from lesionserve.training.splits import read_splits

    chosen = evaluation_samples(artifacts, split, splits_file)
    index = load_mask_index(masks_csv)  # read (and every file checked) once for both splits
    with_mask, without = attach_masks(chosen.samples, index)
    train, _ = attach_masks(read_splits(chosen.source, check_files=False).get("train", []), index)
    note = f"{len(with_mask)} of the {len(chosen.samples)} {split} images have a mask ({len(without)} skipped)"
    return {"items": with_mask, "note": note, "clean": lesion_clean_text(chosen.lesion_clean), "train": train}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.training.map_eval"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=Path, metavar="DIR",
                        help="the ensemble's artifacts (<member>/checkpoint.pt, calibration.json, splits.csv)")
    parser.add_argument("--masks", type=Path, metavar="CSV",
                        help="image,mask_path CSV of the split's images (the real pool: ham10000_masks.csv)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="split scored with --masks (default %(default)s)")
    parser.add_argument("--splits", type=Path, default=None, metavar="CSV",
                        help="split file (default: <artifacts>/splits.csv, the one the models were trained with)")
    parser.add_argument("--ph2", type=Path, metavar="CSV", help="PH2's ph2_labels.csv: a second hospital")
    parser.add_argument("--views", type=int, default=8, choices=(1, 2, 4, 8), help="TTA views (default %(default)s)")
    parser.add_argument("--backbones", nargs="+", default=None, metavar="NAME",
                        help="members to use (default: every member with a checkpoint in --artifacts)")
    parser.add_argument("--explain-class", default="predicted", metavar="predicted|truth|CLASS",
                        help="which class each map explains (default %(default)s, as the server does)")
    parser.add_argument("--gaussian-area", type=float, default=None, metavar="A",
                        help="the Gaussian baseline's lesion area fraction (default: the mean of the train split's masks)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="score the first N images of each set only")
    parser.add_argument("--cases", type=int, default=0, metavar="K", help="write the K best and K worst overlays per set")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images explained at once (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/maps"), help="output folder (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score the sets the arguments name; writes the outputs and returns the summary."""
    import torch

    from lesionserve.reference import ReferencePipeline
    from lesionserve.training.evaluate import available_backbones
    from lesionserve.training.masks import load_ph2

    if args.masks is None and args.ph2 is None:
        raise ValueError("nothing to score: give --masks CSV (with the artifacts' split) and/or --ph2 CSV")
    if args.threads:
        torch.set_num_threads(args.threads)
    context: dict[str, Any] = {"artifacts": str(args.artifacts), "views": args.views, "explained class": args.explain_class}
    sets: dict[str, list[MaskedSample]] = {}
    split: dict[str, Any] = {}
    if args.masks is not None:
        split = masked_split(args.artifacts, args.masks, args.split, args.splits)
        sets[f"HAM10000 {args.split}"] = split["items"]
        context.update({"HAM10000 masks": split["note"], "lesion-clean": split["clean"]})
        print(split["note"])
    if args.ph2 is not None:
        sets["PH2"] = load_ph2(args.ph2)
    if args.limit:
        sets = {name: items[:args.limit] for name, items in sets.items()}
    area = args.gaussian_area
    if area is None:
        if args.masks is None:
            raise ValueError("--gaussian-area A is needed without --masks (the train split's masks give the default)")
        area, count = mean_area_fraction(item.mask_path for item in split["train"])
        context["Gaussian baseline"] = f"area fraction {area:.3f}: the mean over the train split's {count} masks"
    else:
        context["Gaussian baseline"] = f"area fraction {area:.3f} (given)"
    print(context["Gaussian baseline"])
    backbones = args.backbones or available_backbones(args.artifacts)
    if not backbones:
        raise ValueError(f"no <member>/checkpoint.pt in {args.artifacts}")
    reference = ReferencePipeline.from_artifacts(args.artifacts, views=args.views, backbones=backbones)
    context["members"] = ", ".join(f"{b} @{reference.input_sizes[b]}" for b in reference.backbones)
    scored, maps = [], {}
    for name, items in sets.items():
        rows, kept = score_dataset(reference, name, items, area, args.explain_class, batch_size=args.batch_size,
                                   progress=not args.no_progress, keep_maps=args.cases > 0)
        scored += rows
        maps.update(kept)
    summary = summarise(scored, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "maps_eval.json").write_text(json.dumps({"context": context, "summary": summary}, indent=2) + "\n")
    (args.out / "report.md").write_text(render_markdown(summary, context) + "\n")
    write_per_image(args.out / "per_image.csv", scored)
    plot_summary(summary, args.out / "localisation.png")
    if args.cases:
        items = {item.image_id: item for items in sets.values() for item in items}
        written = write_cases(args.out, items, scored, maps, args.cases)
        print(f"{len(written)} case overlays under {args.out / 'cases'} (real images: keep them out of the repository)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from lesionserve.training.reports import run_report_command

    return run_report_command(run, get_args_parser().parse_args(argv), ("report.md", "maps_eval.json", "per_image.csv", "localisation.png"))


if __name__ == "__main__":
    raise SystemExit(main())
