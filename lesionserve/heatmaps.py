"""Offline explanation figures: Grad-CAM and Grad-CAM++ overlays and a grid, for the ensemble or one checkpoint.

    lesionserve explain --artifacts runs/demo IMAGES... --out runs/demo/explain        # the ensemble
    lesionserve explain --checkpoint runs/x/resnet50/checkpoint.pt IMAGES... --out DIR  # one model
    lesionserve explain --artifacts runs/demo IMAGES... --class MEL --oracle          # pytorch-grad-cam

Writes ``<stem>_gradcam.png`` and ``<stem>_gradcampp.png`` (the image under its fused heatmap, the
explained class and its probability in the corner) per image, and ``grid.png`` (one row per image:
image, Grad-CAM, Grad-CAM++, as the seed notebooks showed them). The maps come from the in-process
reference pipeline, by the closed form the exported graphs carry, or with ``--oracle`` by
pytorch-grad-cam's gradients (the two agree within 1e-3: tests/unit/test_explain.py). A map shows
where the evidence for one class lies in the image; it is not a diagnosis and not a segmentation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lesionserve import prog
from lesionserve.explain import CAM_METHODS, overlay

TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}


def single_model_pipeline(checkpoint: Path):
    """(ReferencePipeline, declaration) serving one checkpoint alone, at the size it was trained at."""
    from lesionserve.architectures import ARCHITECTURES, register_architecture
    from lesionserve.calibration import Calibration
    from lesionserve.models import load_checkpoint, trained_input_size
    from lesionserve.pipelines import EnsemblePipeline, Member
    from lesionserve.reference import ReferencePipeline
    from lesionserve.spec import CLASS_NAMES

    arch, model, payload = load_checkpoint(checkpoint)
    known = ARCHITECTURES.get(arch.name)
    if known is None or known.differences(arch):  # a checkpoint describes its own network
        register_architecture(arch)
    classes = tuple((payload.get("config") or {}).get("class_names") or CLASS_NAMES)
    declared = EnsemblePipeline(f"single_{arch.name}", (Member(arch.name, arch.name, trained_input_size(payload, arch)),),
                                views=1, class_names=classes)
    return ReferencePipeline({arch.name: model}, Calibration.uniform([arch.name]), views=1, pipeline=declared)


def write_figures(reference, paths: list[Path], out: Path, class_name: str | None, oracle: bool) -> list[Path]:
    """Overlays per image and method, and grid.png; returns the files written."""
    import cv2
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lesionserve.preprocessing import decode_image
    from lesionserve.reference import explain_methods

    out.mkdir(parents=True, exist_ok=True)
    blobs = [p.read_bytes() for p in paths]
    rgbs = [decode_image(b, max_pixels=reference.max_pixels) for b in blobs]
    classes = [class_name] * len(blobs)
    written, panels = [], {m: [] for m in CAM_METHODS}
    result, explanations = explain_methods(reference, blobs, CAM_METHODS, classes=classes, oracle=oracle)
    names = list(reference.pipeline.class_names)
    for method, maps in explanations.items():
        for path, rgb, heat, cls, probs in zip(paths, rgbs, maps.maps, maps.classes, result.probs):
            picture = overlay(rgb, heat, cls, float(probs[names.index(cls)]))
            target = out / f"{path.stem}_{method}.png"
            cv2.imwrite(str(target), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            written.append(target)
            panels[method].append(picture)
    figure = Figure(figsize=(3 * (1 + len(CAM_METHODS)), 2.6 * len(paths)))
    for row, (path, rgb) in enumerate(zip(paths, rgbs)):
        for col, (title, picture) in enumerate([("image", rgb)] + [(TITLES[m], panels[m][row]) for m in CAM_METHODS]):
            axis = figure.add_subplot(len(paths), 1 + len(CAM_METHODS), row * (1 + len(CAM_METHODS)) + col + 1)
            axis.imshow(picture)
            axis.set_axis_off()
            axis.set_title(f"{path.name}" if col == 0 else title, fontsize=8)
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(out / "grid.png"))
    written.append(out / "grid.png")
    return written


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.heatmaps"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifacts", type=Path, help="the ensemble's artifacts (<member>/checkpoint.pt, calibration.json)")
    source.add_argument("--checkpoint", type=Path, help="one checkpoint.pt (any registered or self-described architecture)")
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, BMP, TIFF, WebP)")
    parser.add_argument("--out", type=Path, default=Path("runs/explain"), help="folder for the PNGs (default %(default)s)")
    parser.add_argument("--views", type=int, default=8, choices=(1, 2, 4, 8), help="with --artifacts: TTA views (default %(default)s)")
    parser.add_argument("--class", dest="class_name", metavar="NAME", help="explain this class (default: each image's predicted label)")
    parser.add_argument("--oracle", action="store_true", help="maps by pytorch-grad-cam's gradients instead of the closed form")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: image file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    from lesionserve.reference import ReferencePipeline

    try:
        reference = (ReferencePipeline.from_artifacts(args.artifacts, views=args.views) if args.artifacts
                     else single_model_pipeline(args.checkpoint))
        written = write_figures(reference, args.images, args.out, args.class_name, args.oracle)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out} (grid: {args.out / 'grid.png'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
