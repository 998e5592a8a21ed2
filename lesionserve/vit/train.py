"""Train the multi-head ViT with gradual unfreezing (seed 001's schedule, as a recipe).

    lesionserve vit-train --data ham10000=../shared/data/isic-real/ham10000_metadata.csv \\
        --data ph2=../shared/data/isic-real/ph2_labels.csv --out runs/vit/gradual
    lesionserve vit-train ... --set timm_name=deit_tiny_patch16_224 --set epochs=4 --set head_only_epochs=1 \\
        --set unfreeze_per_epoch=6                                     # a reduced CPU run
    lesionserve vit-train ... --set schedule=all_at_once              # the comparison
    lesionserve vit-train ... --resume                                # continue from <out>/last.pt (epochs may grow)

Each epoch prints and records (history.json) which groups are trainable and their learning rates.
Writes <out>/splits.json (reused by a rerun and by ``vit-evaluate``), checkpoint.pt (best mean
validation AUC over the heads), last.pt (resumable state) and curves.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from lesionserve import prog

RECIPE_PATH = Path(__file__).with_name("recipe.yaml")
SCHEDULES = ("gradual", "all_at_once")
LR_KINDS = ("heads", "blocks", "norm", "patch_embed", "tokens")


class RecipeError(ValueError):
    """A recipe key or value is not allowed; the message names it and what is."""


def load_recipe(path: str | Path = RECIPE_PATH, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe with ``overrides``, checked: unknown keys and bad values are refused by name."""
    base = yaml.safe_load(Path(path).read_text())
    defaults = yaml.safe_load(RECIPE_PATH.read_text())
    config = {**base, **(overrides or {})}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; keys: {', '.join(defaults)}")
    config = {**defaults, **config}
    if config["schedule"] not in SCHEDULES:
        raise RecipeError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config['schedule']!r}")
    lr = config["lr"]
    if not isinstance(lr, Mapping) or sorted(lr) != sorted(LR_KINDS) or any(not float(v) > 0 for v in lr.values()):
        raise RecipeError(f"lr must give a positive rate for each of {', '.join(LR_KINDS)}, got {lr!r}")
    for key in ("epochs", "batch_size", "unfreeze_per_epoch", "input_size", "head_hidden"):
        if not int(config[key]) >= 1:
            raise RecipeError(f"{key} must be >= 1, got {config[key]!r}")
    if not int(config["head_only_epochs"]) >= 0:
        raise RecipeError(f"head_only_epochs must be >= 0, got {config['head_only_epochs']!r}")
    if config["class_weights"] not in ("balanced", "none") or config["augment"] not in ("dihedral", "none"):
        raise RecipeError("class_weights must be balanced|none and augment dihedral|none")
    return config


def trainable_groups(groups: Sequence[str], epoch: int, config: Mapping[str, Any]) -> list[str]:
    """Groups trained in ``epoch`` (0-based): all of them (all_at_once), or the heads for
    ``head_only_epochs`` epochs and then ``unfreeze_per_epoch`` more pieces per epoch, in
    ``groups`` order (model.group_names: heads, norm, blocks last -> first, pos_embed, cls_token,
    patch_embed)."""
    if config["schedule"] == "all_at_once":
        return list(groups)
    pieces = max(0, epoch - int(config["head_only_epochs"]) + 1) * int(config["unfreeze_per_epoch"])
    return list(groups[: 1 + pieces])


def describe_groups(names: Sequence[str]) -> str:
    """'heads, norm, block11-block8' : runs of consecutive blocks collapsed."""
    out: list[str] = []
    blocks: list[int] = []

    def flush() -> None:
        if blocks:
            out.append(f"block{blocks[0]}" if len(blocks) == 1 else f"block{blocks[0]}-block{blocks[-1]}")
            blocks.clear()

    for name in names:
        if name.startswith("block"):
            blocks.append(int(name[5:]))
        else:
            flush()
            out.append(name)
    flush()
    return ", ".join(out)


def class_weight_vector(labels: np.ndarray, k: int, mode: str) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    if mode == "none":
        return np.ones(k, np.float32)
    return (len(labels) / (k * np.maximum(counts, 1))).astype(np.float32)


def dihedral(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random one of the 8 dihedral views per image (N x S x S x 3 uint8)."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        v = int(rng.integers(8))
        img = np.rot90(img, v % 4)
        out[i] = img[:, ::-1] if v >= 4 else img
    return out


def to_tensor(pixels: np.ndarray, normalization: Any) -> Any:
    """uint8 N x S x S x 3 -> normalised float32 N x 3 x S x S (preprocessing.normalize: the server's)."""
    import torch

    from lesionserve.preprocessing import normalize

    return torch.from_numpy(np.stack([normalize(np.ascontiguousarray(p), normalization) for p in pixels]))


def resolve_device(name: str = "auto") -> str:
    """``auto``: cuda when available, else cpu; anything else must be usable (ValueError names it)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here; use cpu or auto")
    return name


def predict(model: Any, pixels: np.ndarray, batch_size: int = 32, progress: bool = False, desc: str = "") -> dict[str, np.ndarray]:
    """{head: N x k logits} of resized uint8 images, in eval mode, no attention recorded (on the model's device)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {h: [] for h in model.spec.heads}
    starts: Any = range(0, len(pixels), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc or "predicting", unit="batch", leave=False)
    with torch.no_grad():
        for s in starts:
            logits = model(to_tensor(pixels[s:s + batch_size], model.spec.normalization).to(device))
            for h, v in logits.items():
                out[h].append(v.float().cpu().numpy())
    return {h: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for h, v in out.items()}


def rates_by_kind(optimizer: Any, active: Sequence[str]) -> dict[str, Any]:
    """Learning rate per kind of trained group: one value, or [lowest, highest] where the groups of a
    kind differ (blocks unfrozen at different epochs may have been cut a different number of times)."""
    from lesionserve.vit.model import group_kind

    seen: dict[str, list[float]] = {}
    for g in optimizer.param_groups:
        if g["name"] in active:
            seen.setdefault(group_kind(g["name"]), []).append(float(g["lr"]))
    return {k: v[0] if min(v) == max(v) else [min(v), max(v)] for k, v in seen.items()}


def step_plateau(scheduler: Any, optimizer: Any, active: Sequence[str], val_loss: float) -> None:
    """ReduceLROnPlateau on the validation loss, cutting only the groups being trained: a group
    still frozen keeps the recipe's rate for when it is unfrozen (a plateau while the heads train
    alone must not start a block at a tenth of its rate)."""
    frozen = {i: g["lr"] for i, g in enumerate(optimizer.param_groups) if g["name"] not in active}
    scheduler.step(val_loss)
    for i, lr in frozen.items():
        optimizer.param_groups[i]["lr"] = lr


def validation_scores(model: Any, data: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Per head: loss, melanoma AUC and balanced accuracy (argmax) on the validation split."""
    from lesionserve.training.metrics import balanced_accuracy, binary_auc
    from lesionserve.vit.decision import softmax

    scores: dict[str, Any] = {}
    for name, d in data.items():
        logits = predict(model, d.pixels["val"], int(config["batch_size"]) * 4)[name]
        labels = d.labels["val"]
        p = softmax(logits)
        loss = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())
        scores[name] = {"loss": loss, "auc": binary_auc(p[:, d.head.positive_index], labels == d.head.positive_index),
                        "bacc": balanced_accuracy(labels, p.argmax(1), d.head.num_classes)}
    return scores


def _prepare_splits(config: Mapping[str, Any], data: Mapping[str, str], out: Path) -> dict[str, dict[str, list]]:
    from lesionserve.vit.data import (cross_head_leaks, lesion_overlap, load_head_samples, read_split_file, split_head,
                                      write_split_file)
    from lesionserve.vit.spec import get_head

    path = out / "splits.json"
    if path.is_file():
        splits = read_split_file(path)
        if sorted(splits) != sorted(config["heads"]):
            raise RecipeError(f"{path} splits heads {sorted(splits)}, the recipe trains {list(config['heads'])}: "
                              "use a new --out folder")
        return splits
    missing = [h for h in config["heads"] if h not in data]
    if missing:
        raise RecipeError(f"no data for head(s) {', '.join(missing)}: give --data HEAD=PATH for each of {', '.join(config['heads'])}")
    splits = {}
    for name in config["heads"]:
        head = get_head(name)
        samples = load_head_samples(head, data[name])
        splits[name] = split_head(samples, head, float(config["val_fraction"]), float(config["test_fraction"]),
                                  int(config["seed"]), (config.get("limits") or {}).get(name))
        shared = lesion_overlap(splits[name])
        if shared:
            raise RecipeError(f"head {name}: lesions in two splits: {', '.join(shared[:5])}")
    leaks = cross_head_leaks(splits)
    if leaks:  # the backbone is shared: one head's training images must not be another's held-out ones
        raise RecipeError(f"{len(leaks)} image(s) trained by one head and held out by another, e.g. {', '.join(leaks[:3])}: "
                          "give the heads disjoint data")
    write_split_file(path, splits)
    return splits


def train_vit(config: Mapping[str, Any], data: Mapping[str, str], out: str | Path, resume: bool = False,
              progress: bool = True, device: str = "auto") -> Path:
    """Train per ``config`` (load_recipe) on ``data`` (head -> source) into ``out`` on ``device``
    (auto: CUDA when there is one); returns checkpoint.pt (always saved with CPU tensors)."""
    import torch
    from torch import nn

    from lesionserve.vit.data import load_head_data
    from lesionserve.vit.model import MultiHeadViT, group_kind, load_pretrained, parameter_groups, save_checkpoint
    from lesionserve.vit.spec import ViTModel, get_head

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    torch.manual_seed(int(config["seed"]))
    spec = ViTModel(timm_name=config["timm_name"], input_size=int(config["input_size"]),
                    head_hidden=int(config["head_hidden"]), heads=tuple(config["heads"]))
    device = resolve_device(device)
    model = MultiHeadViT(spec)
    if config.get("pretrained"):
        dropped = load_pretrained(model, config["pretrained"])
        print(f"pretrained backbone from {config['pretrained']} (strict; dropped its classifier keys: {', '.join(dropped) or 'none'})")
    splits = _prepare_splits(config, data, out)
    for name, per in splits.items():
        print(f"{name}: " + ", ".join(f"{k} {len(v)} ({int(sum(s.label == get_head(name).positive_index for s in v))} melanoma)"
                                      for k, v in per.items()))
    heads = load_head_data(splits, spec.input_size, progress)

    model.to(device)
    groups = parameter_groups(model)
    names = list(groups)
    optimizer = torch.optim.AdamW([{"params": ps, "lr": float(config["lr"][group_kind(n)]), "name": n} for n, ps in groups.items()],
                                  weight_decay=float(config["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=float(config["plateau_factor"]),
                                                           patience=int(config["plateau_patience"]))
    weights = {n: torch.from_numpy(class_weight_vector(d.labels["train"], d.head.num_classes, config["class_weights"])).to(device)
               for n, d in heads.items()}
    history: list[dict[str, Any]] = []
    start_epoch, best = 0, -math.inf
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: {last} not found (nothing to resume; drop --resume to start)")
        state = torch.load(last, map_location=device, weights_only=False)
        # More epochs may be asked for; anything else changed would make the run two different runs.
        changed = sorted(k for k in config if k != "epochs" and state["config"].get(k) != config[k])
        if changed:
            raise RecipeError(f"--resume: the recipe differs from {last}'s in {', '.join(changed)} (only epochs may change)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = int(state["epoch"]) + 1, float(state["best"]), state["history"]
        print(f"resumed after epoch {start_epoch} from {last}")
    (out / "config.json").write_text(json.dumps(config, indent=1))

    index = np.array([(hi, row) for hi, d in enumerate(heads.values()) for row in range(len(d.labels["train"]))], np.int64)
    order_heads = list(heads)
    bs = int(config["batch_size"])
    for epoch in range(start_epoch, int(config["epochs"])):
        rng = np.random.default_rng([int(config["seed"]), epoch])
        active = trainable_groups(names, epoch, config)
        for n, ps in groups.items():
            for p in ps:
                p.requires_grad_(n in active)
        lrs = rates_by_kind(optimizer, active)
        print(f"epoch {epoch + 1}/{config['epochs']}: trainable {describe_groups(active)} | lr "
              + ", ".join(f"{k} {v:.0e}" if isinstance(v, float) else f"{k} {v[0]:.0e}-{v[1]:.0e}" for k, v in lrs.items()),
              flush=True)
        model.train()
        order = index[rng.permutation(len(index))]
        batches: Any = range(0, len(order), bs)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
        started, total, count = time.perf_counter(), 0.0, 0
        for s in batches:
            chunk = order[s:s + bs]
            pixels = np.concatenate([heads[order_heads[h]].pixels["train"][[r]] for h, r in chunk])
            if config["augment"] == "dihedral":
                pixels = dihedral(pixels, rng)
            x = to_tensor(pixels, spec.normalization).to(device)
            logits = model(x)
            loss = x.new_zeros(())
            for hi, name in enumerate(order_heads):
                rows = np.flatnonzero(chunk[:, 0] == hi)
                if rows.size:
                    target = torch.from_numpy(heads[name].labels["train"][chunk[rows, 1]]).to(device)
                    picked = logits[name][torch.from_numpy(rows).to(device)]
                    loss = loss + nn.functional.cross_entropy(picked, target, weight=weights[name], reduction="sum")
            loss = loss / len(chunk)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(chunk), count + len(chunk)
        val = validation_scores(model, heads, config)
        val_loss = float(np.mean([v["loss"] for v in val.values()]))
        score = float(np.nanmean([v["auc"] for v in val.values()]))
        step_plateau(scheduler, optimizer, active, val_loss)
        record = {"epoch": epoch + 1, "trainable": active, "lr": lrs, "train_loss": total / max(count, 1),
                  "val_loss": val_loss, "val": val, "seconds": round(time.perf_counter() - started, 1)}
        history.append(record)
        print(f"  train loss {record['train_loss']:.4f} | val loss {val_loss:.4f} | "
              + " | ".join(f"{n} AUC {v['auc']:.3f} BACC {v['bacc']:.3f}" for n, v in val.items())
              + f" | {record['seconds']:.0f}s", flush=True)
        if score > best or not (out / "checkpoint.pt").is_file():
            best = max(score, best) if not math.isnan(score) else best
            save_checkpoint(model, out / "checkpoint.pt", {"epoch": epoch + 1, "val": val, "config": config, "device": device})
        (out / "history.json").write_text(json.dumps(history, indent=1))
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, "best": best, "history": history, "config": config}, last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)
    plot_history(history, out / "curves.png")
    return out / "checkpoint.pt"


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Losses and validation AUC per epoch, with the epochs where a group was unfrozen marked."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set(xlabel="epoch", ylabel="loss (weighted cross-entropy)")
    for head in history[0]["val"]:
        b.plot(epochs, [h["val"][head]["auc"] for h in history], marker="o", label=f"{head} AUC")
    b.set(xlabel="epoch", ylabel="validation melanoma AUC")
    for ax in (a, b):
        for h, prev in zip(history[1:], history):
            if len(h["trainable"]) > len(prev["trainable"]):
                ax.axvline(h["epoch"], color="grey", lw=0.5, ls=":")
        ax.legend()
    fig.suptitle("dotted: more groups unfrozen")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_assignments(items: Sequence[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value) if what == "--set" else value
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("python -m lesionserve.vit.train"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", default=[], metavar="HEAD=PATH",
                        help="a head's data: ham10000/isic7 = metadata CSV or ISIC folder, ph2 = ph2_labels.csv")
    parser.add_argument("--out", type=Path, required=True, help="run folder (splits.json, checkpoint.pt, last.pt, history.json)")
    parser.add_argument("--recipe", type=Path, default=RECIPE_PATH, help=f"YAML recipe (default {RECIPE_PATH.name}, seed 001's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (YAML value)")
    parser.add_argument("--pretrained", help="local backbone state dict, loaded strictly (same as --set pretrained=FILE)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (same recipe)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:N (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        overrides = parse_assignments(args.set, "--set")
        if args.pretrained:
            overrides["pretrained"] = args.pretrained
        config = load_recipe(args.recipe, overrides)
        print("recipe: " + json.dumps(config))
        path = train_vit(config, parse_assignments(args.data, "--data"), args.out, resume=args.resume, progress=not args.no_progress,
                         device=args.device)
    except (RecipeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
