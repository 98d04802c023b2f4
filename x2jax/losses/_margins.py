"""Target-only margins: X2-Softmax, NormFace, combined margin (ArcFace, CosFace), SphereFace.

Each loss is written once, as a target margin ``_<loss>_margin(**params) ->
TargetMargin``: the scale and the per-row target ``cos_y (B,) -> (B,)``, with the
official defaults. The public ``(B, C)`` function is that margin's
:func:`target_margin_logits`; ``margin_loss`` and the sharded head use the same
margin through the registry.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from x2jax.losses._common import (
    SIN_FLOOR,
    TargetMargin,
    prepare,
    replace_target,
    safe_arccos,
    sin_floor,
    straight_through,
    target_margin_logits,
    theta_of,
)
from x2jax.losses._registry import MarginSpec, register

Array = jax.Array
X2Gradient = Literal["straight_through", "exact"]
CombinedGradient = Literal["auto", "straight_through", "exact"]


# ----------------------------------------------------------------------------
# X2-Softmax
# ----------------------------------------------------------------------------


def _x2_value(theta: Array, a: float, h: float, k: float) -> Array:
    return a * (theta - h) ** 2 + k


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _x2_exact(cos: Array, a: float, h: float, k: float, floor: float) -> Array:
    return _x2_value(theta_of(cos), a, h, k)


@_x2_exact.defjvp
def _x2_exact_jvp(a, h, k, floor, primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = theta_of(cos)
    sin = jnp.maximum(jnp.sin(theta), floor)
    # d f / d cos = 2a (theta - h) * (-1 / sin theta)
    #             = -2a * theta / sin(theta) + 2a h / sin(theta).
    # theta / sin(theta) = 1 / sinc(theta / pi) is smooth at theta = 0 (limit 1),
    # so with h = 0 the derivative is exact there (-2a); sin is floored for theta -> pi
    # and for the h / sin(theta) term.
    theta_over_sin = jnp.where(
        theta < 0.5 * math.pi, 1.0 / jnp.sinc(theta / math.pi), theta / sin
    )
    dfdcos = -2.0 * a * theta_over_sin + 2.0 * a * h / sin
    return _x2_value(theta, a, h, k), dfdcos * dcos


def _x2_margin(
    *,
    scale: float = 64.0,
    a: float = -0.9,
    h: float = 0.0,
    k: float = 0.65,
    gradient: X2Gradient = "straight_through",
    floor: float = SIN_FLOOR,
) -> TargetMargin:
    """X2 target ``a (arccos(cos_y) - h)^2 + k``; see :func:`x2_softmax`."""

    def target(cos_y: Array) -> Array:
        if gradient == "straight_through":
            return straight_through(cos_y, _x2_value(theta_of(cos_y), a, h, k))
        if gradient == "exact":
            return _x2_exact(cos_y, float(a), float(h), float(k), float(floor))
        raise ValueError(f"gradient must be 'straight_through' or 'exact', got {gradient!r}")

    return TargetMargin(scale, target)


def x2_softmax(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    a: float = -0.9,
    h: float = 0.0,
    k: float = 0.65,
    gradient: X2Gradient = "straight_through",
) -> Array:
    """X2-Softmax logits (arXiv 2312.05281): a quadratic target logit in the angle.

    Target logit ``s (a (theta_y - h)^2 + k)`` with ``theta_y = arccos(cos_y)``,
    others ``s cos theta_j``. Official constants s=64, a=-0.9, h=0, k=0.65
    (``f(0) = 0.65``, ``f(pi/2) = -1.571``, ``f(pi) = -8.233``).

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      a: curvature (negative).
      h: angle of the vertex.
      k: value at the vertex.
      gradient: ``"straight_through"`` (official, in place under ``no_grad``):
        ``cos_y`` gets the gradient of ``s cos_y`` at the X2 probabilities.
        ``"exact"``: ``df/dcos = -2a (theta - h) / sin theta``, finite everywhere
        (limit ``-2a`` at theta = 0 when h = 0; ``sin theta`` floored at
        :func:`sin_floor` of the cosine's dtype).

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``, an unknown ``gradient``.

    Examples:
      >>> logits = x2_softmax(cosine, labels)  # (B, C)
    """
    margin = _x2_margin(
        scale=scale, a=a, h=h, k=k, gradient=gradient, floor=sin_floor(cosine.dtype)
    )
    return target_margin_logits(cosine, labels, margin)


register(MarginSpec(
    name="x2_softmax", fn=x2_softmax, target_margin=_x2_margin,
    params=("scale", "a", "h", "k", "gradient"),
    preset=dict(scale=64.0, a=-0.9, h=0.0, k=0.65),
))


# ----------------------------------------------------------------------------
# NormFace
# ----------------------------------------------------------------------------


def _no_margin(cos_y: Array) -> Array:
    return cos_y


def _normface_margin(*, scale: float = 64.0) -> TargetMargin:
    """NormFace target: ``cos_y`` itself."""
    return TargetMargin(scale, _no_margin)


def normface(cosine: Array, labels: Array, *, scale: float = 64.0) -> Array:
    """Normalised softmax (NormFace): ``s cos theta_j`` for every j.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    cosine, _, _ = prepare(cosine, labels)
    return scale * cosine  # target_margin_logits of _normface_margin, without the no-op replace


_NORMFACE = MarginSpec(
    name="normface", fn=normface, target_margin=_normface_margin, params=("scale",),
    preset=dict(scale=64.0),
)
register(_NORMFACE)
register(MarginSpec(name="softmax", fn=normface, target_margin=_normface_margin, params=("scale",)))


# ----------------------------------------------------------------------------
# Combined margin, ArcFace, CosFace
# ----------------------------------------------------------------------------


def _combined_margin(
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
    gradient: CombinedGradient = "auto",
    floor: float = SIN_FLOOR,
) -> TargetMargin | None:
    """Combined-margin target ``cos(m1 arccos(cos_y) + m2) - m3``; None with inter-class filtering."""
    if interclass_filtering_threshold > 0:  # changes non-target logits: not target-only
        return None

    def target(cos_y: Array) -> Array:
        mode = ("straight_through" if m3 == 0 else "exact") if gradient == "auto" else gradient
        if mode == "straight_through":
            return straight_through(cos_y, jnp.cos(m1 * theta_of(cos_y) + m2) - m3)
        if mode == "exact":
            if m1 == 1.0 and m2 == 0.0:  # CosFace: no arccos, exact everywhere
                return cos_y - m3
            return jnp.cos(m1 * safe_arccos(cos_y, floor) + m2) - m3
        raise ValueError(
            f"gradient must be 'auto', 'straight_through' or 'exact', got {gradient!r}")

    return TargetMargin(scale, target)


def combined_margin(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
    gradient: CombinedGradient = "auto",
) -> Array:
    """insightface's combined margin: target logit ``s (cos(m1 theta_y + m2) - m3)``.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      m1: multiplicative angular margin (SphereFace-style).
      m2: additive angular margin (ArcFace).
      m3: additive cosine margin (CosFace).
      interclass_filtering_threshold: > 0 zeroes the non-target cosines above it
        (insightface's inter-class filtering).
      gradient: ``"auto"`` follows insightface: straight-through when the margin
        is purely angular (``m3 == 0``, computed there under ``no_grad``), the
        true gradient otherwise.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``, an unknown ``gradient``.
    """
    floor = sin_floor(cosine.dtype)
    kw = dict(scale=scale, m1=m1, m2=m2, m3=m3, gradient=gradient, floor=floor)
    margin = _combined_margin(interclass_filtering_threshold=interclass_filtering_threshold, **kw)
    if margin is not None:
        return target_margin_logits(cosine, labels, margin)
    cosine, target_mask, cos_y = prepare(cosine, labels)
    dirty = (cosine > interclass_filtering_threshold) & ~target_mask
    cosine = jnp.where(jax.lax.stop_gradient(dirty), 0.0, cosine)
    target = _combined_margin(**kw).target(cos_y)  # filtering leaves the target as it is
    return replace_target(cosine, target_mask, target, scale)


register(MarginSpec(
    name="combined_margin", fn=combined_margin, target_margin=_combined_margin,
    params=("scale", "m1", "m2", "m3", "interclass_filtering_threshold", "gradient"),
))


def _arcface_margin(*, scale: float = 64.0, margin: float = 0.5) -> TargetMargin:
    """ArcFace target ``cos(arccos(cos_y) + margin)``, straight-through."""
    return _combined_margin(scale=scale, m1=1.0, m2=margin, m3=0.0, gradient="auto")


def arcface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.5) -> Array:
    """ArcFace: target logit ``s cos(theta_y + m)``, straight-through gradient (insightface).

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      margin: m, radians.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    return target_margin_logits(cosine, labels, _arcface_margin(scale=scale, margin=margin))


register(MarginSpec(
    name="arcface", fn=arcface, target_margin=_arcface_margin, params=("scale", "margin"),
    preset=dict(scale=64.0, margin=0.5),
))


def _cosface_margin(*, scale: float = 64.0, margin: float = 0.35) -> TargetMargin:
    """CosFace target ``cos_y - margin``, true gradient."""
    return _combined_margin(scale=scale, m1=1.0, m2=0.0, m3=margin, gradient="auto")


def cosface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.35) -> Array:
    """CosFace (large-margin cosine): target logit ``s (cos_y - m)``, true gradient.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      margin: m.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    return target_margin_logits(cosine, labels, _cosface_margin(scale=scale, margin=margin))


register(MarginSpec(
    name="cosface", fn=cosface, target_margin=_cosface_margin, params=("scale", "margin"),
    preset=dict(scale=64.0, margin=0.35),
))


# ----------------------------------------------------------------------------
# SphereFace
# ----------------------------------------------------------------------------


def _sphereface_margin(
    *, scale: float = 64.0, margin: int = 4, lamb: float = 0.0, floor: float = SIN_FLOOR
) -> TargetMargin:
    """SphereFace target ``(lamb cos_y + psi(arccos cos_y)) / (1 + lamb)``; see :func:`sphereface`."""
    if int(margin) != margin or margin < 1:
        raise ValueError(f"sphereface margin must be a positive integer, got {margin!r}")

    def target(cos_y: Array) -> Array:
        theta = safe_arccos(cos_y, floor)
        k = jax.lax.stop_gradient(jnp.clip(jnp.floor(margin * theta / math.pi), 0, margin - 1))
        sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
        psi = sign * jnp.cos(margin * theta) - 2.0 * k
        return (lamb * cos_y + psi) / (1.0 + lamb)

    return TargetMargin(scale, target)


def sphereface(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    margin: int = 4,
    lamb: float = 0.0,
) -> Array:
    """SphereFace (A-Softmax): multiplicative angular margin on normalised features.

    Target logit ``s (lamb cos_y + psi(theta_y)) / (1 + lamb)`` with ``psi(theta) =
    (-1)^k cos(m theta) - 2k`` on ``[k pi/m, (k+1) pi/m]`` (the monotone extension
    of ``cos(m theta)``); lamb is the original annealing, 0 the pure margin. True
    gradient through ``arccos`` (``sin theta`` floored at :func:`sin_floor` of the
    cosine's dtype).

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      scale: s.
      margin: m, a positive integer.
      lamb: blend weight of ``cos_y``.

    Returns:
      (B, C) float32 logits.

    Raises:
      ValueError: concrete labels outside ``[0, C)``, a non-integer ``margin``.
    """
    margin_ = _sphereface_margin(scale=scale, margin=margin, lamb=lamb, floor=sin_floor(cosine.dtype))
    return target_margin_logits(cosine, labels, margin_)


register(MarginSpec(
    name="sphereface", fn=sphereface, target_margin=_sphereface_margin,
    params=("scale", "margin", "lamb"),
))
