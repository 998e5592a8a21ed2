"""The main job, end to end on this machine: data -> training -> calibration -> ONNX -> Triton -> SDK.

    python -m lesionserve.demo            # what `make demo` runs

1. generate a synthetic ISIC-layout dataset (600x450 JPEGs),
2. train ResNet50@224, DenseNet121@224 and EfficientNet-B3@300 briefly (from scratch), the U-Net
   lesion segmenter on the lesions' own masks, the same three on the lesions' crops (as the
   segmenter finds them), a YOLO11n detector on the lesions' mask boxes (offline), and a DeiT-Tiny
   with a melanoma head and a PH2-style head under the gradual unfreezing schedule,
3. calibrate fusion weights and MEL/AKIEC thresholds on the validation split, and the ViT heads'
   operating thresholds (melanoma sensitivity 0.9 on validation),
4. export each backbone, the segmenter, the detector and the ViT to ONNX (each checked against PyTorch),
5. assemble one repository serving the five pipelines and start tritonserver on free loopback ports,
6. classify held-out images through the client SDK, print the table, write Grad-CAM overlays,
   segment them (mask outlines and boxes, scored against their masks), classify their crops and
   detect their lesions (boxes drawn, the top box scored against the lesion's box) and ask the
   ViT whether each is a melanoma (every head's decision, attention rollout overlays),
7. compare with the in-process reference pipelines, then shut the server down.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.server import PROJECT_ROOT, TritonServer
from lesionserve.spec import CLASS_NAMES


#: The demo's segmenter: progressive resizing at small sizes, so it trains in about a minute.
DEMO_SEGMENTER_SIZES = (64, 96)
#: The crop-trained members' side: a lesion crop holds fewer pixels than the whole image.
DEMO_CROP_SIZE = 128
#: The demo's detector: the smallest YOLO11 at a small letterbox, 30 epochs: about a minute (it needs
#: many more epochs than the classifiers before any box scores above a few percent).
DEMO_DETECTOR = {"model": "yolo11n.yaml", "imgsz": 128, "batch": 16, "epochs": 30}
#: The demo's detections: a detector trained for a minute from scratch scores low, so the demo shows
#: each image's five best boxes above 0.05 (the SDK's defaults: conf 0.25, max_det 300).
DEMO_CONF, DEMO_MAX_DET = 0.05, 5
#: The demo's ViT: DeiT-Tiny at 112 px (a 7 x 7 attention grid), seed 001's schedule compressed (one
#: head-only epoch, then 4 pieces per epoch) and its rates x10: it starts from random weights.
DEMO_VIT = {"timm_name": "deit_tiny_patch16_224", "input_size": 112, "epochs": 6, "batch_size": 16, "head_only_epochs": 1,
            "unfreeze_per_epoch": 4, "val_fraction": 0.25, "test_fraction": 0.15,
            "lr": {"heads": 1e-3, "blocks": 1e-4, "norm": 1e-5, "patch_embed": 1e-5, "tokens": 1e-6}}


def stage(number: int, text: str) -> None:
    print(f"\n[{number}/7] {text}", flush=True)


def run_demo(args: argparse.Namespace) -> float:
    """Run every stage; returns the max |Triton - reference| over fused probabilities."""
    from lesionserve.export.assemble import assemble_pipelines
    from lesionserve.export.segmenter_export import export_segmenter
    from lesionserve.cropping import NO_BOX
    from lesionserve.pipelines import LESION_CROP_CLASSIFIER
    from lesionserve.segmentation.boxes import segmenter_boxes, write_boxes
    from lesionserve.segmentation.reference import CropReference, SegmentationReference
    from lesionserve.detection.spec import LESION_DETECT
    from lesionserve.segmentation.spec import LESION_CROP, LESION_SEGMENT
    from lesionserve.training.data import load_dataset
    from lesionserve.segmentation.train import train_segmenter
    from lesionserve.export.onnx_export import export_onnx
    from lesionserve.reference import ReferencePipeline
    from lesionserve_client import LesionClient
    from lesionserve_client.cli import format_melanoma, format_table, write_overlays, write_pngs
    from lesionserve.vit.spec import MELANOMA_VIT
    from lesionserve.training.calibrate import calibrate
    from lesionserve.synthetic import generate_dataset
    from lesionserve.training.train import train

    out = Path(args.out)
    stage(1, f"synthetic dataset: {args.num_images} images -> {out / 'data'}")
    data = generate_dataset(out / "data", num_images=args.num_images, seed=args.seed, overwrite=True)
    held_out = generate_dataset(out / "held_out", class_counts={c: 1 for c in CLASS_NAMES}, seed=args.seed + 1000, overwrite=True)

    pipeline = LESION_ENSEMBLE  # the declaration says what to train, export and serve
    for member in pipeline.members:
        stage(2, f"training {member.name} ({member.architecture} @{member.preprocessing.size}, {args.epochs} epochs, from scratch)")
        train({
            "backbone": member.architecture, "data": str(data.root), "out": str(out / member.name),
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "save_state": False,  # no resumable last.pt: the demo reruns from scratch anyway
        })

    stage(2, f"training the lesion segmenter (U-Net, {LESION_SEGMENT.segmenter.encoder} encoder, from scratch) "
             f"at {' then '.join(map(str, DEMO_SEGMENTER_SIZES))} px on the lesions' own masks")
    train_segmenter({"data": str(data.root), "out": str(out / "segmenter"), "sizes": list(DEMO_SEGMENTER_SIZES),
                     "frozen_epochs": 0, "unfrozen_epochs": args.epochs, "unfrozen_lr": args.lr,
                     "batch_size": args.batch_size, "seed": args.seed, "save_state": False})

    stage(2, "crop-guided members: each image cut to its lesion as the segmenter finds it (+ margin), then trained")
    crop_dir = out / "crop"
    rows = segmenter_boxes(load_dataset(data.root), out / "segmenter" / "checkpoint.pt", progress=False)
    write_boxes(crop_dir / "boxes.csv", rows)
    print(f"  boxes: lesion found in {sum(b.box != NO_BOX for _, b in rows)}/{len(rows)} images -> {crop_dir / 'boxes.csv'}")
    for member in LESION_CROP_CLASSIFIER.members:
        stage(2, f"training {member.name} ({member.architecture} @{DEMO_CROP_SIZE} on lesion crops, {args.epochs} epochs)")
        train({
            "backbone": member.architecture, "data": str(data.root), "out": str(crop_dir / member.name),
            "splits": str(out / "splits.csv"),  # the whole-image members' split: one held-out set for both
            "crop_boxes": str(crop_dir / "boxes.csv"), "input_size": DEMO_CROP_SIZE,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "save_state": False,
        })

    stage(2, f"training the lesion detector ({DEMO_DETECTOR['model']} @{DEMO_DETECTOR['imgsz']}, {DEMO_DETECTOR['epochs']} epochs, "
             "from scratch, offline) on the lesions' mask boxes")
    from lesionserve.detection.dataset import write_dataset
    from lesionserve.detection.train import train_detector
    from lesionserve.training.masks import load_mask_index
    from lesionserve.training.splits import read_splits

    splits = read_splits(out / "splits.csv")
    write_dataset({k: v for k, v in splits.items() if k in ("train", "val")}, out / "detector" / "data", "masks",
                  load_mask_index(data.masks_csv), progress=False)
    weights = train_detector(out / "detector" / "data" / "data.yaml", out / "detector",
                             {**DEMO_DETECTOR, "seed": args.seed, "plots": False})

    stage(2, f"training the ViT melanoma classifier ({DEMO_VIT['timm_name']} @{DEMO_VIT['input_size']}, heads ham10000 and ph2, "
             f"gradual unfreezing over {DEMO_VIT['epochs']} epochs, from scratch)")
    from lesionserve.vit.data import write_synthetic_ph2
    from lesionserve.vit.train import load_recipe, train_vit

    vit_dir = out / "vit"
    # PH2's diagnoses, synthetic stand-ins rendered apart: shared images would leak through the shared backbone.
    ph2_data = generate_dataset(out / "ph2_data", class_counts={"MEL": 20, "NV": 20, "BKL": 20}, seed=args.seed + 2000,
                                overwrite=True, progress=False)
    ph2_csv = write_synthetic_ph2(load_dataset(ph2_data.root), vit_dir / "ph2_synthetic.csv")
    vit_checkpoint = train_vit(load_recipe(overrides={**DEMO_VIT, "seed": args.seed}),
                               {"ham10000": str(data.root), "ph2": str(ph2_csv)}, vit_dir / "run", progress=False)

    stage(3, f"calibrating fusion weights and thresholds on validation TTA outputs (T={args.views})")
    calibration = calibrate(out, views=args.views)
    print("  weights: " + ", ".join(f"{k} {v:.3f}" for k, v in calibration.weights.items()))
    print("  thresholds: " + ", ".join(f"{k} {v:.3f} ({calibration.meta['threshold_selection'][k]})" for k, v in calibration.thresholds.items()))
    crop_calibration = calibrate(crop_dir, views=args.views, pipeline=LESION_CROP_CLASSIFIER)
    print("  crop members' weights: " + ", ".join(f"{k} {v:.3f}" for k, v in crop_calibration.weights.items()))
    from lesionserve.vit.evaluate import evaluate_checkpoint

    vit_metrics = evaluate_checkpoint(vit_checkpoint, vit_dir / "run" / "splits.json", vit_dir / "served", n_boot=200, progress=False)
    print("  ViT operating thresholds (melanoma sensitivity >= 0.9 on validation): "
          + ", ".join(f"{h} {m['threshold']:.3f}" for h, m in vit_metrics.items()))

    stage(4, "exporting ONNX (each checked against PyTorch)")
    for folder, backbone in [(out, b) for b in pipeline.member_names] + [(crop_dir, b) for b in LESION_CROP_CLASSIFIER.member_names]:
        r = export_onnx(folder / backbone / "checkpoint.pt", folder / backbone / "model.onnx")
        print(f"  {backbone}: max |ORT - torch| on logits {r.max_abs_diff:.2e} (limit {r.atol:.0e})")
    r = export_segmenter(out / "segmenter" / "checkpoint.pt", out / "segmenter" / "model.onnx")
    print(f"  segmenter: max |ORT - torch| on logits {r.max_abs_diff:.2e}; masks agree on {r.mask_agreement:.4%} of pixels")
    from lesionserve.detection.export import export_detector

    r = export_detector(weights, out / "detector" / "model.onnx", imgsz=DEMO_DETECTOR["imgsz"])
    print(f"  detector: max |ORT - PyTorch| on the head outputs {r.max_abs_diff:.2e} (limit {r.atol:.0e})")
    from lesionserve.vit.export import MAP_ATOL, PROB_ATOL, export_vit

    r = export_vit(vit_checkpoint, vit_dir / "served" / "model.onnx")
    print(f"  vit: max |ORT - PyTorch| on probabilities {max(r.prob_diff.values()):.2e} (limit {PROB_ATOL:.0e}), "
          f"on attention maps {max(r.map_diff.values()):.2e} (limit {MAP_ATOL:.0e})")

    stage(5, "assembling one repository (classifier, segmenter, crop-guided classifier, detector, ViT) and starting tritonserver")
    # The committed repository serves the classifier alone; with the segmenter, a generated copy.
    repository = assemble_pipelines([(pipeline, out), (LESION_SEGMENT, out / "segmenter"),
                                     (LESION_CROP_CLASSIFIER, crop_dir), (LESION_CROP, None), (LESION_DETECT, out / "detector"),
                                     (MELANOMA_VIT, vit_dir / "served")],
                                    out=out / "model_repository", views=args.views)
    images = sorted(held_out.images_dir.glob("*.jpg"))
    truth = _truth(held_out.labels_csv)
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0) as server:
        print(f"  ready: gRPC {server.grpc_url} (log {server.log_path})")
        stage(6, f"classifying {len(images)} held-out images through the SDK (LesionClient.classify)")
        start = time.perf_counter()
        with LesionClient(server.grpc_url) as client:
            results = client.classify([str(p) for p in images])
        seconds = time.perf_counter() - start
        print(format_table([f"{p.name} (true {truth[p.stem]})" for p in images], results))
        print(f"  {len(images)} images x {args.views} views in {seconds:.2f}s; "
              f"{sum(r.label == truth[p.stem] for p, r in zip(images, results))}/{len(images)} correct")
        with LesionClient(server.grpc_url) as client:  # the same images, explained (Grad-CAM of each label)
            start = time.perf_counter()
            explained = client.classify([str(p) for p in images], explain=True)
            seconds = time.perf_counter() - start
        overlays = write_overlays([str(p) for p in images], explained, str(out / "explain"))
        print(f"  explained in {seconds:.2f}s: {len(overlays)} Grad-CAM overlays in {out / 'explain'} "
              f"(what they show: docs/explanations.md)")
        print("  " + _against_masks(images, explained, data.masks_csv, held_out.masks_csv))
        with LesionClient(server.grpc_url) as client:  # and their lesions, segmented
            start = time.perf_counter()
            lesions = client.segment([str(p) for p in images])
            seconds = time.perf_counter() - start
        print("  " + _segmented(images, lesions, held_out.masks_csv, out / "segment", seconds))
        with LesionClient(server.grpc_url) as client:  # and classified again, on their lesions' crops
            start = time.perf_counter()
            cropped = client.classify([str(p) for p in images], crop=True)
            seconds = time.perf_counter() - start
        print(format_table([f"{p.name} (true {truth[p.stem]})" for p in images], cropped))
        print(f"  crop-guided in {seconds:.2f}s: {sum(r.cropped for r in cropped)}/{len(images)} lesion crops; "
              f"{sum(r.label == truth[p.stem] for p, r in zip(images, cropped))}/{len(images)} correct "
              f"(whole images: {sum(r.label == truth[p.stem] for p, r in zip(images, results))}/{len(images)})")
        with LesionClient(server.grpc_url) as client:  # and the detector's boxes
            start = time.perf_counter()
            detected = client.detect([str(p) for p in images], conf=DEMO_CONF, max_det=DEMO_MAX_DET)
            seconds = time.perf_counter() - start
        print("  " + _detected(images, detected, held_out.masks_csv, out / "detect", seconds))
        with LesionClient(server.grpc_url) as client:  # and the ViT: melanoma or not, by each head
            start = time.perf_counter()
            melanoma = client.melanoma([str(p) for p in images])
            seconds = time.perf_counter() - start
        print(format_melanoma([f"{p.name} (true {truth[p.stem]})" for p in images], melanoma))
        maps = write_pngs([str(p) for p in images], [lambda r=r, p=p: r.overlay(str(p)) for r, p in zip(melanoma, images)],
                          ["attention"] * len(images), str(out / "melanoma"))
        hits = sum(r.heads["ham10000"].melanoma == (truth[p.stem] == "MEL") for p, r in zip(images, melanoma))
        print(f"  melanoma_vit in {seconds:.2f}s: head ham10000 says melanoma for "
              f"{sum(r.heads['ham10000'].melanoma for r in melanoma)}/{len(images)} (correct {hits}/{len(images)}); "
              f"{len(maps)} attention (rollout) overlays in {out / 'melanoma'}")
    print("  tritonserver stopped")

    stage(7, "parity: the same images through the in-process PyTorch reference pipeline")
    reference = ReferencePipeline.from_artifacts(out, views=args.views).run([p.read_bytes() for p in images])
    served = np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in results])
    diff = float(np.abs(served - reference.probs).max())
    same = sum(r.label == l for r, l in zip(results, reference.labels))
    print(f"  max |Triton - reference| over fused probabilities: {diff:.2e}; labels equal {same}/{len(images)}")
    want = SegmentationReference([out / "segmenter" / "checkpoint.pt"]).segment([p.read_bytes() for p in images])
    agree = min(float((got.mask == ref.mask).mean()) for got, ref in zip(lesions, want))
    boxes = sum(got.box == (ref.box if ref.found else None) for got, ref in zip(lesions, want))
    print(f"  segmentation: masks agree with the reference on >= {agree:.4%} of pixels; boxes equal {boxes}/{len(images)}")
    crop_ref = CropReference.from_artifacts([out / "segmenter" / "checkpoint.pt"], crop_dir, views=args.views)
    want_crop = crop_ref.classify([p.read_bytes() for p in images])
    crop_diff = float(np.abs(np.array([[r.probabilities[c] for c in CLASS_NAMES] for r in cropped]) - want_crop.result.probs).max())
    same_crops = sum(r.crop_box == box for r, box in zip(cropped, want_crop.crops))
    print(f"  crop-guided: max |Triton - reference| {crop_diff:.2e}; rectangles equal {same_crops}/{len(images)}; "
          f"labels equal {sum(r.label == l for r, l in zip(cropped, want_crop.result.labels))}/{len(images)}")
    from lesionserve.detection.reference import DetectorReference

    want_det = DetectorReference(out / "detector" / "model.onnx", DEMO_DETECTOR["imgsz"]).detect(
        [p.read_bytes() for p in images], conf=DEMO_CONF, max_det=DEMO_MAX_DET)
    pairs = [(got, ref) for got, ref in zip(detected, want_det) if len(got.detections) == len(ref.scores) and len(ref.scores)]
    det_diff = max([float(np.abs(np.array([d.score for d in got.detections]) - ref.scores).max()) for got, ref in pairs] or [0.0])
    det_boxes = max([float(np.abs(np.array([d.box for d in got.detections]) - ref.boxes).max()) for got, ref in pairs] or [0.0])
    same_counts = sum(len(got.detections) == len(ref.scores) for got, ref in zip(detected, want_det))
    print(f"  detector: box counts equal {same_counts}/{len(images)}; max |score diff| {det_diff:.2e}, "
          f"max |box coordinate diff| {det_boxes:.2e} px")
    from lesionserve.vit.reference import MelanomaReference, served_against_reference

    want_vit = MelanomaReference.from_checkpoint(vit_checkpoint, vit_dir / "served" / "thresholds.json").classify(
        [p.read_bytes() for p in images])
    vit_diff, map_diff, vit_same = served_against_reference(melanoma, want_vit)
    print(f"  melanoma_vit: max |Triton - reference| on probabilities {vit_diff:.2e}, on attention maps {map_diff:.2e}; "
          f"decisions equal {vit_same}/{len(images)}")
    (out / "demo_summary.json").write_text(json.dumps({"parity_max_abs_diff": diff, "labels_equal": same, "images": len(images),
                                                       "crop_parity_max_abs_diff": crop_diff, "vit_parity_max_abs_diff": vit_diff,
                                                       "vit_map_max_abs_diff": map_diff}, indent=2))
    return diff


def _against_masks(images: list[Path], explained: list, train_masks: Path, masks_csv: Path) -> str:
    """One line: the served heatmaps scored against the synthetic lesions' own masks, beside the baselines."""
    from lesionserve.training.map_eval import mean_area_fraction, mean_scores
    from lesionserve.training.masks import load_mask_index, read_mask

    area, _ = mean_area_fraction(load_mask_index(train_masks).values())
    index = load_mask_index(masks_csv)
    s = mean_scores([r.heatmap for r in explained], [read_mask(index[p.stem]) for p in images], area)
    return (f"heatmaps vs the lesions' own masks: mass inside {s['maps']['mass']:.3f} (uniform {s['uniform']['mass']:.3f}, "
            f"centred Gaussian {s['gaussian']['mass']:.3f}); hottest pixel on the lesion {s['maps']['hit']:.2f} "
            f"(Gaussian {s['gaussian']['hit']:.2f})")


def _segmented(images: list[Path], lesions: list, masks_csv: Path, outdir: Path, seconds: float) -> str:
    """Write one overlay per image (mask outline, box) and score the masks against the true ones."""
    from lesionserve.segmentation.metrics import iou
    from lesionserve.training.masks import load_mask_index, read_mask
    from lesionserve_client import encode_png

    outdir.mkdir(parents=True, exist_ok=True)
    index = load_mask_index(masks_csv)
    ious = [iou(r.mask, read_mask(index[p.stem])) for p, r in zip(images, lesions)]
    for p, r in zip(images, lesions):
        (outdir / f"{p.stem}_lesion.png").write_bytes(encode_png(r.overlay(str(p))))
    return (f"segmented in {seconds:.2f}s: lesion found in {sum(r.found for r in lesions)}/{len(lesions)}, mean IoU "
            f"with the true masks {np.mean(ious):.3f}; overlays (outline, box) in {outdir}")


def _detected(images: list[Path], results: list, masks_csv: Path, outdir: Path, seconds: float) -> str:
    """Write one PNG per image with its boxes; score the top box against the lesion's mask box."""
    from lesionserve.detection.boxes import box_iou, mask_box
    from lesionserve.training.masks import load_mask_index, read_mask
    from lesionserve_client import encode_png

    outdir.mkdir(parents=True, exist_ok=True)
    index = load_mask_index(masks_csv)
    ious = []
    for p, r in zip(images, results):
        (outdir / f"{p.stem}_boxes.png").write_bytes(encode_png(r.overlay(str(p))))
        if r.detections:
            ious.append(box_iou(r.detections[0].box, mask_box(read_mask(index[p.stem]))))
    found = sum(bool(r.detections) for r in results)
    return (f"detected in {seconds:.2f}s (conf {DEMO_CONF}, max_det {DEMO_MAX_DET}): {sum(len(r.detections) for r in results)} boxes, a lesion in "
            f"{found}/{len(results)} images; top box vs the true lesion box: mean IoU "
            f"{(np.mean(ious) if ious else 0.0):.3f}; overlays in {outdir}")


def _truth(labels_csv: Path) -> dict[str, str]:
    lines = labels_csv.read_text().splitlines()[1:]
    return {row.split(",")[0]: CLASS_NAMES[[float(v) for v in row.split(",")[1:]].index(1.0)] for row in lines}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "runs" / "demo"), help="work folder (default %(default)s)")
    parser.add_argument("--num-images", type=int, default=140, help="synthetic training+validation images (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per backbone (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="(default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default %(default)s)")
    parser.add_argument("--views", type=int, default=8, choices=(1, 2, 4, 8), help="TTA views served (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    run_demo(args)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
