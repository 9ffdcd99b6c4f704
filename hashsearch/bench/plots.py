"""PNG figures of evaluation results, in the style of the paper's Figures 4-6.

matplotlib is imported inside each function, with the Agg backend, so that
importing this module costs nothing and works without a display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_write


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path, dpi: int = 120) -> Path:
    """Write a figure atomically: a failed save leaves the old file, or none, never half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def _finish(fig, ax, path, xlabel: str, ylabel: str, title: str | None) -> Path:
    """Common axes dressing, then save as PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_precision_at_k(results: list[dict], path, title: str | None = None) -> Path:
    """One P@k line per result of evaluate(), labelled by mode (and bits)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for r in results:
            p = r["precision_at_k"]
            ks = np.array(sorted(int(k) for k in p))
            ax.plot(ks, [p[str(k)] for k in ks], label=f"{r['mode']} ({r['bits']} bits)" if "bits" in r else r["mode"])
        return _finish(fig, ax, path, "number of top retrieved images k", "precision@k", title)
    finally:
        plt.close(fig)


def plot_pr_curve(curves: dict, path, title: str | None = None) -> Path:
    """Precision against recall of Hamming-ball retrieval, one line per entry.

    `curves` maps a label (e.g. "ours 48 bits", "itq 48 bits") to the
    (radius, precision, recall) triple of metrics.pr_curve_hamming.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    try:
        for label, (_, precision, recall) in curves.items():
            ok = ~np.isnan(precision)
            ax.plot(np.asarray(recall)[ok], np.asarray(precision)[ok], marker=".", label=label)
        ax.set_xlim(0, 1.02)
        return _finish(fig, ax, path, "recall", "precision", title)
    finally:
        plt.close(fig)
