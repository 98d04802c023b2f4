"""ROC plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str,
    *,
    title: str = "ROC",
    log_fpr: bool = False,
    fpr_range: tuple[float, float] | None = None,
) -> str:
    """Write one figure with a TPR-vs-FPR line per ``name -> (fpr, tpr)``; returns ``path``.

    ``log_fpr`` draws FPR on a log axis (IJB style, 1e-6 ... 1e-1); points with
    FPR = 0 are then left out of the line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        order = np.argsort(fpr, kind="stable")
        fpr, tpr = fpr[order], tpr[order]
        if log_fpr:
            keep = fpr > 0
            fpr, tpr = fpr[keep], tpr[keep]
        ax.plot(fpr, tpr, lw=1.2, label=name)
    if log_fpr:
        ax.set_xscale("log")
    if fpr_range is not None:
        ax.set_xlim(*fpr_range)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
