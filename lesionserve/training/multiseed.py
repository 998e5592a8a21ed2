"""Train, calibrate and evaluate the ensemble for several seeds; report mean ± std per report row.

    python -m training.multiseed --data DATA --out runs/ms --seeds 0 1 2 -- --epochs 30 --batch-size 32

One seed's number says little (the seed reports 0.846 ± 0.009 BACC over 3 seeds). For each seed S
this writes ``OUT/seed_S/``:

* ``<backbone>/``      ``training.train.train(config)`` outputs (checkpoint.pt, metrics.json, ...)
* ``splits.csv``       the lesion-grouped stratified split, created by the first backbone's training
                       (config ``splits``, ``split_seed`` = S or ``--split-seed``, ``val_fraction``,
                       ``test_fraction``) and reused by the other backbones, calibration and evaluation
* ``calibration.json`` ``training.calibrate.calibrate(OUT/seed_S, views)``
* ``eval_<split>/``    ``training.evaluate.evaluate`` report files

and then ``OUT/summary.json`` + ``OUT/summary.md``: for each report row (single models, ensemble,
+ TTA, + thresholds) the mean ± sample standard deviation (ddof=1) over seeds of BACC, malignant
BACC, macro AUC and MEL sensitivity, with the per-seed values.

Everything after ``--`` is passed to the training config as keys (``--batch-size 8`` -> 
``batch_size: 8``; numbers, true/false and none are converted; a flag without a value is true).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lesionserve import prog
from lesionserve.pipelines import LESION_ENSEMBLE
from lesionserve.spec import ALLOWED_VIEWS

#: What a multi-seed study trains: the members of the seed ensemble.
BACKBONE_NAMES = LESION_ENSEMBLE.member_names
from lesionserve.training.data import LAYOUTS
from lesionserve.training.evaluate import EVAL_SPLITS, evaluate
from lesionserve.training.reports import fmt, fmt_mean_std, markdown_table
from lesionserve.training.splits import read_splits, split_summary

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
DONE_MARKER = ".multiseed_done"  # written after a backbone's training returned: --resume skips it
#: Config keys multiseed sets itself (from its own options); passing them after ``--`` is refused.
RESERVED_KEYS = frozenset({"backbone", "data", "out", "seed", "splits", "split_seed", "val_fraction",
                           "test_fraction", "layout"})
#: Row metrics summarised over seeds: (key in a report row, label).
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "BACC"),
    ("malignant_balanced_accuracy", "malignant BACC"),
    ("macro_auc", "macro AUC"),
    ("mel_sensitivity", "MEL sens"),
)


# ------------------------------------------------------------------------------------ pass-through


def _convert(value: str) -> Any:
    """'8' -> 8, '1e-4' -> 0.0001, 'true' -> True, 'none' -> None, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return value


def parse_passthrough(tokens: Sequence[str]) -> dict[str, Any]:
    """``["--epochs", "3", "--lr=1e-4", "--flag", "--sizes", "1", "2"]`` -> config keys.

    Dashes in names become underscores; several values make a list; a name with no value is True.
    """
    config: dict[str, Any] = {}
    key: str | None = None
    values: list[Any] = []

    def flush() -> None:
        if key is not None:
            config[key] = True if not values else values[0] if len(values) == 1 else list(values)

    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            flush()
            name, eq, value = token[2:].partition("=")
            key, values = name.replace("-", "_"), ([_convert(value)] if eq else [])
        elif key is None:
            raise ValueError(f"training option value {token!r} has no --name before it")
        else:
            values.append(_convert(token))
    flush()
    reserved = sorted(RESERVED_KEYS & set(config))
    if reserved:
        raise ValueError(f"multiseed sets {', '.join(reserved)} itself; use its own options "
                         "(--data, --seeds, --val, --test, --split-seed, --layout), not options after --")
    return config


# ------------------------------------------------------------------------------------- the stages


def _check_train_accepts(module: Any, keys: Sequence[str]) -> None:
    """Fail before hours of training if train() would reject a key (it validates against TrainConfig)."""
    config_class = getattr(module, "TrainConfig", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"lesionserve.training.train does not accept config key(s) {', '.join(unknown)} "
                         f"(it knows {', '.join(sorted(known))})")


def train_seed(
    seed_dir: Path, seed: int, data: str, backbones: Sequence[str], splits_path: Path,
    extra: Mapping[str, Any], resume: bool = False,
) -> None:
    """Train every backbone of one seed with ``training.train.train`` (looked up at call time).

    ``extra`` holds the other config keys (split fractions and seed, layout, pass-through options).
    Training creates ``splits_path`` on first use and every later backbone reads the same file.
    """
    train_module = importlib.import_module("lesionserve.training.train")
    for backbone in backbones:
        out = seed_dir / backbone
        if resume and (out / DONE_MARKER).is_file():
            print(f"seed {seed}: {backbone} already trained, skipping (--resume)", file=sys.stderr)
            continue
        config = {"backbone": LESION_ENSEMBLE.member(backbone).architecture, "data": data, "out": str(out), "seed": seed, "splits": str(splits_path),
                  **extra}
        _check_train_accepts(train_module, list(config))
        print(f"seed {seed}: training {backbone}", file=sys.stderr)
        train_module.train(config)
        (out / DONE_MARKER).write_text(json.dumps(config, indent=2) + "\n")


def calibrate_seed(seed_dir: Path, views: int) -> None:
    """``training.calibrate.calibrate(seed_dir, views)`` (looked up at call time)."""
    importlib.import_module("lesionserve.training.calibrate").calibrate(seed_dir, views)


# ------------------------------------------------------------------------------------ aggregation


def _row_value(row: Mapping[str, Any], key: str) -> float:
    value = row["sensitivity"].get("MEL") if key == "mel_sensitivity" else row.get(key)
    return float("nan") if value is None else float(value)


def aggregate(results: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; 0 for one seed) per report row over the seeds' evaluate results.

    Rows are matched by their ``key``; a row missing from some seed is summarised over the seeds
    that have it (``seeds`` lists them). NaN values (e.g. a class absent) are left out.
    """
    if not results:
        raise ValueError("no seed results to aggregate")
    order: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for seed, result in results.items():
        for row in result["rows"]:
            if row["key"] not in rows:
                order.append(row["key"])
                rows[row["key"]] = {"key": row["key"], "title": row["title"], "views": row["views"],
                                    "fusion": row["fusion"], "decision": row["decision"], "seeds": [],
                                    "values": {k: [] for k, _ in SUMMARY_METRICS}}
            entry = rows[row["key"]]
            entry["seeds"].append(seed)
            for key, _ in SUMMARY_METRICS:
                entry["values"][key].append(_row_value(row, key))
    summary_rows = []
    for key in order:
        entry = rows[key]
        for metric, _ in SUMMARY_METRICS:
            values = np.array([v for v in entry["values"][metric] if not math.isnan(v)])
            entry[metric] = {
                "mean": float(values.mean()) if values.size else None,
                "std": (float(values.std(ddof=1)) if values.size > 1 else 0.0) if values.size else None,
                "n": int(values.size),
                "per_seed": [None if math.isnan(v) else v for v in entry["values"][metric]],
            }
        del entry["values"]
        summary_rows.append(entry)
    first = next(iter(results.values()))
    return {"seeds": list(results), "split": first.get("split"), "views": first.get("views"), "rows": summary_rows}


def render_summary(summary: Mapping[str, Any]) -> str:
    """Markdown for an ``aggregate`` result."""
    seeds = summary["seeds"]
    lines = [f"# Multi-seed summary: {summary['split']} split, seeds {', '.join(map(str, seeds))}", "",
             "Mean ± sample standard deviation (ddof=1) over seeds; per-seed BACC in the last column.", ""]
    table = []
    for row in summary["rows"]:
        cells = [row["title"], row["views"], row["decision"]]
        for metric, _ in SUMMARY_METRICS:
            cells.append(fmt_mean_std([v for v in row[metric]["per_seed"] if v is not None]))
        per_seed = ", ".join(f"{s}: {fmt(v)}" for s, v in zip(row["seeds"], row["balanced_accuracy"]["per_seed"]))
        cells.append(per_seed)
        table.append(cells)
    headers = ["model", "T", "decision", *(label for _, label in SUMMARY_METRICS), "BACC per seed"]
    lines.append(markdown_table(headers, table, align="lrl" + "r" * len(SUMMARY_METRICS) + "l"))
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- run


def run(
    data: str,
    out: str | Path,
    seeds: Sequence[int],
    backbones: Sequence[str] = BACKBONE_NAMES,
    layout: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int | None = None,
    views: int = 8,
    eval_split: str = "test",
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    train_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole multi-seed experiment; returns the summary (also written to OUT/summary.{json,md})."""
    if not seeds:
        raise ValueError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    if eval_split == "test" and test_fraction <= 0:
        raise ValueError("evaluating on test needs --test > 0 (or --eval-split val)")
    for b in backbones:
        LESION_ENSEMBLE.member(b)
    reserved = sorted(RESERVED_KEYS & set(train_options or {}))
    if reserved:
        raise ValueError(f"train_options must not set {', '.join(reserved)}: multiseed sets them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(train_options or {})
    results: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, seed in enumerate(seeds, start=1):
        seed_dir = out / f"seed_{seed}"
        splits_path = seed_dir / "splits.csv"
        extra = {"split_seed": seed if split_seed is None else split_seed, "val_fraction": val_fraction,
                 "test_fraction": test_fraction, **({"layout": layout} if layout is not None else {}), **options}
        log(f"[{index}/{len(seeds)}] seed {seed}: {seed_dir}")
        train_seed(seed_dir, seed, str(data), backbones, splits_path, extra, resume=resume)
        if not splits_path.is_file():
            raise FileNotFoundError(f"training did not write the split file {splits_path}")
        log(split_summary(read_splits(splits_path)))
        calibrate_seed(seed_dir, views)
        results[seed] = evaluate(seed_dir, split=eval_split, splits_file=splits_path, views=views, backbones=backbones,
                                 out=seed_dir / f"eval_{eval_split}", n_boot=n_boot, seed=bootstrap_seed)
        final = results[seed]["rows"][-1]
        log(f"seed {seed}: {final['title']} BACC {fmt(final['balanced_accuracy'])} "
            f"({time.perf_counter() - started:.0f}s so far)")
        # Rewritten after every seed, so an interrupted run still has a summary of what finished.
        summary = aggregate(results)
        summary.update(data=str(data), backbones=list(backbones), train_options=options,
                       split_seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction)
        (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        (out / SUMMARY_MD).write_text(render_summary(summary), encoding="utf-8")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m training.multiseed"),
        description="For each seed: lesion-grouped split, train each backbone (training.train), calibrate "
                    "(training.calibrate), evaluate (training.evaluate); then mean ± std over seeds of each "
                    "report row's BACC and malignant BACC in OUT/summary.md and OUT/summary.json.",
        epilog="Training options go after '--' and become training config keys, e.g. "
               "python -m training.multiseed --data DATA --out runs/ms --seeds 0 1 2 -- --epochs 30 --batch-size 32 "
               "--config recipe.yaml",
    )
    parser.add_argument("--data", required=True, metavar="PATH", help="dataset folder or HAM10000 metadata CSV")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="experiment folder (seed_S/ per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S", help="seeds (default: 0 1 2)")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONE_NAMES, default=list(BACKBONE_NAMES),
                        metavar="NAME", help=f"backbones to train (default: {' '.join(BACKBONE_NAMES)})")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="dataset layout (default: auto; when given it is also passed to training)")
    parser.add_argument("--val", type=float, default=0.2, metavar="F", help="validation fraction (default: 0.2)")
    parser.add_argument("--test", type=float, default=0.2, metavar="F", help="test fraction (default: 0.2)")
    parser.add_argument("--split-seed", type=int, default=None, metavar="S",
                        help="use this split seed for every run (default: each run's own seed, so the spread "
                             "includes the split)")
    parser.add_argument("--views", type=int, choices=ALLOWED_VIEWS, default=8,
                        help="TTA views for calibration and evaluation (default: 8)")
    parser.add_argument("--eval-split", choices=EVAL_SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples per evaluation (default: 1000)")
    parser.add_argument("--resume", action="store_true",
                        help="skip backbones whose training finished in an earlier run (seed_S/<backbone>/"
                             f"{DONE_MARKER}); calibration and evaluation are redone")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    try:
        train_options = parse_passthrough(argv[cut + 1:])
    except ValueError as exc:
        parser.error(str(exc))
    try:
        summary = run(args.data, args.out, args.seeds, backbones=args.backbones, layout=args.layout,
                      val_fraction=args.val, test_fraction=args.test, split_seed=args.split_seed, views=args.views,
                      eval_split=args.eval_split, n_boot=args.bootstrap, train_options=train_options,
                      resume=args.resume)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_summary(summary))
    print(f"wrote {args.out / SUMMARY_MD} and {args.out / SUMMARY_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
