"""Training curves as a PNG: loss (train and val), validation balanced accuracy and learning rate per epoch.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend switch),
and replaces the file atomically so a viewer never reads a half-written image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write the curves of ``history`` (entries with epoch, train_loss, val_loss, val_bacc, lr) to ``path``."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    path = Path(path)
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, bacc_ax, lr_ax = figure.subplots(1, 3)

    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (focal)")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val (cross-entropy)")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()

    baccs = [h["val_bacc"] for h in history]
    bacc_ax.plot(epochs, baccs, "o-", color="tab:green")
    best = max(range(len(baccs)), key=baccs.__getitem__)
    bacc_ax.plot([epochs[best]], [baccs[best]], "*", markersize=14, color="tab:red", label=f"best {baccs[best]:.3f}")
    bacc_ax.set(title="validation balanced accuracy", xlabel="epoch", ylim=(0.0, 1.0))
    bacc_ax.legend(loc="best")

    lr_ax.plot(epochs, [h["lr"] for h in history], "o-", color="tab:purple")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    if all(h["lr"] > 0 for h in history):
        lr_ax.set_yscale("log")

    for ax in (loss_ax, bacc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 10)])
    if title:
        figure.suptitle(title)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path
