"""Geometry of margin losses: target logit against the angle, decision-boundary gap.

Used by ``scripts/plot_losses.py`` (docs/losses.md) and the tests. Works from the
registered margin functions themselves, so the curves are those of the code.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from x2jax.losses._registry import get


def target_logit(name: str, theta: np.ndarray, **params: Any) -> np.ndarray:
    """Unscaled target logit ``f(theta)`` of a registered loss.

    Args:
      name: the loss name.
      theta: (N,) angles, radians.
      **params: keyword arguments of the margin function (``scale`` is set to 1).

    Returns:
      (N,) float64.
    """
    theta = np.asarray(theta, np.float64)
    cosine = jnp.asarray(np.cos(theta)[:, None], jnp.float32)
    labels = jnp.zeros((theta.shape[0],), jnp.int32)
    logits = get(name)(cosine, labels, scale=1.0, **params)
    return np.asarray(logits[:, 0], np.float64)


def angular_gap(name: str, phi: float, *, grid: int = 20001, **params: Any) -> float:
    """Angular gap between the two decision boundaries of two centres ``phi`` apart.

    In the plane of the centres, a sample at angle ``theta`` from its own centre is at
    ``phi - theta`` from the other; it is classified with margin while
    ``f(theta) > cos(phi - theta)``. With ``theta*`` the largest such angle, the
    symmetric gap is ``phi - 2 theta*``.

    Args:
      name: the loss name.
      phi: angle between the centres, radians.
      grid: number of angles searched in ``[0, phi]``.
      **params: keyword arguments of the margin function.

    Returns:
      The gap in radians; NaN where no sample qualifies (no boundary: the margin
      swallows the whole arc, X2-Softmax below ``arccos(k)``).
    """
    theta = np.linspace(0.0, phi, grid)
    wins = target_logit(name, theta, **params) > np.cos(phi - theta)
    if not wins.any():
        return float("nan")
    return float(phi - 2.0 * theta[np.flatnonzero(wins)[-1]])
