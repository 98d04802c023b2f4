"""Evaluation output: printed tables, the results JSON and ROC figures (matplotlib, Agg)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from x2jax.evaluation.ijb import FARS, IJBResult


def format_verification_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table of verification results: set, pairs, accuracy %, VAL@FAR=1e-3 %, threshold.

    Args:
      rows: set name -> :class:`~x2jax.evaluation.verification.VerificationResult`
        plus ``num_pairs``.
    """
    header = ["set", "pairs", "accuracy %", "VAL@FAR=1e-3 %", "threshold"]
    lines = [
        [
            name,
            str(r["num_pairs"]),
            f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}",
            f"{100 * r['val']:.2f} ± {100 * r['val_std']:.2f}",
            f"{r['threshold']:.3f}",
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def format_ijb_table(results: Sequence[IJBResult]) -> str:
    """Plain-text table: one row per IJB result, TAR (%) per FAR column, as insightface prints."""
    header = ["set"] + [f"{far:.0e}" for far in FARS] + ["AUC %"]
    rows = [
        [r["target"]] + [f"{100 * r['tar_at_far'][far]:.2f}" for far in FARS] + [f"{100 * r['auc']:.2f}"]
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).rjust(w) for x, w in zip(line, widths)) for line in [header, *rows])


def to_jsonable(x: Any) -> Any:
    """``x`` with numpy values as Python ones, keys as str, and NaN / inf as None (JSON has neither)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str | os.PathLike, results: Mapping[str, Any]) -> str:
    """Write ``to_jsonable(results)`` to ``path`` (parent directories created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(to_jsonable(results), f, indent=1)
    return path


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str = "ROC",
    log_fpr: bool = False,
    fpr_range: tuple[float, float] | None = None,
) -> str:
    """Write one figure with a TPR-vs-FPR line per ``name -> (fpr, tpr)``.

    Args:
      curves: legend label -> (fpr, tpr) arrays.
      path: PNG file to write (parent directories created).
      title: figure title.
      log_fpr: FPR on a log axis (IJB style); points with FPR = 0 are left out.
      fpr_range: x-axis limits.

    Returns:
      ``path``.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
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


def plot_verification_roc(rows: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Verification ROC figure, one line per set labelled with its accuracy; returns ``path``."""
    curves = {f"{name} ({100 * r['accuracy']:.2f}%)": (r["fpr"], r["tpr"]) for name, r in rows.items()}
    return plot_roc(curves, path, title="Verification ROC")


def plot_ijb_roc(results: Sequence[IJBResult], path: str | os.PathLike) -> str:
    """IJB ROC figure: log FPR from 1e-6 to 1e-1, one line per result; returns ``path``."""
    curves = {f"{r['target']} (AUC {100 * r['auc']:.2f}%)": (r["fpr"], r["tpr"]) for r in results}
    return plot_roc(curves, path, title="ROC on IJB", log_fpr=True, fpr_range=(1e-6, 1e-1))
