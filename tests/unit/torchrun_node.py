"""One "node" of tests/unit/test_torchrun_nodes.py: what torchrun starts on each node, plus a report.

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        tests/unit/torchrun_node.py --data DIR --out DIR --splits FILE --report FILE

Runs the real recipe (``lesionserve.training.train.train``) with timm's 0.4 M-parameter test ResNet
in place of ResNet50 (as tests/unit/test_training.py does), then writes what this process trained on
and ended with: digests of its split and of its final weights (every parameter and buffer).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

import lesionserve.training.train as train_module
from lesionserve.spec import CLASS_NAMES


def _tiny_backbone(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASS_NAMES))


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--data", "--out", "--splits", "--report"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()

    seen: dict = {}
    real_build_data, real_build_model = train_module.build_data, train_module.build_model

    def build_data(cfg, rt):  # records the split this process trains and selects on
        seen["data"] = real_build_data(cfg, rt)
        return seen["data"]

    def build_model(cfg, rt):  # keeps the module DDP wraps: its tensors are the trained weights
        model, note = real_build_model(cfg, rt)
        seen["model"] = model
        return model, note

    train_module.create_backbone = _tiny_backbone
    train_module.build_data, train_module.build_model = build_data, build_model
    metrics = train_module.train({
        "backbone": "resnet50", "data": args.data, "out": args.out, "splits": args.splits, "epochs": 2,
        "batch_size": 4, "input_size": 32, "threads": 1, "max_steps_per_epoch": 3, "precise_bn_batches": 1,
        "lr": 1e-3, "device": "cpu",
    })
    data = seen["data"]
    report = {
        "rank": int(os.environ["RANK"]), "group_rank": int(os.environ["GROUP_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "split_sha256": train_module.split_digest({"train": data.train, "val": data.val}),
        "train_ids": [s.image_id for s in data.train], "val_ids": [s.image_id for s in data.val],
        "weights_sha256": weights_digest(seen["model"]),
        "history": metrics["history"], "best_epoch": metrics["best_epoch"],
    }
    Path(args.report).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
