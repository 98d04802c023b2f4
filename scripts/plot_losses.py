"""Plot the target logit against theta and the adaptive angular margin (docs/losses.md).

Usage: python scripts/plot_losses.py [--out docs/img/losses.png]
Curves are computed by the registered margin functions themselves.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from x2jax.losses.geometry import angular_gap, target_logit  # noqa: E402

CURVES = [
    ("x2_softmax", "X2-Softmax (a=-0.9, h=0, k=0.65)"),
    ("arcface", "ArcFace (m=0.5)"),
    ("cosface", "CosFace (m=0.35)"),
    ("normface", "Softmax (normalised)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/img/losses.png")
    args = parser.parse_args()

    theta = np.linspace(0.0, math.pi, 721)
    phi = np.linspace(math.radians(1), math.pi, 180)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, label in CURVES:
        ax1.plot(np.degrees(theta), target_logit(name, theta), label=label)
    ax1.set(xlabel="theta_y (degrees)", ylabel="target logit f(theta) (before scale s)",
            title="Target logit against the angle", ylim=(-9, 1.2))
    ax1.grid(alpha=0.3)
    ax1.legend()
    print(f"{'phi (deg)':>10} " + " ".join(f"{n:>11}" for n, _ in CURVES[:3]))
    for name, label in CURVES[:3]:
        gap = np.array([angular_gap(name, p) for p in phi])
        ax2.plot(np.degrees(phi), np.degrees(gap), label=label.split(" (")[0])
    for p in (60, 90, 120, 180):
        row = [math.degrees(angular_gap(n, math.radians(p))) for n, _ in CURVES[:3]]
        print(f"{p:>10} " + " ".join(f"{v:>11.1f}" for v in row))
    ax2.set(xlabel="angle between the two class centres phi (degrees)",
            ylabel="angular gap between decision boundaries (degrees)",
            title="Margin against the angle between classes")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
