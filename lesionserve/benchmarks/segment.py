"""The served segmenter against what a user would run instead, side by side in one run.

    python -m benchmarks.segment --checkpoint runs/seg/segmenter/checkpoint.pt   # a trained segmenter
    python -m benchmarks.segment                                                  # random weights at 256 px

On the same images (real HAM10000 JPEGs where present), in turn each round:
  (a) served     LesionClient.segment over gRPC, 8 images per request (lesion_segment)
  (b) pytorch    the in-process reference: decode, preprocess, U-Net in PyTorch eager, post-process
  (c) onnxrt     the same with ONNX Runtime on the exported graph, configured as served
Images/s and p50/p95 latency per call of 8 images; then where the time of one call goes in process
(decode + preprocess, the network, post-processing). Medians over rounds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lesionserve import prog
from lesionserve.benchmarks.common import DEFAULT_OUT, cycle, interleaved_rounds, load_images, machine_info, write_json

BATCH = 8


def random_segmenter(out: Path, size: int, seed: int = 0) -> Path:
    """A random-weight segmenter checkpoint at ``size`` (what weights hold does not change its cost)."""
    import torch

    from lesionserve.segmentation.model import save_segmenter
    from lesionserve.segmentation.spec import SEGMENTER

    path = out / "segmenter" / "checkpoint.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        save_segmenter(path, SEGMENTER.create(), size)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.segment"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="segmenter checkpoint (default: random weights at --size)")
    parser.add_argument("--size", type=int, default=256, help="input size of the random segmenter (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=3, help="calls of 8 images per way and round (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ORT threads in process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "segment", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    from lesionserve.export.assemble import assemble_pipelines
    from lesionserve.export.segmenter_export import export_segmenter
    from lesionserve.onnx_session import make_session
    from lesionserve.preprocessing import decode_image, preprocess_rgb
    from lesionserve.segmentation.postprocess import lesion_from_probabilities
    from lesionserve.segmentation.reference import SegmentationReference
    from lesionserve.segmentation.spec import LESION_SEGMENT, SEGMENTER_INPUT
    from lesionserve.server import TritonServer
    from lesionserve_client import LesionClient

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or random_segmenter(args.out, args.size)
    folder = args.out / "segmenter_export"
    export_segmenter(checkpoint, folder / "model.onnx")
    images, source = load_images(args.images, 16)
    reference = SegmentationReference([checkpoint])
    size, spec = reference.ensemble.size, reference.ensemble.spec
    session = make_session(folder / "model.onnx", args.threads)

    # The ONNX Runtime way in its three stages, so the time split below measures the same code.
    def decode(blobs: list[bytes]) -> tuple[list[np.ndarray], np.ndarray]:
        rgbs = [decode_image(b) for b in blobs]
        return rgbs, np.stack([preprocess_rgb(rgb, size, spec.normalization) for rgb in rgbs])

    def network(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-session.run(None, {SEGMENTER_INPUT: x})[0][:, 0]))

    def post(rgbs: list[np.ndarray], probs: np.ndarray) -> list:
        return [lesion_from_probabilities(p, rgb.shape[1], rgb.shape[0], spec.threshold) for p, rgb in zip(probs, rgbs)]

    def ort_segment(blobs: list[bytes]) -> list:
        rgbs, x = decode(blobs)
        return post(rgbs, network(x))

    print(f"images: {source}\nmachine: {machine_info()}\nsegmenter at {size} px", flush=True)
    repo = assemble_pipelines([(LESION_SEGMENT, folder)], out=args.out / "repository")
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=args.out / "tritonserver.log",
                      startup_timeout=300) as server, LesionClient(server.grpc_url, timeout=600) as client:
        ways = {"served": lambda take=cycle(images, BATCH): client.segment(take()),
                "pytorch": lambda take=cycle(images, BATCH): reference.segment(take()),
                "onnxrt": lambda take=cycle(images, BATCH): ort_segment(take())}
        rates, figures = interleaved_rounds(ways, BATCH, args.calls, args.rounds)
    # Where one call's time goes, in process (ORT as served): decode + preprocess, network, post-processing.
    t0 = time.perf_counter()
    rgbs, x = decode(images[:BATCH])
    t1 = time.perf_counter()
    probs = network(x)
    t2 = time.perf_counter()
    post(rgbs, probs)
    t3 = time.perf_counter()
    split = {"decode_preprocess_ms": round(1000 * (t1 - t0), 1), "network_ms": round(1000 * (t2 - t1), 1),
             "postprocess_ms": round(1000 * (t3 - t2), 1)}
    write_json(args.out / "segment.json", {"size": size, "images": source, "rounds": rates, "medians": figures,
                                           "time_split_8_images": split})
    lines = [f"segmenter at {size} px, 8 images per call, medians of {args.rounds} rounds:",
             *(f"  {k}: {v['images_per_s']} img/s, p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms" for k, v in figures.items()),
             f"  served vs pytorch x{figures['served']['images_per_s'] / figures['pytorch']['images_per_s']:.2f}, "
             f"vs onnxrt x{figures['served']['images_per_s'] / figures['onnxrt']['images_per_s']:.2f} (throughput)",
             "  one call of 8 in process: " + ", ".join(f"{k} {v}" for k, v in split.items())]
    (args.out / "segment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
