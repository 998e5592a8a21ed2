"""The served detector against what a user would run instead, side by side in one run.

    python -m benchmarks.detect --weights runs/det/yolo/train/weights/best.pt     # trained weights

On the same images (real HAM10000 JPEGs where present), at each imgsz (default 640 and 320), in
turn each round, 8 images per call:
  (a) served       LesionClient.detect over gRPC (lesion_detect: letterbox, ONNX Runtime, NMS)
  (b) ultralytics  YOLO(weights.pt).predict in process (PyTorch)
  (c) ultralytics_onnx  YOLO(model.onnx).predict in process (its ONNX Runtime backend)
  (d) reference    the project's in-process pipeline (DetectorReference: ONNX Runtime, the served NMS)
Images/s and p50/p95 latency per call; medians over rounds. All at conf 0.25, IoU 0.7, max_det 300.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from lesionserve import prog
from lesionserve.benchmarks.common import DEFAULT_OUT, cycle, interleaved_rounds, load_images, machine_info, write_json

BATCH = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.detect"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="ultralytics .pt weights of a 7-class lesion detector")
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 320], help="letterbox sides (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=2, help="calls of 8 images per way and round (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ORT threads in process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "detect", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lesionserve.detection.export import export_detector
    from lesionserve.detection.reference import DetectorReference
    from lesionserve.detection.spec import LESION_DETECT
    from lesionserve.detection.train import offline_environment
    from lesionserve.export.assemble import assemble_pipelines
    from lesionserve.server import TritonServer
    from lesionserve_client import LesionClient

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    offline_environment(args.out / ".ultralytics")
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(args.threads)
    images, source = load_images(args.images, 16)
    folder = Path(tempfile.mkdtemp(prefix="det_images_", dir=args.out))
    paths = []
    for i, blob in enumerate(images):  # ultralytics predicts from files; the same bytes as served
        paths.append(folder / f"{i:02d}.jpg")
        paths[-1].write_bytes(blob)
    pairs, onnx = [], {}
    for size in args.sizes:
        artifacts = args.out / f"detector_{size}"
        export_detector(args.weights, artifacts / "model.onnx", imgsz=size)
        onnx[size] = artifacts / "model.onnx"
        pairs.append((dataclasses.replace(LESION_DETECT, name=f"lesion_detect_{size}", detector=f"detector_{size}"), artifacts))
    repo = assemble_pipelines(pairs, out=args.out / "repository")
    print(f"images: {source}\nmachine: {machine_info()}\nweights: {args.weights}", flush=True)
    torch_model, onnx_models = YOLO(str(args.weights)), {s: YOLO(str(p), task="detect") for s, p in onnx.items()}
    references = {s: DetectorReference(p, s, threads=args.threads) for s, p in onnx.items()}
    figures: dict[int, dict] = {}
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=args.out / "tritonserver.log",
                      startup_timeout=300) as server, LesionClient(server.grpc_url, timeout=600) as client:
        for size in args.sizes:
            opts = {"imgsz": size, "conf": 0.25, "iou": 0.7, "max_det": 300, "rect": False, "verbose": False}
            ways = {"served": lambda take=cycle(images, BATCH), s=size: client.detect(take(), model_name=f"lesion_detect_{s}"),
                    "ultralytics": lambda take=cycle(paths, BATCH): torch_model.predict([str(p) for p in take()], **opts),
                    "ultralytics_onnx": lambda take=cycle(paths, BATCH), s=size: onnx_models[s].predict([str(p) for p in take()], **opts),
                    "reference": lambda take=cycle(images, BATCH), s=size: references[s].detect(take())}
            figures[size] = interleaved_rounds(ways, BATCH, args.calls, args.rounds, label=f"imgsz {size} ")[1]
    write_json(args.out / "detect.json", {"images": source, "weights": str(args.weights), "medians": figures})
    lines = [f"detector, 8 images per call, medians of {args.rounds} rounds:"]
    for size, rows in figures.items():
        lines += [f"  imgsz {size}:"] + [f"    {k}: {v['images_per_s']} img/s, p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms" for k, v in rows.items()]
        lines.append(f"    served vs ultralytics (PyTorch) x{rows['served']['images_per_s'] / rows['ultralytics']['images_per_s']:.2f}, "
                     f"vs ultralytics (ONNX Runtime) x{rows['served']['images_per_s'] / rows['ultralytics_onnx']['images_per_s']:.2f}")
    (args.out / "detect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
