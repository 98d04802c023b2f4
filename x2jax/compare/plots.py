"""The comparison's figures (matplotlib, Agg): accuracy against step, and final target angles against the margins.

- ``accuracy_<set>.png``: verification accuracy at each eval step, per loss the
  mean over seeds with a min-max band over seeds.
- ``target_angles.png``: per loss, the histogram (density, all seeds pooled)
  of the angle between each measured training sample and its class centre at
  the end (``final_angles.json``), with the nearest other centre's angle as an
  outline, drawn against the loss's target logit ``f(theta)`` (unscaled; from
  the registry's margin function, :func:`x2jax.losses.geometry.target_logit`)
  and ``cos(theta)`` (no margin) on the right axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from x2jax.compare.results import read_final_angles
from x2jax.compare.runs import Comparison
from x2jax.losses import geometry


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_accuracy(results: dict[str, Any], directory: Path) -> list[Path]:
    """One ``accuracy_<set>.png`` per verification set; returns the paths."""
    plt = _pyplot()
    paths = []
    for name in results["sets"]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in results["losses"]:
            curves = [r["curves"][name] for r in results["runs"]
                      if r["loss"] == label and r["finished"] and name in r["curves"]]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
            acc = np.array([[c["accuracy"][c["step"].index(s)] for s in steps] for c in curves]) * 100
            line, = ax.plot(steps, acc.mean(axis=0), marker="o", ms=3, label=f"{label} (n={len(curves)})")
            ax.fill_between(steps, acc.min(axis=0), acc.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} verification accuracy (%)")
        ax.set_title("mean over seeds, band: min-max over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"accuracy_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_target_angles(comparison: Comparison, directory: Path) -> Path | None:
    """``target_angles.png`` (None if no run has final angles yet)."""
    plt = _pyplot()
    per_loss = []
    for choice in comparison.losses:
        found = [read_final_angles(p) for p in comparison.runs if p.loss.label == choice.label]
        found = [a for a in found if a is not None]
        if found:
            per_loss.append((choice, np.concatenate([a["target_deg"] for a in found]),
                             np.concatenate([a["nearest_deg"] for a in found]), len(found)))
    if not per_loss:
        return None
    fig, axes = plt.subplots(len(per_loss), 1, figsize=(6.4, 2.3 * len(per_loss)), sharex=True, squeeze=False)
    theta = np.linspace(0.0, np.pi, 361)
    bins = np.linspace(0, 180, 91)
    for ax, (choice, target, nearest, n) in zip(axes[:, 0], per_loss):
        ax.hist(target, bins=bins, density=True, alpha=0.6, label=f"target angle ({n} runs)")
        ax.hist(nearest, bins=bins, density=True, histtype="step", color="0.3", label="nearest other centre")
        ax.set_ylabel("density")
        right = ax.twinx()
        params = {k: v for k, v in choice.params.items() if k != "scale"}
        try:
            curve = geometry.target_logit(choice.name, theta, **params)
        except (TypeError, ValueError):  # a margin that needs more than the angle (AdaFace's norms)
            curve = None
        if curve is not None:
            right.plot(np.degrees(theta), curve, color="C3", label="target logit f(theta)")
        right.plot(np.degrees(theta), np.cos(theta), color="C3", ls=":", label="cos(theta)")
        right.set_ylabel("logit / s")
        ax.set_title(f"{choice.label}: mean target angle {target.mean():.1f} deg", fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("angle (degrees)")
    axes[-1, 0].set_xlim(0, 180)
    fig.tight_layout()
    path = directory / "target_angles.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
