"""Markdown and plot helpers for evaluation reports (matplotlib Agg canvas; no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lesionserve.spec import CLASS_NAMES


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a report; ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` (or just the value when there is no interval)."""
    if ci is None or any(c is None or math.isnan(c) for c in ci):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std, ddof=1) of finite values; just the value when there is one."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return fmt(float(v[0]), digits)
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l, r, c), default left then right."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} letters for {len(headers)} columns")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    # The object API with an Agg canvas: no pyplot global state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_confusion(cm: np.ndarray, path: str | Path, title: str, class_names: Sequence[str] = CLASS_NAMES) -> Path:
    """Confusion matrix PNG: colour = row-normalised share (recall on the diagonal), text = counts."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape, dtype=np.float64), where=support > 0)
    figure = _figure(6.4, 5.6)
    ax = figure.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path, title: str) -> Path:
    """One-vs-rest ROC curves PNG; ``curves`` maps a label to (fpr, tpr, auc)."""
    figure = _figure(6.0, 5.6)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {fmt(auc)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def run_report_command(run, args, files: Sequence[str]) -> int:
    """The main() of a report command: ``run(args)`` (which sets ``args.out``), its report.md printed
    and the files it wrote named; a ValueError or FileNotFoundError is one ``error:`` line, status 2."""
    import sys

    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "report.md").read_text())
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0
