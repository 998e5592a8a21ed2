"""The served ViT melanoma pipeline against what a user would run instead, side by side in one run.

    python -m benchmarks.melanoma --checkpoint runs/vit/gradual/checkpoint.pt --thresholds runs/vit/gradual/eval/thresholds.json
    python -m benchmarks.melanoma --timm-name deit_tiny_patch16_224                # random weights

On the same images (real HAM10000 JPEGs where present), in turn each round, 8 images per call:
  (a) served          LesionClient.melanoma over gRPC (melanoma_vit: decode, ONNX Runtime with both maps, post)
  (b) pytorch         the in-process reference: PyTorch eager, attention recorded, the same post-processing
  (c) pytorch_no_maps the network alone in PyTorch (timm's fused attention, logits only): the floor a user
                      without maps would pay for the network
  (d) onnxrt          the exported graph in ONNX Runtime in process, the same post-processing
Images/s and p50/p95 latency per call; medians over rounds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lesionserve import prog
from lesionserve.benchmarks.common import DEFAULT_OUT, cycle, interleaved_rounds, load_images, machine_info, write_json

BATCH = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m benchmarks.melanoma"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint.pt of vit-train (default: random weights)")
    parser.add_argument("--thresholds", type=Path, help="thresholds.json of vit-evaluate (default: 0.5 per head)")
    parser.add_argument("--timm-name", default="deit_tiny_patch16_224", help="configuration for random weights (default %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="input side for random weights (default %(default)s)")
    parser.add_argument("--images", default="auto", help="folder of .jpg files, 'synthetic', or 'auto' (real HAM10000 if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--calls", type=int, default=2, help="calls of 8 images per way and round (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ORT threads in process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "melanoma", help="results folder (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import json

    import torch

    from lesionserve.export.assemble import assemble_pipelines
    from lesionserve.preprocessing import preprocess_batch
    from lesionserve.server import TritonServer
    from lesionserve.vit.export import export_vit
    from lesionserve.vit.model import MultiHeadViT, load_checkpoint, save_checkpoint
    from lesionserve.vit.reference import MelanomaReference, load_thresholds
    from lesionserve.vit.spec import MELANOMA_VIT, ViTModel
    from lesionserve_client import LesionClient

    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    artifacts = args.out / "artifacts"
    checkpoint = args.checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = artifacts / "checkpoint.pt"
        save_checkpoint(MultiHeadViT(ViTModel(timm_name=args.timm_name, input_size=args.size)), checkpoint)
    model, _ = load_checkpoint(checkpoint)
    heads = model.spec.heads
    thresholds = load_thresholds(args.thresholds, heads) if args.thresholds else {h: 0.5 for h in heads}
    export_vit(checkpoint, artifacts / "model.onnx")
    (artifacts / "thresholds.json").write_text(json.dumps({"thresholds": thresholds, "chosen_on": str(args.thresholds or "fixed 0.5")}))
    repo = assemble_pipelines([(MELANOMA_VIT, artifacts)], out=args.out / "repository")
    images, source = load_images(args.images, 16)
    print(f"images: {source}\nmachine: {machine_info()}\nnetwork: {model.spec.timm_name} @{model.spec.input_size}, heads {', '.join(heads)}",
          flush=True)
    pytorch = MelanomaReference.from_checkpoint(checkpoint, thresholds, threads=args.threads)
    onnxrt = MelanomaReference.from_onnx(artifacts / "model.onnx", thresholds, threads=args.threads)
    pre = model.spec.preprocessing

    def no_maps(blobs: list[bytes]) -> object:
        with torch.no_grad():
            return model(torch.from_numpy(preprocess_batch(blobs, [pre])[pre]))

    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, log_path=args.out / "tritonserver.log",
                      startup_timeout=300) as server, LesionClient(server.grpc_url, timeout=600) as client:
        ways = {"served": lambda take=cycle(images, BATCH): client.melanoma(take()),
                "pytorch": lambda take=cycle(images, BATCH): pytorch.classify(take()),
                "pytorch_no_maps": lambda take=cycle(images, BATCH): no_maps(take()),
                "onnxrt": lambda take=cycle(images, BATCH): onnxrt.classify(take())}
        figures = interleaved_rounds(ways, BATCH, args.calls, args.rounds)[1]
    write_json(args.out / "melanoma.json", {"images": source, "checkpoint": str(args.checkpoint or "random"),
                                            "network": model.spec.to_dict(), "medians": figures})
    lines = [f"melanoma_vit ({model.spec.timm_name} @{model.spec.input_size}), 8 images per call, medians of {args.rounds} rounds:"]
    lines += [f"  {k}: {v['images_per_s']} img/s, p50 {v['p50_ms']} ms, p95 {v['p95_ms']} ms" for k, v in figures.items()]
    lines.append(f"  served vs pytorch x{figures['served']['images_per_s'] / figures['pytorch']['images_per_s']:.2f}, "
                 f"vs onnxrt x{figures['served']['images_per_s'] / figures['onnxrt']['images_per_s']:.2f}, "
                 f"vs pytorch_no_maps x{figures['served']['images_per_s'] / figures['pytorch_no_maps']['images_per_s']:.2f}")
    (args.out / "melanoma.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
