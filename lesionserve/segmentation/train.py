"""Train the lesion segmenter (U-Net, ResNet34 encoder) with seed 004's recipe.

    lesionserve segment-train --data ../shared/data/isic-real/ham10000_metadata.csv \\
        --masks ../shared/data/isic-real/ham10000_masks.csv --out runs/seg/segmenter
    lesionserve segment-train --data data/synthetic --out runs/seg/segmenter --sizes 64 96   # synthetic, small
    lesionserve segment-train ... --resume runs/seg/segmenter/last.pt                       # continue

Progressive resizing over ``sizes``; at each size a one-cycle phase of the decoder alone (encoder
frozen), then one of the whole net with the encoder's BatchNorm frozen (both freezes are for a
``--pretrained`` encoder; from scratch use ``--frozen-epochs 0``, and BatchNorm then learns). Validation after every
epoch: mean IoU, ISIC 2018 Task 1 thresholded Jaccard and Dice on the val split, at the stage's
size, after the served post-processing (largest component, holes filled). The checkpoint kept
(``checkpoint.pt``) is the best val thresholded Jaccard at the last size; ``last.pt`` after every
epoch resumes an interrupted run where it stopped. Also written: ``config.json`` (the resolved
recipe), ``metrics.json`` (history, best), ``curves.png``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from lesionserve import prog
from lesionserve.segmentation.spec import SEGMENTER

RECIPE_PATH = Path(__file__).with_name("recipe.yaml")
LOSSES = ("bce", "dice", "bce_dice")


def load_recipe(path: str | Path | None = None) -> dict[str, Any]:
    """The recipe YAML (default: recipe.yaml beside this module) as a dict."""
    path = Path(path) if path else RECIPE_PATH
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of recipe keys")
    return data


def resolve(overrides: Mapping[str, Any], config: str | Path | None = None) -> dict[str, Any]:
    """Recipe defaults (recipe.yaml, or ``config`` replacing it), then ``overrides``; unknown keys
    and bad values are refused naming what is allowed."""
    defaults = load_recipe(RECIPE_PATH)
    recipe = load_recipe(config) if config else dict(defaults)
    for source, keys in (("recipe " + str(config or RECIPE_PATH), recipe), ("arguments", overrides)):
        unknown = sorted(set(keys) - set(defaults) - {"data", "out"})
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(defaults))}")
    cfg = {**defaults, **recipe, **{k: v for k, v in overrides.items() if v is not None}}
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {cfg['loss']!r}")
    sizes = [int(s) for s in cfg["sizes"]]
    if not sizes or any(s % 32 or s < 32 for s in sizes):
        raise ValueError(f"sizes must be positive multiples of 32 (the U-Net halves them 5 times), got {sizes}")
    cfg["sizes"] = sizes
    for key in ("frozen_epochs", "unfrozen_epochs"):
        if int(cfg[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {cfg[key]}")
    if str(cfg["freeze_bn"]).lower() not in ("auto", "true", "false"):
        raise ValueError(f"freeze_bn must be auto, true or false, got {cfg['freeze_bn']!r}")
    cfg["freeze_bn"] = bool(cfg["pretrained"]) if str(cfg["freeze_bn"]).lower() == "auto" else str(cfg["freeze_bn"]).lower() == "true"
    if int(cfg["frozen_epochs"]) + int(cfg["unfrozen_epochs"]) == 0:
        raise ValueError("frozen_epochs + unfrozen_epochs must be at least 1")
    return cfg


# ------------------------------------------------------------------------------------------- parts


def loss_fn(name: str):
    """Loss of logits (N x 1 x S x S) against {0, 1} masks: BCE-with-logits, soft Dice, or their sum."""
    bce = torch.nn.BCEWithLogitsLoss()

    def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(logits)
        inter = (probs * target).sum(dim=(1, 2, 3))
        return (1 - (2 * inter + 1) / (probs.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)).mean()

    return {"bce": bce, "dice": dice, "bce_dice": lambda lo, t: bce(lo, t) + dice(lo, t)}[name]


def phases(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The training phases in order: (size, frozen encoder?, epochs, peak lr), empty ones dropped."""
    out = []
    for size in cfg["sizes"]:
        for frozen, epochs, lr in ((True, cfg["frozen_epochs"], cfg["lr"]), (False, cfg["unfrozen_epochs"], cfg["unfrozen_lr"])):
            if int(epochs) > 0:
                out.append({"size": int(size), "frozen": frozen, "epochs": int(epochs), "lr": float(lr)})
    return out


def set_phase(model: torch.nn.Module, frozen: bool) -> list[torch.nn.Parameter]:
    """Freeze the encoder (decoder phase) or unfreeze it; returns the parameters to optimise."""
    for p in model.encoder.parameters():
        p.requires_grad_(not frozen)
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the encoder's BatchNorm stays in eval (the seed's "BatchNorm
    frozen": pretrained statistics kept, and a frozen encoder does not drift through them)."""
    model.train()
    if not freeze_bn:
        return
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """N x 3 x S x S preprocessed images -> N x S x S lesion probabilities (sigmoid of the logits)."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(images[i:i + batch_size].to(device)))[:, 0].float().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def validate(model: torch.nn.Module, dataset, batch_size: int, threshold: float) -> dict[str, float]:
    """Val loss-free scores at the dataset's size, after the served post-processing."""
    from lesionserve.segmentation.metrics import dice, iou, summary
    from lesionserve.segmentation.postprocess import lesion_from_probabilities

    ious, dices = [], []
    size = dataset.size
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        probs = predict_probs(model, torch.stack([x for x, _ in items]), batch_size)
        for p, (_, truth) in zip(probs, items):
            pred = lesion_from_probabilities(p, size, size, threshold).mask
            ious.append(iou(pred, truth[0].numpy() > 0.5))
            dices.append(dice(pred, truth[0].numpy() > 0.5))
    return summary(ious, dices)


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Loss and val Jaccard / thresholded Jaccard / Dice per epoch, the size and phase marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, score_ax = figure.subplots(1, 2)
    x = list(range(1, len(history) + 1))
    loss_ax.plot(x, [h["train_loss"] for h in history], "o-")
    loss_ax.set(title="training loss", xlabel="epoch")
    for key, label in (("jaccard", "Jaccard"), ("thresholded_jaccard", "thresholded Jaccard (Task 1)"), ("dice", "Dice")):
        score_ax.plot(x, [h["val"][key] for h in history], "o-", label=label)
    score_ax.set(title="validation", xlabel="epoch", ylim=(0, 1))
    score_ax.legend(fontsize=8)
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        for i, (a, b) in enumerate(zip(history, history[1:]), start=1):
            if (a["size"], a["frozen"]) != (b["size"], b["frozen"]):
                ax.axvline(i + 0.5, color="grey", linestyle=":")
        ax.set_xticks(x, [f"{h['size']}{'f' if h['frozen'] else ''}" for h in history], fontsize=7)
    figure.suptitle("segmenter: x labels = input size (f: encoder frozen)")
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------ training


def data_splits(cfg: Mapping[str, Any], out: Path):
    """(train pairs, val pairs, split file) per the recipe: lesion-grouped splits written once, an
    optional k-fold of train+val, an optional cap on training images."""
    from lesionserve.segmentation.data import kfold, load_pairs, pairs_for
    from lesionserve.training.splits import load_or_create_splits, split_summary

    pairs, skipped = load_pairs(cfg["data"], cfg["layout"], cfg["masks"])
    print(f"{len(pairs)} images with a mask" + (f"; {skipped} without one skipped for segmentation" if skipped else ""))
    split_file = Path(cfg["splits"]) if cfg["splits"] else out.parent / "splits.csv"
    splits = load_or_create_splits(split_file, [p.sample for p in pairs], cfg["val_fraction"], cfg["test_fraction"],
                                   cfg["split_seed"])
    print(f"splits from {split_file}:\n{split_summary(splits)}")
    train, val = splits["train"], splits["val"]
    if cfg["folds"]:
        train, val = kfold(train + val, int(cfg["folds"]), int(cfg["fold"]), cfg["split_seed"])
        print(f"fold {cfg['fold']} of {cfg['folds']}: {len(train)} train / {len(val)} val images")
    if cfg["max_images"] and len(train) > cfg["max_images"]:
        rng = np.random.default_rng(cfg["split_seed"])
        train = sorted((train[i] for i in rng.choice(len(train), int(cfg["max_images"]), replace=False)),
                       key=lambda s: s.image_id)
        print(f"training images capped at {len(train)} (--max-images)")
    return pairs_for(train, pairs), pairs_for(val, pairs), split_file


def train_segmenter(overrides: Mapping[str, Any], config: str | Path | None = None) -> dict[str, Any]:
    """Train per the resolved recipe; returns the metrics written to ``<out>/metrics.json``."""
    from tqdm import tqdm

    from lesionserve.segmentation.data import SegmentationDataset
    from lesionserve.segmentation.model import load_pretrained_encoder, save_segmenter

    cfg = resolve(overrides, config)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device("cuda" if cfg["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg["seed"])
    train_pairs, val_pairs, split_file = data_splits(cfg, out)
    cfg["splits"] = str(split_file.resolve())
    (out / "config.json").write_text(json.dumps({**cfg, "segmenter": SEGMENTER.to_dict()}, indent=2) + "\n")
    print("recipe: " + ", ".join(f"{k}={cfg[k]}" for k in ("sizes", "frozen_epochs", "unfrozen_epochs", "batch_size",
                                                            "lr", "unfrozen_lr", "loss", "augment")))
    model = SEGMENTER.create()
    if cfg["pretrained"]:
        load_pretrained_encoder(model, cfg["pretrained"])
        print(f"encoder weights from {cfg['pretrained']}")
    else:
        print("no --pretrained: training from scratch")
        if cfg["frozen_epochs"]:
            print(f"warning: --frozen-epochs {cfg['frozen_epochs']} without --pretrained trains the decoder on a frozen "
                  "random encoder; from scratch pass --frozen-epochs 0")
    model.to(device)
    criterion = loss_fn(cfg["loss"])
    plan = phases(cfg)
    state = {"phase": 0, "epoch": 0, "history": [], "best": None}
    resume = torch.load(cfg["resume"], map_location="cpu", weights_only=False) if cfg["resume"] else None
    if resume is not None:
        saved = resume.get("plan")
        if saved is not None and (saved != plan or resume.get("max_steps_per_epoch") != cfg["max_steps_per_epoch"]):
            raise ValueError(f"{cfg['resume']} was written by a run with phases {saved} (max_steps_per_epoch "
                             f"{resume.get('max_steps_per_epoch')}); this recipe gives {plan} ({cfg['max_steps_per_epoch']}): "
                             "resume with the same --sizes, epochs, learning rates and --max-steps-per-epoch")
        model.load_state_dict(resume["model"])
        state.update(phase=resume["phase"], epoch=resume["epoch"], history=resume["history"], best=resume["best"])
        print(f"resumed from {cfg['resume']}: phase {state['phase'] + 1}/{len(plan)}, {state['epoch']} epoch(s) done in it")
    final_size = cfg["sizes"][-1]
    for index in range(state["phase"], len(plan)):
        phase = plan[index]
        params = set_phase(model, phase["frozen"])
        train_set = SegmentationDataset(train_pairs, phase["size"], SEGMENTER.normalization, cfg["augment"], cfg["seed"])
        val_set = SegmentationDataset(val_pairs, phase["size"], SEGMENTER.normalization)
        shuffle = torch.Generator()
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=len(train_set) > cfg["batch_size"],
                                             generator=shuffle)
        steps = min(len(loader), cfg["max_steps_per_epoch"] or len(loader))
        optimizer = torch.optim.AdamW(params, lr=phase["lr"], weight_decay=cfg["weight_decay"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=phase["lr"], total_steps=phase["epochs"] * steps)
        if resume is not None and resume["phase"] == index and resume.get("optimizer"):
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume["schedule"])
        first = state["epoch"] if index == state["phase"] else 0
        what = "decoder only, encoder frozen" if phase["frozen"] else \
            "whole net" + (", encoder BatchNorm frozen" if cfg["freeze_bn"] else "")
        print(f"phase {index + 1}/{len(plan)}: {phase['size']} px, {what}, {phase['epochs']} epoch(s), one-cycle peak lr {phase['lr']:g}")
        for epoch in range(first, phase["epochs"]):
            start = time.time()
            train_set.set_epoch(len(state["history"]))
            shuffle.manual_seed(cfg["seed"] * 1000 + len(state["history"]))  # a resumed epoch shuffles as it would have
            train_mode(model, cfg["freeze_bn"])
            losses = []
            bar = tqdm(itertools.islice(loader, steps), total=steps, unit="step",
                       desc=f"{phase['size']}px {'frozen' if phase['frozen'] else 'full'} epoch {epoch + 1}/{phase['epochs']}")
            for x, y in bar:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x.to(device)), y.to(device))
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            bar.close()
            scores = validate(model, val_set, cfg["batch_size"], SEGMENTER.threshold)
            entry = {"size": phase["size"], "frozen": phase["frozen"], "epoch_in_phase": epoch + 1,
                     "train_loss": float(np.mean(losses)), "val": scores, "seconds": round(time.time() - start, 1)}
            state["history"].append(entry)
            better = phase["size"] == final_size and (state["best"] is None or
                                                      (scores["thresholded_jaccard"], scores["jaccard"]) >
                                                      (state["best"]["thresholded_jaccard"], state["best"]["jaccard"]))
            if better:
                state["best"] = {**scores, "epoch": len(state["history"]), "size": phase["size"]}
                save_segmenter(out / "checkpoint.pt", model, phase["size"], extra={"config": cfg, "val": scores})
            print(f"  val Jaccard {scores['jaccard']:.4f}, thresholded {scores['thresholded_jaccard']:.4f}, "
                  f"Dice {scores['dice']:.4f}, loss {entry['train_loss']:.4f}, {entry['seconds']}s" + (" (best, saved)" if better else ""))
            if cfg["save_state"]:
                last = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "phase": index if epoch + 1 < phase["epochs"] else index + 1,
                        "epoch": epoch + 1 if epoch + 1 < phase["epochs"] else 0,
                        "history": state["history"], "best": state["best"], "plan": plan,
                        "max_steps_per_epoch": cfg["max_steps_per_epoch"]}
                if epoch + 1 == phase["epochs"]:
                    last.pop("optimizer"), last.pop("schedule")  # the next phase starts its own
                torch.save(last, out / "last.pt.tmp")
                (out / "last.pt.tmp").replace(out / "last.pt")
            plot_history(state["history"], out / "curves.png")
        state["epoch"] = 0
        resume = None
    metrics = {"best": state["best"], "history": state["history"], "train_images": len(train_pairs),
               "val_images": len(val_pairs), "splits": cfg["splits"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"best val thresholded Jaccard {state['best']['thresholded_jaccard']:.4f} at {final_size} px "
          f"(epoch {state['best']['epoch']}): {out / 'checkpoint.pt'}")
    return metrics


def get_args_parser() -> argparse.ArgumentParser:
    recipe = load_recipe()
    parser = argparse.ArgumentParser(prog=prog("python -m training.segment"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a HAM10000 metadata CSV (with --masks), an ISIC 2018 Task 1 "
                        "folder, a dataset folder with masks.csv, or PH2's ph2_labels.csv")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, last.pt, metrics.json, curves.png)")
    parser.add_argument("--config", help=f"recipe YAML replacing {RECIPE_PATH.name}")
    for key, default in recipe.items():
        flag = "--" + key.replace("_", "-")
        help_text = f"(recipe: {default})"
        if key == "freeze_bn":
            parser.add_argument(flag, dest=key, choices=("auto", "true", "false"), default=None, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=key, type=int, nargs="+", default=None, metavar="S", help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if key in ("max_images", "folds", "max_steps_per_epoch", "threads"):
                kind = int
            parser.add_argument(flag, dest=key, type=kind, default=None, help=help_text,
                                choices=LOSSES if key == "loss" else None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config = args.pop("config")
    try:
        train_segmenter(args, config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
