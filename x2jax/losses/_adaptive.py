"""Adaptive-margin peers: CurricularFace, AdaFace, ElasticFace, and their state updates.

State is explicit and never mutated: CurricularFace's running mean ``t`` and
AdaFace's running norm statistics are keywords of the margin functions, advanced
by :func:`curricularface_update` / :func:`adaface_update`; ElasticFace takes an
``rng``.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from x2jax.losses._common import (
    SIN_FLOOR,
    TargetMargin,
    clip_cosine,
    prepare,
    replace_target,
    safe_arccos,
    sin_floor,
    target_margin_logits,
)
from x2jax.losses._registry import MarginSpec, State, register

Array = jax.Array

# ----------------------------------------------------------------------------
# CurricularFace
# ----------------------------------------------------------------------------


def curricularface(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    t: Array | float = 0.0,
) -> Array:
    """CurricularFace (Huang et al., CVPR 2020), following the official code.

    Target ``cos(theta_y + m)`` where ``cos_y > cos(pi - m)``, else ``cos_y - m
    sin(pi - m)``; hard negatives (``cos_j > cos(theta_y + m)``) become ``cos_j (t +
    cos_j)``; all times s. True gradient (``t`` and the hard mask are constants).
    The official code advances ``t`` just before using it, the training step
    after the step: a one-step lag that momentum 0.01 makes negligible. Not
    target-only: the hard negatives depend on ``cos_y``.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      margin: m, radians.
      t: scalar, the running mean of ``cos_y`` from :func:`curricularface_update`.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    floor = sin_floor(cosine.dtype)
    cosine, target_mask, cos_y = prepare(cosine, labels)
    t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
    cos_y_m = jnp.cos(safe_arccos(cos_y, floor) + margin)
    target = jnp.where(
        cos_y > math.cos(math.pi - margin), cos_y_m, cos_y - math.sin(math.pi - margin) * margin
    )
    hard = jax.lax.stop_gradient(cosine > cos_y_m[:, None]) & ~target_mask
    cosine = jnp.where(hard, cosine * (t + cosine), cosine)
    return replace_target(cosine, target_mask, target, scale)


def curricularface_update(t: Array, target_cosine: Array, *, momentum: float = 0.01) -> Array:
    """``t <- momentum mean(cos_y) + (1 - momentum) t`` (official momentum 0.01).

    Args:
      t: scalar, the running mean.
      target_cosine: (B,) ``cos_y`` of the batch.
      momentum: EMA weight of the batch.

    Returns:
      The new ``t``, float32 scalar.
    """
    cos_y = clip_cosine(target_cosine.astype(jnp.float32))
    return jax.lax.stop_gradient(momentum * jnp.mean(cos_y) + (1.0 - momentum) * t)


def _curricularface_initial_state() -> State:
    return {"t": jnp.zeros((), jnp.float32)}


def _curricularface_state(state: State, *, target_cosine: Array, norms: Array) -> State:
    del norms
    return {"t": curricularface_update(state["t"], target_cosine)}


register(MarginSpec(
    name="curricularface", fn=curricularface, params=("scale", "margin"),
    init_state=_curricularface_initial_state, update_state=_curricularface_state,
    nontarget_depends_on_target=True,
))


# ----------------------------------------------------------------------------
# AdaFace
# ----------------------------------------------------------------------------

# Initial running feature-norm statistics (official).
_ADAFACE_MEAN = 20.0
_ADAFACE_STD = 100.0


def _adaface_margin(
    *,
    norms: Array,
    scale: float = 64.0,
    margin: float = 0.4,
    h: float = 0.333,
    batch_mean: Array | float = _ADAFACE_MEAN,
    batch_std: Array | float = _ADAFACE_STD,
    eps: float = 1e-3,
) -> TargetMargin:
    """AdaFace target ``cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z)``; see :func:`adaface`."""

    def target(cos_y: Array) -> Array:
        chex.assert_shape(norms, cos_y.shape)
        cos_y = jnp.clip(cos_y, -1.0 + eps, 1.0 - eps)
        safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32), 0.001, 100.0))
        z = (safe_norms - batch_mean) / (batch_std + eps)
        z = jax.lax.stop_gradient(jnp.clip(z * h, -1.0, 1.0))
        theta = jnp.arccos(cos_y)
        theta_m = jnp.clip(theta - margin * z, eps, math.pi - eps)
        return jnp.cos(theta_m) - (margin + margin * z)

    return TargetMargin(scale, target, clip=(-1.0 + eps, 1.0 - eps))


def adaface(
    cosine: Array,
    labels: Array,
    *,
    norms: Array,
    scale: float = 64.0,
    margin: float = 0.4,
    h: float = 0.333,
    batch_mean: Array | float = _ADAFACE_MEAN,
    batch_std: Array | float = _ADAFACE_STD,
    eps: float = 1e-3,
) -> Array:
    """AdaFace (Kim et al., CVPR 2022), following the official code.

    With ``z = clip(h (||x|| - mean) / (std + eps), -1, 1)`` (norms detached):
    target ``cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z)``, all times s,
    true gradient. Every cosine is first clipped to ``[-1 + eps, 1 - eps]`` (true
    clip gradient).

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      norms: (B,) feature norms ``||x||``.
      scale: s.
      margin: m.
      h: concentration of ``z``.
      batch_mean: running norm mean from :func:`adaface_update`.
      batch_std: running norm std from :func:`adaface_update`.
      eps: clip margin.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    return target_margin_logits(cosine, labels, _adaface_margin(
        norms=norms, scale=scale, margin=margin, h=h,
        batch_mean=batch_mean, batch_std=batch_std, eps=eps,
    ))


def adaface_update(
    batch_mean: Array, batch_std: Array, norms: Array, *, t_alpha: float = 0.01
) -> tuple[Array, Array]:
    """Running feature-norm statistics of AdaFace: an EMA with weight ``t_alpha``.

    Args:
      batch_mean: scalar running mean.
      batch_std: scalar running std.
      norms: (B,) feature norms of the batch.
      t_alpha: EMA weight of the batch (official 0.01).

    Returns:
      ``(mean, std)``, the new float32 scalars.
    """
    safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32), 0.001, 100.0))
    mean = jnp.mean(safe_norms)
    std = jnp.std(safe_norms, ddof=1) if safe_norms.shape[0] > 1 else jnp.float32(0.0)
    return (
        t_alpha * mean + (1.0 - t_alpha) * batch_mean,
        t_alpha * std + (1.0 - t_alpha) * batch_std,
    )


def _adaface_initial_state() -> State:
    return {
        "batch_mean": jnp.full((), _ADAFACE_MEAN, jnp.float32),
        "batch_std": jnp.full((), _ADAFACE_STD, jnp.float32),
    }


def _adaface_state(state: State, *, target_cosine: Array, norms: Array) -> State:
    del target_cosine
    mean, std = adaface_update(state["batch_mean"], state["batch_std"], norms)
    return {"batch_mean": mean, "batch_std": std}


register(MarginSpec(
    name="adaface", fn=adaface, target_margin=_adaface_margin, params=("scale", "margin", "h", "eps"),
    init_state=_adaface_initial_state, update_state=_adaface_state, needs_norms=True,
))


# ----------------------------------------------------------------------------
# ElasticFace
# ----------------------------------------------------------------------------


def _elasticface_margin(
    *, rng: Array, scale: float = 64.0, margin: float = 0.5, sigma: float = 0.05,
    floor: float = SIN_FLOOR,
) -> TargetMargin:
    """ElasticFace-Arc target ``cos(arccos(cos_y) + m_i)``, ``m_i ~ N(margin, sigma)``."""

    def target(cos_y: Array) -> Array:
        m = margin + sigma * jax.random.normal(rng, cos_y.shape, jnp.float32)
        return jnp.cos(safe_arccos(cos_y, floor) + m)

    return TargetMargin(scale, target)


def elasticface(
    cosine: Array,
    labels: Array,
    *,
    rng: Array,
    scale: float = 64.0,
    margin: float = 0.5,
    sigma: float = 0.05,
) -> Array:
    """ElasticFace-Arc (Boutros et al., CVPRW 2022): target logit ``s cos(theta_y + m_i)``.

    One margin ``m_i ~ N(m, sigma)`` per row, drawn from ``rng``; true gradient
    through ``arccos`` as in the official code (``sin theta`` floored at
    :func:`sin_floor` of the cosine's dtype).

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      rng: PRNG key.
      scale: s.
      margin: mean margin m, radians.
      sigma: standard deviation of the margins.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    margin_ = _elasticface_margin(
        rng=rng, scale=scale, margin=margin, sigma=sigma, floor=sin_floor(cosine.dtype)
    )
    return target_margin_logits(cosine, labels, margin_)


register(MarginSpec(
    name="elasticface", fn=elasticface, target_margin=_elasticface_margin,
    params=("scale", "margin", "sigma"), needs_rng=True,
))
