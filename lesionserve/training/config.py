"""Training configuration: the recipe file, per-backbone sections, profiles and overrides.

``resolve_config(overrides)`` merges, later winning::

    recipes.yaml defaults -> backbones.<backbone> -> profiles.<profile> -> overrides

and returns the validated, JSON-ready dict that a run prints and saves as ``config.json``. Every
option is declared once, in ``OPTIONS``; the command line of ``training.train`` is generated from
it, so the YAML, the CLI and ``train({...})`` accept exactly the same keys.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from lesionserve.architectures import ARCHITECTURES, get_architecture
from lesionserve.cropping import CROP_MARGIN
from lesionserve.spec import CLASS_NAMES

#: The recipe file used unless ``config`` names another one.
RECIPES_PATH = Path(__file__).with_name("recipes.yaml")
RECIPE_SECTIONS = ("defaults", "backbones", "profiles")
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class Option:
    """One configuration key: its type, whether null is allowed, its choices and its help text."""

    type: type
    help: str
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None  # value constraint (after type conversion)
    check_text: str = ""  # says what ``check`` requires, for the error message
    in_recipe: bool = True  # False: run-level keys that only the caller gives (not in YAML sections)
    metavar: str | None = None


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _fraction(v: float) -> bool:
    return 0.0 < v < 1.0


OPTIONS: dict[str, Option] = {
    # run-level: given by the caller, never by the recipe
    # No fixed choices: any registered architecture (lesionserve.architectures) trains; the error lists them.
    "backbone": Option(str, "architecture to train (registered: " + ", ".join(ARCHITECTURES) + ")", in_recipe=False),
    "data": Option(str, "dataset: a folder (or file) that training.data.load_dataset reads", in_recipe=False, metavar="PATH"),
    "out": Option(str, "output folder (created; files overwritten)", in_recipe=False, metavar="DIR"),
    "config": Option(str, f"recipe YAML to use instead of {RECIPES_PATH.name}", nullable=True, in_recipe=False, metavar="FILE"),
    "profile": Option(str, "named override profile from the recipe file, applied after the backbone section "
                      "(e.g. from_scratch: lr 1e-3 for runs without --pretrained)", nullable=True, in_recipe=False,
                      metavar="NAME"),
    # data
    "layout": Option(str, "dataset layout", choices=("auto", "isic2018", "ham10000", "folders")),
    "splits": Option(str, "split CSV, created on first use and then reused (default: <out>/../splits.csv, "
                     "shared by the backbones of one artifacts folder)", nullable=True, metavar="FILE"),
    "val_fraction": Option(float, "fraction of the pool (by lesion) for validation", check=_fraction,
                           check_text="between 0 and 1 (exclusive)", metavar="F"),
    "test_fraction": Option(float, "fraction of the pool (by lesion) held out for testing; never read by training "
                            "(0: no test part, e.g. when testing on the official test set)",
                            check=lambda v: 0 <= v < 1, check_text="in [0, 1)", metavar="F"),
    "split_seed": Option(int, "seed of the per-class cap and of a newly created split file; kept apart from "
                         "--seed so runs with different seeds share one pool and split (none = --seed)",
                         nullable=True, check=_non_negative, check_text=">= 0", metavar="N"),
    "max_images_per_class": Option(int, "cap each class of the pool at N images, whole lesions at a time, "
                                   "before splitting (reduced runs)", nullable=True, check=_positive,
                                   check_text="positive", metavar="N"),
    "input_size": Option(int, "square input size in pixels (default: the backbone's native size: "
                         + ", ".join(f"{n} {a.input_size}" for n, a in ARCHITECTURES.items()) + ")",
                         nullable=True, check=lambda v: v >= MIN_INPUT_SIZE, check_text=f"at least {MIN_INPUT_SIZE}",
                         metavar="S"),
    # optimisation
    "epochs": Option(int, "maximum training epochs", check=_positive, check_text="positive", metavar="N"),
    "batch_size": Option(int, "images per optimiser step (per process under torchrun)", check=_positive,
                         check_text="positive", metavar="N"),
    "optimizer": Option(str, "optimiser", choices=("adam",)),
    "lr": Option(float, "peak learning rate", check=_positive, check_text="positive", metavar="LR"),
    "weight_decay": Option(float, "Adam weight decay (L2)", check=_non_negative, check_text=">= 0", metavar="WD"),
    "focal_gamma": Option(float, "focal loss exponent (0 = label-smoothed cross-entropy)", check=_non_negative,
                          check_text=">= 0", metavar="G"),
    "label_smoothing": Option(float, "label smoothing of the training loss", check=lambda v: 0 <= v < 1,
                              check_text="in [0, 1)", metavar="E"),
    "schedule": Option(str, "learning-rate schedule: plateau (x factor when val BACC stalls) or cosine "
                       "(linear warmup, then cosine to min_lr)", choices=("plateau", "cosine")),
    "plateau_factor": Option(float, "plateau: lr multiplier", check=_fraction, check_text="between 0 and 1 (exclusive)",
                             metavar="F"),
    "plateau_patience": Option(int, "plateau: epochs without a better val BACC before reducing", check=_non_negative,
                               check_text=">= 0", metavar="N"),
    "warmup_epochs": Option(int, "cosine: linear warmup epochs", check=_non_negative, check_text=">= 0", metavar="N"),
    "min_lr": Option(float, "lower bound of the learning rate", check=_non_negative, check_text=">= 0", metavar="LR"),
    "grad_clip": Option(float, "max global gradient norm (none = no clipping)", nullable=True, check=_positive,
                        check_text="positive", metavar="NORM"),
    "early_stop_patience": Option(int, "stop after N epochs without a better val BACC (none = never)", nullable=True,
                                  check=_positive, check_text="positive", metavar="N"),
    # sampling and augmentation
    "sampler": Option(str, "balanced: draw with replacement, weight 1/class count; shuffle: each image once",
                      choices=("balanced", "shuffle")),
    "augment": Option(str, "graded: per class by imbalance ratio (MEL at least level 2); basic: level 1 "
                      "(flips, rotate 30) for all; none", choices=("graded", "basic", "none")),
    # machinery
    "precise_bn_batches": Option(int, "recompute BatchNorm statistics over N training batches before each "
                                 "validation (0 = off)", check=_non_negative, check_text=">= 0", metavar="N"),
    "amp": Option(bool, "mixed precision on CUDA (never used on CPU)"),
    "device": Option(str, "where to train", choices=("auto", "cpu", "cuda")),
    "workers": Option(int, "DataLoader worker processes (default: 0 on CPU, min(8, CPUs) on CUDA)", nullable=True,
                      check=_non_negative, check_text=">= 0", metavar="N"),
    "threads": Option(int, "torch CPU threads (default: the CPU count)", nullable=True, check=_positive,
                      check_text="positive", metavar="N"),
    "seed": Option(int, "seed for initialisation, sampling and augmentation", check=_non_negative, check_text=">= 0",
                   metavar="N"),
    "crop_boxes": Option(str, "crop every image to its lesion box from this file (`lesionserve crop-boxes`: as the "
                         "segmenter finds it) before its preprocessing, as the served lesion_crop pipeline does; "
                         "null = whole images", nullable=True, metavar="CSV"),
    "crop_margin": Option(float, "margin around the lesion box, as a fraction of its width and height per side "
                          "(null = lesionserve.cropping.CROP_MARGIN, the served pipeline's)", nullable=True,
                          check=_non_negative, check_text=">= 0", metavar="F"),
    "max_steps_per_epoch": Option(int, "stop each epoch after N steps (smoke runs)", nullable=True, check=_positive,
                                  check_text="positive", metavar="N"),
    "pretrained": Option(str, "weights to start from: a state-dict file (loaded strictly; a classifier head of "
                         "another shape is left out and reported) or a timm hub name (needs network)",
                         nullable=True, metavar="FILE|NAME"),
    "save_state": Option(bool, "write last.pt (weights + optimiser + schedule + RNG, about 3x the weights' size) "
                         "after every epoch, for --resume"),
    "resume": Option(str, "training state to continue from (<out>/last.pt): model, optimiser, schedule, "
                     "epoch, best score, history, RNG", nullable=True, metavar="FILE"),
}
RECIPE_KEYS = tuple(k for k, o in OPTIONS.items() if o.in_recipe)
REQUIRED_KEYS = ("backbone", "data", "out")

#: Typed overrides, one field per ``OPTIONS`` key; a None field means "not given: use the recipe".
#: (To override a recipe value with null, pass a dict with the key set to None instead.)
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(k, o.type | None, dataclasses.field(default=None)) for k, o in OPTIONS.items()],
    namespace={"__doc__": "Overrides of the training recipe; None fields take the recipe's value.",
               "__module__": __name__},
)


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message names it and the valid choices."""


def _check_keys(keys: Any, valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")


def load_recipes(path: str | Path | None = None) -> dict[str, Any]:
    """Read and structurally validate a recipe file (``RECIPES_PATH`` by default)."""
    path = Path(path) if path is not None else RECIPES_PATH
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        recipes = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(recipes, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(RECIPE_SECTIONS)}")
    _check_keys(recipes, RECIPE_SECTIONS, f"{path}")
    defaults = recipes.get("defaults") or {}
    backbones = recipes.get("backbones") or {}
    profiles = recipes.get("profiles") or {}
    for name, section in (("defaults", defaults), ("backbones", backbones), ("profiles", profiles)):
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping")
    _check_keys(defaults, RECIPE_KEYS, f"{path} defaults")
    _check_keys(backbones, tuple(ARCHITECTURES), f"{path} backbones")
    for name, section in [*(("backbones." + b, s) for b, s in backbones.items()),
                          *(("profiles." + p, s) for p, s in profiles.items())]:
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping")
        _check_keys(section, RECIPE_KEYS, f"{path} {name}")
    return {"path": str(path.resolve()), "defaults": defaults, "backbones": backbones, "profiles": profiles}


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def convert_value(key: str, value: Any) -> Any:
    """Check ``value`` against ``OPTIONS[key]`` and return it converted (int -> float where a float is wanted)."""
    option = OPTIONS[key]
    if value is None:
        if option.nullable:
            return None
        raise ConfigError(f"{key} must be set (null is not allowed)")
    kind = option.type
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-4 without a dot as a string; accept it as the number it is.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key} must be {_TYPE_WORDS[kind]}, got {value!r} ({type(value).__name__})")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{key} must be one of {', '.join(option.choices)}; got {value!r}")
    if option.check is not None and not option.check(value):
        raise ConfigError(f"{key} must be {option.check_text}, got {value!r}")
    return value


def merge_recipe(recipes: Mapping[str, Any], backbone: str, profile: str | None) -> dict[str, Any]:
    """defaults -> backbones.<backbone> -> profiles.<profile> (no overrides, no validation of values)."""
    merged = dict(recipes["defaults"])
    merged.update(recipes["backbones"].get(backbone) or {})
    if profile is not None:
        if profile not in recipes["profiles"]:
            valid = ", ".join(recipes["profiles"]) or "(none defined)"
            raise ConfigError(f"unknown profile {profile!r} in {recipes['path']}; valid profiles: {valid}")
        merged.update(recipes["profiles"][profile])
    return merged


def resolve_config(overrides: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Merge the recipe with ``overrides`` (keys of ``OPTIONS``), validate, fill in derived values.

    ``overrides`` is a mapping or a ``TrainConfig``. Raises ConfigError (a ValueError) for an
    unknown key, a missing required key or a bad value, and FileNotFoundError for a missing data
    path or recipe file. Keys present in a mapping win even when their value is None (an explicit
    null, e.g. ``early_stop_patience: None``); None fields of a TrainConfig are "not given".
    """
    if dataclasses.is_dataclass(overrides) and not isinstance(overrides, type):
        overrides = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"expected a mapping or TrainConfig, got {type(overrides).__name__}")
    _check_keys(overrides, tuple(OPTIONS), "train config")
    missing = [k for k in REQUIRED_KEYS if overrides.get(k) is None]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    backbone = get_architecture(convert_value("backbone", overrides["backbone"]))  # ValueError lists valid names
    recipe_file = convert_value("config", overrides.get("config"))
    profile = convert_value("profile", overrides.get("profile"))
    recipes = load_recipes(recipe_file)

    merged = merge_recipe(recipes, backbone.name, profile)
    merged.update({k: v for k, v in overrides.items() if k in RECIPE_KEYS})
    absent = [k for k in RECIPE_KEYS if k not in merged]
    if absent:
        raise ConfigError(f"{recipes['path']}: no value for {', '.join(absent)} (add them under 'defaults')")
    cfg: dict[str, Any] = {k: convert_value(k, merged[k]) for k in RECIPE_KEYS}

    data = Path(convert_value("data", overrides["data"])).expanduser().resolve()
    if not data.exists():
        raise FileNotFoundError(f"data directory not found: {data}")
    out = Path(convert_value("out", overrides["out"])).expanduser().resolve()
    if cfg["val_fraction"] + cfg["test_fraction"] >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1, got {cfg['val_fraction']} + {cfg['test_fraction']}"
        )
    splits = Path(cfg["splits"]).expanduser() if cfg["splits"] is not None else out.parent / "splits.csv"
    for key in ("pretrained", "resume"):
        if cfg[key] is not None and Path(cfg[key]).expanduser().exists():
            cfg[key] = str(Path(cfg[key]).expanduser().resolve())
    if cfg["resume"] is not None and not Path(cfg["resume"]).is_file():
        raise FileNotFoundError(f"resume file not found: {cfg['resume']}")
    if cfg["crop_boxes"] is not None:
        if not Path(cfg["crop_boxes"]).expanduser().is_file():
            raise FileNotFoundError(f"crop boxes file not found: {cfg['crop_boxes']} (write one with `lesionserve crop-boxes`)")
        cfg["crop_boxes"] = str(Path(cfg["crop_boxes"]).expanduser().resolve())

    cfg.update(
        input_size=cfg["input_size"] if cfg["input_size"] is not None else backbone.input_size,
        splits=str(splits.resolve()),
        split_seed=cfg["split_seed"] if cfg["split_seed"] is not None else cfg["seed"],
        threads=cfg["threads"] if cfg["threads"] is not None else (os.cpu_count() or 1),
        # Recorded resolved, so calibration, evaluation and assembly cut the crops training saw.
        crop_margin=cfg["crop_margin"] if cfg["crop_margin"] is not None else CROP_MARGIN,
    )
    # Identity first (what a person looks for in config.json), then the recipe keys in OPTIONS order.
    return {
        "backbone": backbone.name,
        "timm_name": backbone.timm_name,
        "native_input_size": backbone.input_size,
        "class_names": list(CLASS_NAMES),
        "data": str(data),
        "out": str(out),
        "recipe": recipes["path"],
        "profile": profile,
        **cfg,
        "loss": f"focal(gamma={cfg['focal_gamma']}, label_smoothing={cfg['label_smoothing']}); val: cross_entropy",
    }


def recipe_summary(key: str, recipes: Mapping[str, Any] | None = None) -> str:
    """'1e-4 (resnet50), 5e-5 (densenet121, ...)'-style text of a key's recipe values, for --help."""
    recipes = recipes if recipes is not None else load_recipes()
    values: dict[str, list[str]] = {}
    for name in ARCHITECTURES:
        value = merge_recipe(recipes, name, None).get(key)
        values.setdefault("none" if value is None else str(value), []).append(name)
    if len(values) == 1:
        return next(iter(values))
    return ", ".join(f"{v} ({', '.join(names)})" for v, names in values.items())


def format_config(cfg: Mapping[str, Any]) -> str:
    """The resolved configuration as aligned ``key: value`` lines (printed at the start of a run)."""
    width = max(len(k) for k in cfg)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in cfg.items())
