"""Train one backbone of the LesionServe ensemble with the seed's recipe, without its flaws.

    python -m training.train --backbone resnet50 --data DIR --out runs/exp/resnet50 [--pretrained FILE]
    torchrun --nproc_per_node 4 -m training.train --backbone resnet50 --data DIR --out runs/exp/resnet50

Recipe (``lesionserve/training/recipes.yaml``; every value overridable, see ``--help``): a timm
backbone at its native input size with a zero-initialised 7-class head; class-balanced sampling;
augmentation graded per class by imbalance; focal loss with label smoothing; Adam with gradient clipping;
ReduceLROnPlateau on validation balanced accuracy (or warmup + cosine); precise BatchNorm
statistics before every validation; early stopping and best-checkpoint selection on validation
balanced accuracy. Data is split by lesion into train/val/test (``training.splits``): training
reads "train", selection reads "val", and "test" is never opened here.

Files written to --out (each replaced atomically after every epoch, so an interrupted run leaves
a consistent set; under torchrun only rank 0 writes):

* ``checkpoint.pt``  best weights, via ``lesionserve.models.save_checkpoint``, with ``config`` and
  ``metrics`` entries; reload with ``lesionserve.models.load_checkpoint``.
* ``config.json``    the resolved configuration (also printed at the start).
* ``metrics.json``   best_epoch, val_balanced_accuracy, per_class_recall (null for a class absent
  from validation), confusion_matrix, split counts, augmentation levels and the per-epoch history.
* ``curves.png``     loss (train/val), validation balanced accuracy and learning rate per epoch.
* ``last.pt``        the full training state of the latest epoch, for ``--resume`` (``--no-save-state``: not written).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from lesionserve import prog
from lesionserve.models import create_backbone, save_checkpoint
from lesionserve.architectures import ARCHITECTURES, architecture_arg, get_architecture
from lesionserve.spec import CLASS_NAMES, NUM_CLASSES
from lesionserve.training.augment import LEVEL_NAMES, AugmentedDataset, class_levels
from lesionserve.training.config import (  # noqa: F401  (TrainConfig: re-exported for callers of train())
    OPTIONS,
    REQUIRED_KEYS,
    Option,
    TrainConfig,
    format_config,
    load_recipes,
    recipe_summary,
    resolve_config,
)
from lesionserve.training.curves import plot_curves
from lesionserve.training.data import LesionDataset, Sample, class_counts, load_dataset
from lesionserve.training.losses import FocalLoss
from lesionserve.training.metrics import recall_from_confusion
from lesionserve.training.pretrained import PretrainedUnavailableError, load_pretrained
from lesionserve.training.sampling import EpochSampler, cap_per_class
from lesionserve.training.splits import load_or_create_splits

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
CURVES_NAME = "curves.png"
STATE_NAME = "last.pt"
STATE_FORMAT = "lesionserve-train-state-v1"
#: Below this lr a from-scratch run gets a hint about --profile from_scratch (the seed's lrs assume pretraining).
FROM_SCRATCH_MIN_LR = 5e-4
#: Keys that must be equal between a run and the run it resumes (otherwise the state does not apply).
RESUME_MUST_MATCH = ("backbone", "input_size", "class_names", "splits", "batch_size", "sampler", "schedule")


# ---------------------------------------------------------------------------------- processes and device


@dataclass
class Runtime:
    """Where this process trains: device, DDP rank/world size, mixed precision, data workers."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False
    workers: int = 0
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def describe(self) -> str:
        where = f"{self.device}" + (f", DDP rank {self.rank}/{self.world_size}" if self.distributed else "")
        return f"{where}, mixed precision {'on' if self.amp else 'off'}, {self.workers} data workers"


def setup_runtime(cfg: Mapping[str, Any]) -> Runtime:
    """Pick the device and, when launched by torchrun (WORLD_SIZE > 1), join the process group."""
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False on this machine (use --device cpu)")
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:
        # Before init_process_group: NCCL binds each process to the current device.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, owns = 0, False
    if world_size > 1:
        if not dist.is_initialized():
            # env:// reads MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, which torchrun sets.
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns = True
        rank, world_size = dist.get_rank(), dist.get_world_size()
    # Decoding JPEGs in the main process starves a GPU; on CPU, workers would compete with torch's threads.
    workers = cfg["workers"]
    if workers is None:
        workers = max(1, min(8, (os.cpu_count() or 1) // world_size)) if use_cuda else 0
    return Runtime(device=device, rank=rank, world_size=world_size, amp=use_cuda and cfg["amp"],
                   workers=workers, owns_process_group=owns)


def teardown_runtime(rt: Runtime) -> None:
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(rt: Runtime) -> Iterator[None]:
    """Run the body on rank 0 first, then on the others (shared files: split CSV, weight downloads)."""
    if rt.distributed and not rt.is_main:
        dist.barrier()
    yield
    if rt.distributed and rt.is_main:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Data:
    """The splits a run uses and the loaders over them (the test split is only counted)."""

    train: list[Sample]
    val: list[Sample]
    test_count: int
    pool_count: int
    levels: list[int]
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    bn_loader: DataLoader | None


def load_splits(cfg: Mapping[str, Any], rt: Runtime) -> tuple[dict[str, list[Sample]], int]:
    """The run's splits (created on first use, then read from cfg["splits"]) and the pool size."""
    samples = load_dataset(cfg["data"], cfg["layout"])
    pool = cap_per_class(samples, cfg["max_images_per_class"], cfg["split_seed"])
    with main_first(rt):  # rank 0 writes a new split file; the others then read it
        splits = load_or_create_splits(cfg["splits"], pool, val_fraction=cfg["val_fraction"],
                                       test_fraction=cfg["test_fraction"], seed=cfg["split_seed"])
    check_same_split(rt, splits, cfg["splits"])
    for name in ("train", "val"):
        if not splits.get(name):
            raise ValueError(f"the {name} split in {cfg['splits']} is empty ({len(pool)} images in the pool)")
    return splits, len(pool)


def split_digest(splits: Mapping[str, Sequence[Sample]]) -> str:
    """sha256 of the splits' (part, image id, label) rows: equal digests, equal splits."""
    rows = sorted((part, s.image_id, int(s.label)) for part, members in splits.items() for s in members)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_same_split(rt: Runtime, splits: Mapping[str, Sequence[Sample]], path: str) -> None:
    """Under DDP, refuse to train unless every process holds the same split.

    Across nodes, each node reads (or creates) the split file on its own disk unless --splits is on
    shared storage; a stale file on one node would otherwise train and select on another split.
    """
    if not rt.distributed:
        return
    digests: list[str | None] = [None] * rt.world_size
    dist.all_gather_object(digests, split_digest(splits))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"the split differs between processes (ranks {differ} differ from rank 0): every node must "
                         f"read the same data and the same split file {path} (copy rank 0's, or use shared storage)")


def broadcast_buffers(model: torch.nn.Module, rt: Runtime) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics recomputed per process: equal only
    when every node computes bit for bit alike), so that all hold the weights rank 0 saves."""
    if rt.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def build_data(cfg: Mapping[str, Any], rt: Runtime) -> Data:
    """Training loader (balanced draws, graded augmentation), validation and precise-BN loaders."""
    splits, pool_count = load_splits(cfg, rt)
    train, val = splits["train"], splits["val"]  # sorted by image id (training.splits)
    size, batch = cfg["input_size"], cfg["batch_size"]
    norm = get_architecture(cfg["backbone"]).normalization  # the statistics serving will apply
    labels = [s.label for s in train]
    levels = class_levels(np.bincount(labels, minlength=NUM_CLASSES).tolist(), cfg["augment"])
    sampler = EpochSampler(labels, cfg["sampler"], seed=cfg["seed"], rank=rt.rank, world_size=rt.world_size)
    pin = rt.device.type == "cuda"
    crops = None
    if cfg["crop_boxes"]:
        from lesionserve.segmentation.boxes import CropBoxes

        crops = CropBoxes.read(cfg["crop_boxes"], cfg["crop_margin"])
        missing = sorted({s.image_id for s in train + val} - set(crops.boxes))
        if missing:  # before the first epoch, not in the middle of one
            raise ValueError(f"{cfg['crop_boxes']} has no box for {len(missing)} image(s) of the split, e.g. "
                             f"{', '.join(missing[:3])}: write boxes for the whole split (`lesionserve crop-boxes --splits ...`)")
        rt.log(f"cropping every image to its lesion box (+{cfg['crop_margin']:g} margin) from {cfg['crop_boxes']}: "
               f"lesion found in {crops.found_fraction():.1%}, the others whole")
    # A final batch of one image breaks BatchNorm in training mode; drop it in that case only.
    drop_last = len(sampler) > batch and len(sampler) % batch == 1
    train_loader = DataLoader(AugmentedDataset(train, size, levels, seed=cfg["seed"], normalization=norm, crops=crops), batch_size=batch,
                              sampler=sampler, num_workers=rt.workers, drop_last=drop_last, pin_memory=pin)
    # Each process scores its slice of val; confusion matrices are summed across processes.
    val_loader = DataLoader(LesionDataset(val[rt.rank::rt.world_size], size, norm, crops), batch_size=batch,
                            num_workers=rt.workers, pin_memory=pin)
    bn_loader = None
    if cfg["precise_bn_batches"] > 0 and len(train) > 1:
        # A seeded random subset of training images through the eval transform (the statistics
        # serving will see); a file-order prefix could be one class only. Full batches only: a
        # batch of one image has no variance to measure (BatchNorm raises on it).
        count = min(len(train), cfg["precise_bn_batches"] * batch)
        pick = np.random.default_rng([cfg["seed"], 0xB4]).permutation(len(train))[:count]
        bn_loader = DataLoader(LesionDataset([train[i] for i in sorted(pick)], size, norm, crops),
                               batch_size=min(batch, count), drop_last=True, num_workers=rt.workers, pin_memory=pin)
    return Data(train=train, val=val, test_count=len(splits.get("test", [])), pool_count=pool_count,
                levels=levels, sampler=sampler, train_loader=train_loader, val_loader=val_loader, bn_loader=bn_loader)


# ----------------------------------------------------------------------------------- model and optimiser


def build_model(cfg: Mapping[str, Any], rt: Runtime) -> tuple[torch.nn.Module, str]:
    """The timm backbone with a zero head, optionally starting from pretrained weights; and a note saying which."""
    model = create_backbone(cfg["backbone"])
    # A zero head starts every run at loss ln(7): timm's EfficientNet head init alone gives logits
    # large enough (initial loss ~7) to destabilise short from-scratch runs.
    torch.nn.init.zeros_(model.get_classifier().weight)
    torch.nn.init.zeros_(model.get_classifier().bias)
    if cfg["pretrained"] is not None:
        with main_first(rt):  # a hub download lands in a shared cache: one process at a time
            report = load_pretrained(model, cfg["pretrained"], cfg["timm_name"])
        note = report.describe()
    else:
        note = "no --pretrained: training from scratch"
        if cfg["lr"] < FROM_SCRATCH_MIN_LR:
            note += (f" with lr {cfg['lr']:g}, a rate the seed tuned for pretrained weights; "
                     "--profile from_scratch (lr 1e-3) learns faster from scratch")
    rt.log(note)
    return model.to(rt.device), note


def build_optimizer(cfg: Mapping[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warmup to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """ReduceLROnPlateau on val BACC (stepped per epoch) or warmup + cosine (stepped per optimiser step)."""
    if cfg["schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg["plateau_factor"], patience=cfg["plateau_patience"], min_lr=cfg["min_lr"]
        )
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(cfg["warmup_epochs"] * steps_per_epoch, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, cfg["min_lr"] / cfg["lr"]))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------- epochs


@torch.inference_mode()
@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, loader: DataLoader, max_batches: int = 50,
                       device: torch.device | None = None) -> None:
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
        model(images if device is None else images.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def _balanced_accuracy(cm: np.ndarray) -> float:
    recall = recall_from_confusion(cm)
    return float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")


def _all_reduce_sum(rt: Runtime, *values: np.ndarray) -> list[np.ndarray]:
    """Sum numpy arrays over processes (identity without DDP)."""
    if not rt.distributed:
        return list(values)
    out = []
    for value in values:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        out.append(tensor.cpu().numpy())
    return out


def train_one_epoch(model: torch.nn.Module, data: Data, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    scheduler: Any, loss_fn: torch.nn.Module, cfg: Mapping[str, Any], rt: Runtime, epoch: int,
                    steps: int) -> dict[str, float]:
    """One pass over the epoch's draws; returns train loss, accuracy, balanced accuracy, image count and
    the learning rate of the last step."""
    model.train()
    data.sampler.set_epoch(epoch)
    step_scheduler = not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    loss_sum, seen, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg['epochs']}", unit="step", leave=True, file=sys.stderr,
               disable=not rt.is_main, dynamic_ncols=True)
    for step, (images, targets) in enumerate(itertools.islice(data.train_loader, steps), start=1):
        images = images.to(rt.device, non_blocking=True)
        targets = targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(images)
            loss = loss_fn(logits, targets)
        if not torch.isfinite(loss):
            bar.close()
            raise RuntimeError(f"training loss is not finite at epoch {epoch} step {step} (try a lower --lr)")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["grad_clip"] is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # what this step used; a per-step schedule moves it next
        if step_scheduler:
            scheduler.step()
        n = targets.shape[0]
        loss_sum += loss.item() * n
        seen += n
        np.add.at(cm, (targets.cpu().numpy(), logits.detach().argmax(dim=1).cpu().numpy()), 1)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", bacc=f"{_balanced_accuracy(cm):.3f}")
        bar.update(1)
    bar.close()
    loss_sum, seen, cm = _all_reduce_sum(rt, np.array(loss_sum), np.array(seen), cm)
    seen = int(seen)
    return {"loss": float(loss_sum) / max(seen, 1), "accuracy": float(np.trace(cm)) / max(seen, 1),
            "balanced_accuracy": _balanced_accuracy(cm), "images": seen, "lr": lr}


def validate(model: torch.nn.Module, loader: DataLoader, rt: Runtime) -> dict[str, Any]:
    """Plain cross-entropy, accuracy, balanced accuracy, per-class recall and confusion matrix on val."""
    model.eval()
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    loss_sum = 0.0
    with torch.inference_mode():
        for images, targets in loader:
            with rt.autocast():
                logits = model(images.to(rt.device, non_blocking=True))
            targets = targets.to(rt.device)
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
            np.add.at(cm, (targets.cpu().numpy(), logits.argmax(dim=1).cpu().numpy()), 1)
    loss_sum, cm = _all_reduce_sum(rt, np.array(loss_sum), cm)
    cm = cm.astype(np.int64)
    total = int(cm.sum())
    recall = recall_from_confusion(cm)
    return {
        "loss": float(loss_sum) / total,
        "accuracy": float(np.trace(cm)) / total,
        "balanced_accuracy": _balanced_accuracy(cm),
        "per_class_recall": {n: (None if math.isnan(r) else float(r)) for n, r in zip(CLASS_NAMES, recall)},
        "confusion_matrix": cm.tolist(),
    }


# ------------------------------------------------------------------------------------- state and files


@dataclass
class Progress:
    """Everything about the run so far that is not a tensor: saved in last.pt, restored by --resume."""

    epoch: int = 0  # completed epochs
    best: float = -math.inf
    epochs_since_best: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def should_stop(self, cfg: Mapping[str, Any]) -> str | None:
        """Why training stops now, or None to go on."""
        if self.epoch >= cfg["epochs"]:
            return f"reached {cfg['epochs']} epochs"
        patience = cfg["early_stop_patience"]
        if patience is not None and self.epochs_since_best >= patience:
            return (f"early stop: no better val BACC for {patience} epochs "
                    f"(best {self.best:.4f} at epoch {self.metrics['best_epoch']})")
        return None


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: Path, cfg: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, scaler: torch.amp.GradScaler, progress: Progress) -> None:
    """Write the full training state (atomically) for --resume."""
    payload = {
        "format": STATE_FORMAT, "config": dict(cfg), "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        "progress": progress.__dict__, "rng": _rng_states(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def restore_state(path: str | Path, cfg: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, scaler: torch.amp.GradScaler, rt: Runtime) -> Progress:
    """Load a state written by ``save_state`` into the given objects; returns the progress to continue from."""
    # weights_only=False: the state holds RNG states (numpy tuples); it is a file this script wrote.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state written by training.train (format {STATE_FORMAT}); "
                         f"resume from the {STATE_NAME} in a run's output folder")
    old = state["config"]
    differ = [f"{k}: {old.get(k)!r} there, {cfg[k]!r} here" for k in RESUME_MUST_MATCH if old.get(k) != cfg[k]]
    if differ:
        raise ValueError(f"cannot resume from {path}: the run differs in " + "; ".join(differ))
    changed = sorted(k for k in cfg if k not in ("resume", "out") and k in old and old[k] != cfg[k])
    if changed:
        rt.log("resuming with changed settings: " + ", ".join(f"{k} {old[k]!r} -> {cfg[k]!r}" for k in changed))
    unwrap(model).load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():  # a CPU run's (disabled) scaler has no state to give a GPU run
        scaler.load_state_dict(state["scaler"])
    _set_rng_states(state["rng"])
    progress = Progress(**state["progress"])
    rt.log(f"resumed from {path}: {progress.epoch} epoch(s) done, best val BACC {progress.best:.4f}")
    return progress


def new_metrics(cfg: Mapping[str, Any], data: Data, pretrained: str | None) -> dict[str, Any]:
    return {
        "backbone": cfg["backbone"],
        "input_size": cfg["input_size"],
        "best_epoch": None,
        "val_balanced_accuracy": None,
        "per_class_recall": None,
        "confusion_matrix": None,
        "pool_samples": data.pool_count,
        "train_samples": len(data.train),
        "val_samples": len(data.val),
        "test_samples": data.test_count,
        "train_class_counts": class_counts(data.train),
        "val_class_counts": class_counts(data.val),
        "augment_levels": {n: data.levels[i] for i, n in enumerate(CLASS_NAMES)},
        "pretrained": pretrained,
        "stop_reason": None,
        "history": [],
    }


# --------------------------------------------------------------------------------------------- train


def train(config: Mapping[str, Any] | TrainConfig) -> dict[str, Any]:
    """Train as configured (keys of ``training.config.OPTIONS``); write the run's files, return its metrics.

    ``backbone``, ``data`` and ``out`` are required; every other key defaults to the recipe.
    """
    cfg = resolve_config(config)
    rt = setup_runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        teardown_runtime(rt)


def _train(cfg: dict[str, Any], rt: Runtime) -> dict[str, Any]:
    out = Path(cfg["out"])
    torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])
    rt.log(f"resolved config ({cfg['recipe']}" + (f", profile {cfg['profile']}" if cfg["profile"] else "") + "):\n"
           + format_config(cfg))
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / CONFIG_NAME, cfg)

    data = build_data(cfg, rt)
    model, pretrained_note = build_model(cfg, rt)
    if rt.distributed:
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    steps = len(data.train_loader)
    if cfg["max_steps_per_epoch"] is not None:
        steps = min(steps, cfg["max_steps_per_epoch"])
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp)
    loss_fn = FocalLoss(cfg["focal_gamma"], cfg["label_smoothing"])

    if cfg["resume"] is not None:
        progress = restore_state(cfg["resume"], cfg, model, optimizer, scheduler, scaler, rt)
    else:
        progress = Progress(metrics=new_metrics(cfg, data, pretrained_note))
    metrics = progress.metrics
    rt.log(
        f"{cfg['backbone']} @ {cfg['input_size']}px on {rt.describe()}: {len(data.train)} train / {len(data.val)} val "
        f"images ({data.test_count} test held out), {steps} steps/epoch of {cfg['batch_size']}, "
        f"sampler {cfg['sampler']}, augment {cfg['augment']}: "
        + ", ".join(f"{n} {data.levels[i]}" for i, n in enumerate(CLASS_NAMES))
        + f" (levels: {'; '.join(f'{i} {name}' for i, name in enumerate(LEVEL_NAMES))})"
    )

    while (reason := progress.should_stop(cfg)) is None:
        epoch = progress.epoch + 1
        started = time.perf_counter()
        fit = train_one_epoch(model, data, optimizer, scaler, scheduler, loss_fn, cfg, rt, epoch, steps)
        lr = fit["lr"]
        if data.bn_loader is not None:
            recompute_bn_stats(unwrap(model), data.bn_loader, cfg["precise_bn_batches"], rt.device)
            broadcast_buffers(unwrap(model), rt)
        val = validate(unwrap(model), data.val_loader, rt)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["balanced_accuracy"])
        improved = val["balanced_accuracy"] > progress.best
        progress.epoch = epoch
        progress.epochs_since_best = 0 if improved else progress.epochs_since_best + 1
        seconds = time.perf_counter() - started
        metrics["history"].append({
            "epoch": epoch, "lr": lr, "train_loss": fit["loss"], "train_accuracy": fit["accuracy"],
            "train_bacc": fit["balanced_accuracy"], "train_images": fit["images"], "val_loss": val["loss"],
            "val_accuracy": val["accuracy"], "val_bacc": val["balanced_accuracy"], "seconds": seconds,
        })
        if improved:
            progress.best = val["balanced_accuracy"]
            metrics.update(best_epoch=epoch, val_balanced_accuracy=val["balanced_accuracy"],
                           per_class_recall=val["per_class_recall"], confusion_matrix=val["confusion_matrix"])
        if rt.is_main:
            if improved:
                save_checkpoint(out / CHECKPOINT_NAME, cfg["backbone"], unwrap(model),
                                extra={"config": cfg, "metrics": metrics})
            _write_json(out / METRICS_NAME, metrics)
            plot_curves(metrics["history"], out / CURVES_NAME, title=f"{cfg['backbone']} @ {cfg['input_size']}px")
            if cfg["save_state"]:
                save_state(out / STATE_NAME, cfg, model, optimizer, scheduler, scaler, progress)
        rt.log(
            f"epoch {epoch}/{cfg['epochs']}: train_loss={fit['loss']:.4f} train_bacc={fit['balanced_accuracy']:.3f} "
            f"val_loss={val['loss']:.4f} val_bacc={val['balanced_accuracy']:.4f} val_acc={val['accuracy']:.4f} "
            f"lr={lr:.2e} {seconds:.1f}s" + (" (best, saved)" if improved else "")
        )
    metrics["stop_reason"] = reason
    if rt.is_main:
        _write_json(out / METRICS_NAME, metrics)
    rt.log(f"done: {reason}; best val BACC {metrics['val_balanced_accuracy']} at epoch {metrics['best_epoch']} "
           f"-> {out / CHECKPOINT_NAME}")
    return metrics


# ----------------------------------------------------------------------------------------------- CLI


def _value_parser(option: Option) -> Callable[[str], Any]:
    """argparse type for an option: its type, plus 'none'/'null' for nullable ones."""

    def parse(text: str) -> Any:
        if option.nullable and text.lower() in ("none", "null"):
            return None
        try:
            return option.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {option.type.__name__}, got {text!r}") from None

    parse.__name__ = option.type.__name__  # argparse names the type in its own messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The CLI, generated from ``training.config.OPTIONS`` (flags absent from argv leave the recipe's value)."""
    try:
        recipes = load_recipes()
        profiles = ", ".join(recipes["profiles"]) or "none"
    except (OSError, ValueError) as exc:  # --help still works with a broken recipe file
        recipes, profiles = None, f"unavailable ({exc})"
    parser = argparse.ArgumentParser(
        prog=prog("python -m training.train"),
        description=(
            "Train one LesionServe backbone (timm, 7 ISIC 2018 classes) with the seed ensemble's recipe: "
            "class-balanced sampling, graded augmentation, focal loss with label smoothing, Adam, grad clipping, "
            "ReduceLROnPlateau (or warmup+cosine), early stopping and checkpoint selection on validation "
            "balanced accuracy. Defaults come from lesionserve/training/recipes.yaml (per backbone; shown as "
            "'recipe:'); flags override them."
        ),
        epilog=(
            f"profiles in recipes.yaml: {profiles}. The seed's learning rates assume ImageNet-pretrained weights "
            "(--pretrained FILE); from scratch use --profile from_scratch (lr 1e-3) or --lr. "
            "Data is split by lesion into train/val/test once (the split CSV is reused by every backbone and seed); "
            "test images are never read here. "
            "Outputs in --out: checkpoint.pt (best weights; lesionserve.models.load_checkpoint), config.json "
            "(resolved settings), metrics.json (best_epoch, val_balanced_accuracy, per_class_recall, history), "
            "curves.png, last.pt (for --resume). "
            "Several GPUs: torchrun --nproc_per_node N -m training.train ... (batch size is per process). "
            "Nullable options accept 'none'."
        ),
    )
    for key, option in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        help_text = option.help
        if option.in_recipe and recipes is not None:
            summary = recipe_summary(key, recipes)
            if not (summary == "none" and "default:" in help_text):  # the help already says what none means
                help_text += f" (recipe: {summary})"
        kwargs: dict[str, Any] = {"dest": key, "help": help_text, "default": argparse.SUPPRESS}
        if key == "backbone":
            kwargs.update(type=architecture_arg, metavar="{" + ",".join(ARCHITECTURES) + "}")
        elif option.type is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type=_value_parser(option), choices=option.choices, metavar=option.metavar)
            if option.choices is not None:
                kwargs["metavar"] = "{" + ",".join(option.choices) + "}"
                kwargs["choices"] = (*option.choices, None) if option.nullable else option.choices
        parser.add_argument(flag, required=key in REQUIRED_KEYS, **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        metrics = train(vars(args))
    except (FileNotFoundError, ValueError, PretrainedUnavailableError) as exc:
        # Caller errors (DatasetError, ConfigError, PretrainedMismatchError are ValueErrors): message, no traceback.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: metrics[k] for k in ("best_epoch", "val_balanced_accuracy", "per_class_recall",
                                                  "stop_reason")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
