"""Crop-guided classification: the ensemble mode against the BLS mode, and both against what a
user would run instead, side by side in one run on one server.

    python -m benchmarks.crop                                    # random weights, classifiers at 128 px
    python -m benchmarks.crop --segmenter runs/seg_real/segmenter --crop-artifacts runs/crop_real \\
        --whole-artifacts runs/ham_cam                           # trained models (model.onnx in each)

On the same images (real HAM10000 JPEGs where present), in turn each round, 8 images per call:
  (a) whole      LesionClient.classify: the whole-image ensemble, no segmentation (lesion_ensemble)
  (b) ensemble   classify(crop=True) through the Triton ensemble (segmenter -> crop step -> members)
  (c) bls        classify(crop=True) through the BLS model (lesion_segment, crop, PNG, lesion_crop_classify)
  (d) pytorch    the in-process reference: CropReference (U-Net and members in PyTorch eager)
  (e) onnxrt     the same steps in process with ONNX Runtime sessions configured as served
Images/s and p50/p95 per call; medians over rounds. Every pipeline runs at the same T views. Then
where one call's time goes, in process with ONNX Runtime: decode + the segmenter's preprocessing,
the segmenter, its post-processing (the boxes), and the crop + classification (second decode, crop,
preprocessing, views, members, fusion, decision).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from lesionserve import prog
from lesionserve.benchmarks.common import DEFAULT_OUT, cycle, interleaved_rounds, load_images, machine_info, write_json

BATCH = 8


def _export_members(artifacts: Path, pipeline) -> None:
    """Export each member's checkpoint to model.onnx where it is missing (checked against PyTorch)."""
    from lesionserve.export.onnx_export import export_onnx

    for member in pipeline.member_names:
        if not (artifacts / member / "model.onnx").is_file():
            export_onnx(artifacts / member / "checkpoint.pt", artifacts / member / "model.onnx")


def _random_parts(out: Path, size: int, segmenter_size: int) -> tuple[Path, Path, Path]:
    from lesionserve.benchmarks.segment import random_segmenter
    from lesionserve.calibration import Calibration
    from lesionserve.export.random_artifacts import build_random_artifacts
    from lesionserve.export.segmenter_export import export_segmenter
    from lesionserve.pipelines import LESION_CROP_CLASSIFIER, LESION_ENSEMBLE

    parts = []
    for pipeline in (LESION_ENSEMBLE, LESION_CROP_CLASSIFIER):
        folder = out / f"random_{pipeline.name}"
        if not (folder / "calibration.json").is_file():
            build_random_artifacts(folder, Calibration(weights={m: 1 / 3 for m in pipeline.member_names}),
                                   input_size=size, pipeline=pipeline)
        parts.append(folder)
    checkpoint = random_segmenter(out, segmenter_size)
    if not (checkpoint.parent / "model.onnx").is_file():
        export_segmenter(checkpoint, checkpoint.parent / "model.onnx")
    return parts[0], parts[1], checkpoint.parent


class OrtCrop:
    """The crop pipeline in process with ONNX Runtime: the segmenter's session, the served
    post-processing and crop, OrtPipeline for the crop members. Its stages are timed apart."""

    def __init__(self, segmenter: Path, crop: Path, views: int, threads: int) -> None:
        from lesionserve.benchmarks.pipelines import OrtPipeline, input_size
        from lesionserve.onnx_session import make_session
        from lesionserve.pipelines import LESION_CROP_CLASSIFIER
        from lesionserve.segmentation.spec import LESION_CROP, SEGMENTER

        self.session = make_session(segmenter / "model.onnx", threads)
        self.size, self.spec = input_size(self.session), SEGMENTER
        self.classifier = OrtPipeline.from_onnx(crop, views, threads, pipeline=LESION_CROP_CLASSIFIER)
        self.classifier.crop_margin = LESION_CROP.margin

    def decode(self, blobs: list[bytes]):
        from lesionserve.preprocessing import decode_image, preprocess_rgb

        rgbs = [decode_image(b) for b in blobs]
        return rgbs, np.stack([preprocess_rgb(rgb, self.size, self.spec.normalization) for rgb in rgbs])

    def network(self, x):
        from lesionserve.segmentation.spec import SEGMENTER_INPUT

        return self.session.run(None, {SEGMENTER_INPUT: x})[0]

    def boxes(self, rgbs, logits) -> list:
        from lesionserve.segmentation.postprocess import lesion_boxes

        sizes = np.array([(rgb.shape[1], rgb.shape[0]) for rgb in rgbs], np.int32)
        return lesion_boxes(logits, sizes, np.zeros(len(rgbs), bool), self.spec.threshold)

    def classify(self, blobs: list[bytes]):
        rgbs, x = self.decode(blobs)
        return self.classifier.run(blobs, self.boxes(rgbs, self.network(x)))

    def time_split(self, blobs: list[bytes]) -> dict[str, float]:
        t0 = time.perf_counter()
        rgbs, x = self.decode(blobs)
        t1 = time.perf_counter()
        logits = self.network(x)
        t2 = time.perf_counter()
        boxes = self.boxes(rgbs, logits)
        t3 = time.perf_counter()
        self.classifier.run(blobs, boxes)
        t4 = time.perf_counter()
        return {"decode_preprocess_ms": round(1000 * (t1 - t0), 1), "segmenter_ms": round(1000 * (t2 - t1), 1),
                "boxes_ms": round(1000 * (t3 - t2), 1), "crop_and_classify_ms": round(1000 * (t4 - t3), 1)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.crop"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segmenter", type=Path, help="segmenter folder (checkpoint.pt, model.onnx); default: random")
    parser.add_argument("--crop-artifacts", type=Path, help="crop members' artifacts (lesion_crop_classify); default: random")
    parser.add_argument("--whole-artifacts", type=Path, help="whole-image members' artifacts (lesion_ensemble); default: random")
    parser.add_argument("--size", type=int, default=128, help="classifier side for random weights (default %(default)s)")
    parser.add_argument("--segmenter-size", type=int, default=192, help="segmenter side for random weights (default %(default)s)")
    parser.add_argument("--views", type=int, default=1, choices=(1, 2, 4, 8), help="TTA views of every pipeline (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=3, help="calls of 8 images per way and round (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "crop", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from lesionserve.export.assemble import assemble_pipelines
    from lesionserve.pipelines import LESION_CROP_CLASSIFIER, LESION_ENSEMBLE
    from lesionserve.segmentation.reference import CropReference
    from lesionserve.segmentation.spec import LESION_CROP, LESION_SEGMENT
    from lesionserve.server import TritonServer
    from lesionserve_client import LesionClient

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    whole, crop, segmenter = _random_parts(args.out, args.size, args.segmenter_size) if not (
        args.segmenter and args.crop_artifacts and args.whole_artifacts) else (args.whole_artifacts, args.crop_artifacts, args.segmenter)
    _export_members(whole, LESION_ENSEMBLE)
    _export_members(crop, LESION_CROP_CLASSIFIER)
    bls = dataclasses.replace(LESION_CROP, name="lesion_crop_bls", mode="bls")
    images, source = load_images(args.images, 16)
    repo = assemble_pipelines([(LESION_ENSEMBLE, whole), (LESION_SEGMENT, segmenter), (LESION_CROP_CLASSIFIER, crop),
                               (LESION_CROP, None), (bls, None)], out=args.out / "repository", views=args.views)
    reference = CropReference.from_artifacts([segmenter / "checkpoint.pt"], crop, views=args.views)
    ort_crop = OrtCrop(segmenter, crop, args.views, args.threads)
    print(f"images: {source}\nmachine: {machine_info()}\nT={args.views}; whole {whole}, crop {crop}, segmenter {segmenter}", flush=True)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=args.out / "tritonserver.log",
                      startup_timeout=300) as server, LesionClient(server.grpc_url, timeout=600) as client:
        ways = {"whole": lambda take=cycle(images, BATCH): client.classify(take()),
                "ensemble": lambda take=cycle(images, BATCH): client.classify(take(), crop=True, crop_model=LESION_CROP.name),
                "bls": lambda take=cycle(images, BATCH): client.classify(take(), crop=True, crop_model=bls.name),
                "pytorch": lambda take=cycle(images, BATCH): reference.classify(take()),
                "onnxrt": lambda take=cycle(images, BATCH): ort_crop.classify(take())}
        rates, figures = interleaved_rounds(ways, BATCH, args.calls, args.rounds)
    rate = {k: v["images_per_s"] for k, v in figures.items()}
    split = ort_crop.time_split(images[:BATCH])
    write_json(args.out / "crop.json", {"views": args.views, "images": source, "rounds": rates, "medians": figures,
                                        "whole": str(whole), "crop": str(crop), "segmenter": str(segmenter),
                                        "time_split_8_images": split})
    lines = [f"crop-guided classification, T={args.views}, 8 images per call, medians of {args.rounds} rounds:",
             *(f"  {k}: {v['images_per_s']} img/s, p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms" for k, v in figures.items()),
             f"  ensemble vs bls x{rate['ensemble'] / rate['bls']:.2f}; ensemble vs pytorch x{rate['ensemble'] / rate['pytorch']:.2f}; "
             f"ensemble vs onnxrt x{rate['ensemble'] / rate['onnxrt']:.2f}; "
             f"crop (ensemble) vs whole image x{rate['ensemble'] / rate['whole']:.2f} (throughput)",
             "  one call of 8 in process (ONNX Runtime): " + ", ".join(f"{k} {v}" for k, v in split.items())]
    (args.out / "crop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
