"""Train one backbone of the LesionServe ensemble on an ISIC 2018 Task 3 style directory.

    python -m training.train --backbone resnet50 --data DIR --out runs/resnet50

The model is a timm backbone with a 7-class head built by ``lesionserve.models.create_backbone``
(randomly initialised), trained with Adam and cross-entropy. After every epoch the validation
split is scored (balanced accuracy = mean per-class recall) and the best epoch's weights are kept.

Files written to --out (created if needed; rewritten after every epoch, so an interrupted run
leaves a consistent set):

* ``checkpoint.pt``  best weights, via ``lesionserve.models.save_checkpoint`` (atomic replace),
  with ``config`` and ``metrics`` entries; reload with ``lesionserve.models.load_checkpoint``.
* ``config.json``    the resolved configuration (input size, class names, data path, seed, ...).
* ``metrics.json``   best_epoch, val_balanced_accuracy, per_class_recall (null for a class absent
  from the validation split), confusion_matrix, split class counts and the per-epoch history.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.spec import BACKBONE_NAMES, CLASS_NAMES, NUM_CLASSES, get_backbone
from training.data import LesionDataset, class_counts, load_isic_dir, stratified_split
from training.metrics import balanced_accuracy, confusion_matrix, recall_from_confusion

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
MIN_INPUT_SIZE = 32


@dataclasses.dataclass
class TrainConfig:
    """Training options; ``None`` fields are resolved by ``resolve_config``."""

    backbone: str
    data: str
    out: str
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.25
    seed: int = 0
    threads: int | None = None  # default: os.cpu_count()
    max_steps_per_epoch: int | None = None  # default: the whole training split
    input_size: int | None = None  # default: the backbone's native input size


def resolve_config(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``config`` and fill in defaults; returns the JSON-ready dict saved as config.json."""
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = TrainConfig(**config)
    spec = get_backbone(config.backbone)  # ValueError listing the valid names

    data = Path(config.data).expanduser().resolve()
    if not data.is_dir():
        raise FileNotFoundError(f"data directory not found: {data}")

    def positive(name: str, value: float) -> None:
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")

    positive("epochs", config.epochs)
    positive("batch_size", config.batch_size)
    positive("lr", config.lr)
    if config.weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    threads = config.threads if config.threads is not None else (os.cpu_count() or 1)
    positive("threads", threads)
    if config.max_steps_per_epoch is not None:
        positive("max_steps_per_epoch", config.max_steps_per_epoch)
    input_size = config.input_size if config.input_size is not None else spec.input_size
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE}, got {input_size}")

    return {
        "backbone": spec.name,
        "timm_name": spec.timm_name,
        "input_size": int(input_size),
        "native_input_size": spec.input_size,
        "class_names": list(CLASS_NAMES),
        "data": str(data),
        "out": str(Path(config.out).expanduser().resolve()),
        "epochs": int(config.epochs),
        "batch_size": int(config.batch_size),
        "lr": float(config.lr),
        "weight_decay": float(config.weight_decay),
        "val_fraction": float(config.val_fraction),
        "seed": int(config.seed),
        "threads": int(threads),
        "max_steps_per_epoch": None if config.max_steps_per_epoch is None else int(config.max_steps_per_epoch),
        "optimizer": "adam",
        "loss": "cross_entropy",
        "pretrained": False,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _recall_dict(recall: np.ndarray) -> dict[str, float | None]:
    return {name: (None if math.isnan(r) else float(r)) for name, r in zip(CLASS_NAMES, recall)}


@torch.inference_mode()
@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, loader: DataLoader, max_batches: int = 50) -> None:
    """Replace BatchNorm running statistics by exact averages over ``loader`` ("precise BN").

    With few optimiser steps (short or small runs) the exponential running averages are still far
    from the true statistics and eval-mode predictions collapse to one class; exact averages over
    the training images fix that at the cost of one forward pass.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    model.train()
    for i, (images, _) in enumerate(loader):
        if i >= max_batches:
            break
        model(images)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, Any]:
    """Loss, accuracy, balanced accuracy, per-class recall and confusion matrix on ``loader``."""
    model.eval()
    losses, preds, labels = [], [], []
    for images, targets in loader:
        logits = model(images)
        losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item())
        preds.append(logits.argmax(dim=1).numpy())
        labels.append(targets.numpy())
    y_pred = np.concatenate(preds)
    y_true = np.concatenate(labels)
    cm = confusion_matrix(y_true, y_pred, NUM_CLASSES)
    return {
        "loss": float(sum(losses) / len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, NUM_CLASSES),
        "per_class_recall": _recall_dict(recall_from_confusion(cm)),
        "confusion_matrix": cm.tolist(),
    }


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train as configured, write checkpoint.pt / config.json / metrics.json, return the metrics dict."""
    cfg = resolve_config(config)
    out = Path(cfg["out"])
    torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])

    samples = load_isic_dir(cfg["data"])
    train_samples, val_samples = stratified_split(samples, cfg["val_fraction"], cfg["seed"])
    if not val_samples:
        raise ValueError(
            f"validation split is empty: no class in {cfg['data']} has 2 or more images ({len(samples)} images)"
        )
    size = cfg["input_size"]
    train_ds = LesionDataset(train_samples, size, train=True, seed=cfg["seed"])
    val_ds = LesionDataset(val_samples, size, train=False)
    batch_size = cfg["batch_size"]
    # A final batch of one image breaks BatchNorm in training mode; drop it in that case only.
    drop_last = len(train_ds) > batch_size and len(train_ds) % batch_size == 1
    train_loader = DataLoader(
        train_ds, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=drop_last,
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=0)
    # Training images through the eval transform, for BatchNorm statistics (see recompute_bn_stats).
    bn_loader = DataLoader(
        LesionDataset(train_samples, size, train=False), batch_size=batch_size, shuffle=False, num_workers=0
    )
    steps = len(train_loader)
    if cfg["max_steps_per_epoch"] is not None:
        steps = min(steps, cfg["max_steps_per_epoch"])

    model = create_backbone(cfg["backbone"])
    # A zero head starts every run at loss ln(7): timm's EfficientNet head init alone gives logits
    # large enough (initial loss ~7) to destabilise short from-scratch runs.
    torch.nn.init.zeros_(model.get_classifier().weight)
    torch.nn.init.zeros_(model.get_classifier().bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    loss_fn = torch.nn.CrossEntropyLoss()
    out.mkdir(parents=True, exist_ok=True)

    metrics: dict[str, Any] = {
        "backbone": cfg["backbone"],
        "input_size": size,
        "best_epoch": None,
        "val_balanced_accuracy": None,
        "per_class_recall": None,
        "confusion_matrix": None,
        "train_samples": len(train_samples),
        "val_samples": len(val_samples),
        "train_class_counts": class_counts(train_samples),
        "val_class_counts": class_counts(val_samples),
        "history": [],
    }
    print(
        f"{cfg['backbone']} @ {size}px: {len(train_samples)} train / {len(val_samples)} val images, "
        f"{steps} steps/epoch, {cfg['threads']} threads",
        file=sys.stderr,
    )
    best = -math.inf
    for epoch in range(1, cfg["epochs"] + 1):
        started = time.perf_counter()
        model.train()
        train_ds.set_epoch(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg['epochs']}", unit="step", leave=True, file=sys.stderr)
        for step, (images, targets) in enumerate(train_loader, start=1):
            if step > steps:
                break
            logits = model(images)
            loss = loss_fn(logits, targets)
            if not torch.isfinite(loss):
                bar.close()
                raise RuntimeError(f"training loss is not finite at epoch {epoch} step {step} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = targets.shape[0]
            loss_sum += loss.item() * n
            correct += int((logits.detach().argmax(dim=1) == targets).sum())
            seen += n
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.update(1)
        bar.close()

        recompute_bn_stats(model, bn_loader)
        val = evaluate(model, val_loader)
        seconds = time.perf_counter() - started
        is_best = val["balanced_accuracy"] > best
        metrics["history"].append({
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "train_images": seen,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_bacc": val["balanced_accuracy"],
            "seconds": seconds,
        })
        if is_best:
            best = val["balanced_accuracy"]
            metrics.update(
                best_epoch=epoch,
                val_balanced_accuracy=val["balanced_accuracy"],
                per_class_recall=val["per_class_recall"],
                confusion_matrix=val["confusion_matrix"],
            )
            save_checkpoint(out / CHECKPOINT_NAME, cfg["backbone"], model, extra={"config": cfg, "metrics": metrics})
            _write_json(out / CONFIG_NAME, cfg)
        _write_json(out / METRICS_NAME, metrics)
        print(
            f"epoch {epoch}: train_loss={loss_sum / max(seen, 1):.4f} val_bacc={val['balanced_accuracy']:.4f} "
            f"val_acc={val['accuracy']:.4f} {seconds:.1f}s" + (" (best, saved)" if is_best else ""),
            file=sys.stderr,
        )
    return metrics


def _backbone_arg(value: str) -> str:
    try:
        return get_backbone(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description=(
            "Train one LesionServe backbone (timm, from scratch, 7 ISIC 2018 classes) with Adam and "
            "cross-entropy. The data is split per class into train/val; after each epoch the val "
            "balanced accuracy (mean per-class recall) is computed and the best epoch is kept."
        ),
        epilog=(
            "data layout: DIR/*_Input/<image>.jpg and DIR/*_GroundTruth/*.csv with header "
            f"image,{','.join(CLASS_NAMES)} and one-hot rows. "
            "outputs in --out: checkpoint.pt (best weights; load with lesionserve.models.load_checkpoint), "
            "config.json (resolved settings), metrics.json (best_epoch, val_balanced_accuracy, "
            "per_class_recall, history per epoch)."
        ),
    )
    parser.add_argument("--backbone", required=True, type=_backbone_arg, metavar="{" + ",".join(BACKBONE_NAMES) + "}",
                        help="architecture to train")
    parser.add_argument("--data", required=True, metavar="DIR", help="ISIC 2018 Task 3 style dataset directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files overwritten)")
    parser.add_argument("--epochs", type=int, default=2, metavar="N", help="training epochs (default: 2)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per step (default: 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay (default: 1e-4)")
    parser.add_argument("--val-fraction", type=float, default=0.25, metavar="F",
                        help="fraction of each class held out for validation (default: 0.25; at least 1 "
                             "image per class with 2 or more)")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, shuffling, augmentation and init (default: 0)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: os.cpu_count())")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="N",
                        help="stop each epoch after N steps (default: the whole training split)")
    parser.add_argument("--input-size", type=int, default=None, metavar="S",
                        help="square input size in pixels (default: the backbone's: "
                             + ", ".join(f"{name} {get_backbone(name).input_size}" for name in BACKBONE_NAMES) + ")")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = TrainConfig(**{k: v for k, v in vars(args).items()})
    try:
        metrics = train(config)
    except (FileNotFoundError, ValueError) as exc:  # DatasetError and ImageDecodeError are ValueErrors
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(json.dumps({k: metrics[k] for k in ("best_epoch", "val_balanced_accuracy", "per_class_recall")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
