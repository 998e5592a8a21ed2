"""How much of each detector map's mass lies inside the lesion, on images with expert masks.

    lesionserve detect-maps --weights runs/det/yolo/train/weights/best.pt --onnx runs/det/yolo/model.onnx \\
        --data runs/det/data_masks --split test --masks ../shared/data/isic-real/ham10000_masks.csv --images 100 --out runs/det/maps

For the first ``--images`` images of a detection dataset's split that have a mask: Grad-CAM++ of the
top box (offline, pytorch-grad-cam on layer 8) and the served EigenCAM (the exported graph's layer-8
features), each scored as the classifiers' heatmaps are (lesionserve.training.map_eval: the share of
the map's mass inside the mask, and whether its hottest pixel is on the lesion), beside a uniform map
and a centred Gaussian of the lesions' mean size. Writes ``detector_maps.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from lesionserve import prog


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-maps"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path, help="ultralytics .pt weights (Grad-CAM++)")
    parser.add_argument("--onnx", required=True, type=Path, help="the exported model.onnx with its features output (EigenCAM)")
    parser.add_argument("--data", required=True, type=Path, help="a detection dataset folder (lesionserve detect-dataset)")
    parser.add_argument("--split", default="test", help="(default %(default)s)")
    parser.add_argument("--masks", required=True, type=Path, help="masks CSV (image,mask)")
    parser.add_argument("--images", type=int, default=100, help="images scored (default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, help="report folder")
    args = parser.parse_args(argv)

    from lesionserve.detection.explain import gradcampp_maps
    from lesionserve.detection.reference import DetectorReference
    from lesionserve.preprocessing import decode_image
    from lesionserve.training.map_eval import mean_area_fraction, mean_scores
    from lesionserve.training.masks import load_mask_index, read_mask

    index = load_mask_index(args.masks)
    files = [p for p in sorted((args.data / "images" / args.split).iterdir()) if p.stem in index][:args.images]
    if not files:
        print(f"error: no image of {args.data / 'images' / args.split} has a mask in {args.masks}", file=sys.stderr)
        return 2
    imgsz = int(json.loads((args.onnx.with_name(args.onnx.stem + ".export.json")).read_text())["imgsz"])
    blobs = [p.read_bytes() for p in files]
    rgbs = [decode_image(b) for b in blobs]
    masks = [read_mask(index[p.stem], (rgb.shape[1], rgb.shape[0])) for p, rgb in zip(files, rgbs)]
    area, _ = mean_area_fraction(index[p.stem] for p in files)
    gradcampp, _ = gradcampp_maps(args.weights, rgbs, imgsz)
    eigen = DetectorReference(args.onnx, imgsz).eigencam(blobs)
    report = {"images": len(files), "split": args.split, "imgsz": imgsz,
              "gradcampp": mean_scores(gradcampp, masks, area), "eigencam": mean_scores(eigen, masks, area)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detector_maps.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [("Grad-CAM++ (offline, top box)", report["gradcampp"]["maps"]), ("EigenCAM (served, layer 8)", report["eigencam"]["maps"]),
            ("centred Gaussian (baseline)", report["eigencam"]["gaussian"]), ("uniform (baseline)", report["eigencam"]["uniform"])]
    text = (f"{len(files)} {args.split} images with masks, {imgsz} px\n\n| map | mass inside the lesion | hottest pixel on the lesion |\n"
            "| :--- | ---: | ---: |\n" + "".join(f"| {n} | {s['mass']:.3f} | {s['hit']:.3f} |\n" for n, s in rows))
    (args.out / "detector_maps.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
