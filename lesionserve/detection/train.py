"""Train the YOLO11 lesion detector with ultralytics, fully offline.

    lesionserve detect-train --data runs/det/data_masks/data.yaml --out runs/det/yolo
    lesionserve detect-train --data ... --out ... --epochs 3 --imgsz 320 --batch 16      # a reduced CPU run
    lesionserve detect-train --data ... --out ... --resume                                # continue last.pt

The recipe (recipe.yaml) is seed 000's: yolo11s.yaml from scratch (``--pretrained FILE.pt`` for a
local checkpoint: no hub), imgsz 640, 80 epochs, AdamW with lr0 1e-3 set explicitly, cosine LR,
batch 32, HSV jitter, rotation 15, flips, mosaic, mixup 0.05. Nothing is fetched: before
ultralytics is imported, :func:`offline_environment` points its settings at a private folder with
the fonts its plots ask for, turns off auto-install, hub sync and the online checks; the AMP check
(which downloads a model on CUDA) is skipped by training in FP32 on CPU and by ``amp`` false
otherwise unless asked. ultralytics is AGPL-3.0: it is an optional extra of training only; the
served ONNX path never imports it (README, "Licences").
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from lesionserve import prog

RECIPE_PATH = Path(__file__).with_name("recipe.yaml")
#: Fonts ultralytics' plots look for; placed in its settings folder so check_font never downloads.
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def offline_environment(config_dir: str | Path) -> Path:
    """Make ultralytics work without a network: call before importing it (it reads YOLO_CONFIG_DIR
    once). Returns its settings folder, where the fonts its plots ask for are placed."""
    import matplotlib

    os.environ.update(YOLO_CONFIG_DIR=str(Path(config_dir).resolve()), YOLO_OFFLINE="1", YOLO_AUTOINSTALL="False")
    from ultralytics import settings
    from ultralytics.utils import USER_CONFIG_DIR

    restore_pil_open()

    folder = Path(USER_CONFIG_DIR)  # <YOLO_CONFIG_DIR>/Ultralytics, or where an earlier import fixed it
    folder.mkdir(parents=True, exist_ok=True)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONTS:
        if not (folder / name).is_file():
            shutil.copyfile(font, folder / name)
    # Integrations that would call out (hub sync, experiment trackers): off where this version has them.
    off = ("sync", "hub", "wandb", "mlflow", "tensorboard", "clearml", "comet", "dvc", "neptune", "raytune")
    settings.update({k: False for k in off if k in settings})
    return folder


def restore_pil_open() -> None:
    """Undo ultralytics' import-time patch of ``PIL.Image.open`` (ultralytics.utils.patches), which
    on an unidentified image tries to install and import pi-heif: in the same process the project's
    own decoding (lesionserve.preprocessing) would then report "No module named 'pi_heif'" instead of
    what is wrong with the image (measured: 6 tests failed that way)."""
    import sys

    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def load_recipe(path: str | Path = RECIPE_PATH) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def train_detector(data: str | Path, out: str | Path, overrides: Mapping[str, Any] | None = None,
                   pretrained: str | Path | None = None, resume: bool = False) -> Path:
    """Train per the recipe (+ ``overrides``) into ``out``/train; returns the best weights' path."""
    out = Path(out).resolve()
    offline_environment(out / ".ultralytics")
    from ultralytics import YOLO

    args = {**load_recipe(), **(overrides or {})}
    architecture = args.pop("model")
    if resume:
        last = out / "train" / "weights" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} not found (train first without --resume)")
        YOLO(str(last)).train(resume=True)
        return out / "train" / "weights" / "best.pt"
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file (weights are never downloaded)")
    model = YOLO(architecture)
    if pretrained is not None:
        model.load(str(pretrained))  # transfers matching layers and reports how many
    import torch

    on_gpu = torch.cuda.is_available()
    args.setdefault("device", 0 if on_gpu else "cpu")
    args.setdefault("amp", False)  # the AMP check downloads a model: FP32 unless asked for
    args.setdefault("workers", 0 if not on_gpu else 8)
    model.train(data=str(Path(data).resolve()), project=str(out), name="train", exist_ok=True, **args)
    return out / "train" / "weights" / "best.pt"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("lesionserve detect-train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="data.yaml written by `lesionserve detect-dataset`")
    parser.add_argument("--out", required=True, type=Path, help="run folder (ultralytics writes <out>/train)")
    parser.add_argument("--model", help="architecture YAML (recipe: yolo11s.yaml)")
    parser.add_argument("--pretrained", type=Path, help="local .pt checkpoint to start from (never downloaded)")
    for key, kind in (("epochs", int), ("imgsz", int), ("batch", int), ("lr0", float), ("fraction", float), ("seed", int)):
        parser.add_argument(f"--{key}", type=kind, help=f"override the recipe's {key}")
    parser.add_argument("--device", help="cpu, 0, 0,1 ... (default: GPU 0 if present, else cpu)")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (its check downloads a model: offline, leave off)")
    parser.add_argument("--resume", action="store_true", help="continue <out>/train/weights/last.pt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found (write it with `lesionserve detect-dataset`)", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k in ("model", "epochs", "imgsz", "batch", "lr0", "fraction", "seed", "device")
                 and v is not None}
    if args.amp:
        overrides["amp"] = True
    try:
        best = train_detector(args.data, args.out, overrides, args.pretrained, args.resume)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best weights: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
