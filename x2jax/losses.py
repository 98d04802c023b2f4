"""Margin losses for face recognition, as pure functions.

Every margin function has one contract::

    fn(cosine, labels, *, scale=..., <margin params>) -> logits

``cosine`` is ``(B, C)`` float (L2-normalised embeddings @ L2-normalised class
centres^T), ``labels`` is ``(B,)`` int, and the result is the scaled logits
``(B, C)`` in float32, ready for softmax cross-entropy. Only the target column
``labels[i]`` of each row is changed by the margin; every other column is
``scale * cosine``. Inputs of any float dtype (float32, bfloat16, float16) are
computed in float32; the floor of ``sin theta`` in true arccos gradients follows
the input dtype (:func:`sin_floor`), so float16 gradients stay finite at ±1.

Label range. Called with concrete labels (outside ``jit``), every margin
function and :func:`margin_loss` raise ``ValueError`` for a label outside
``[0, C)``. Under ``jit`` labels are traced and cannot raise: a row whose label
is outside ``[0, C)`` then gets no margin and contributes 0 to the loss (this
is also how a class-sharded head marks "target not in this block", as
insightface's Partial FC does with label -1). The training step reports such
rows with :func:`count_out_of_range` and stops the run; code that wants an
in-graph error wraps its function in ``jax.experimental.checkify`` and calls
:func:`checkify_labels`.

Stateful peers take their state as explicit arguments and never mutate it:
CurricularFace's running mean ``t`` and AdaFace's running norm statistics are
advanced with :func:`curricularface_update` / :func:`adaface_update`; ElasticFace
takes an ``rng``. :func:`initial_state` and :func:`update_state` give the
uniform view the training step uses.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array
MarginFn = Callable[..., Array]

# Floor of sin(theta) in the exact X2-Softmax gradient and in arccos gradients:
# keeps d f / d cos finite at theta -> pi (and at theta -> 0 when h != 0), where
# it is singular. Inputs coarser than float32 near +-1 get a larger floor, see
# sin_floor.
SIN_FLOOR = 1e-3
# Normalisation floor, as torch.nn.functional.normalize.
NORM_EPS = 1e-12

__all__ = [
    "NAMES",
    "adaface",
    "adaface_update",
    "arcface",
    "check_labels",
    "check_nonempty_batch",
    "checkify_labels",
    "clip_cosine",
    "combined_margin",
    "cosface",
    "count_out_of_range",
    "cross_entropy",
    "curricularface",
    "curricularface_update",
    "elasticface",
    "get",
    "initial_state",
    "l2_normalize",
    "margin_loss",
    "normface",
    "sin_floor",
    "sphereface",
    "update_state",
    "x2_softmax",
]


# ----------------------------------------------------------------------------
# Label checks
# ----------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(labels: Array | np.ndarray, num_classes: int, *, what: str = "labels") -> None:
    """Raise ``ValueError`` if concrete ``labels`` leave ``[0, num_classes)``.

    No-op for traced labels (inside ``jit``): see the module docstring.
    """
    if not _is_concrete(labels):
        return
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {values.dtype}")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        shown = ", ".join(f"{what}[{i}]={values.reshape(-1)[i]}" for i in bad[:5])
        raise ValueError(
            f"{bad.size} {what} out of range [0, {num_classes}): {shown}"
            + (" ..." if bad.size > 5 else "")
        )


def check_nonempty_batch(embeddings: Array, *, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the shape if ``embeddings`` has no rows.

    Shapes are static, so this also holds under ``jit``: a mean over a (0, D)
    batch would be NaN, and a zero-size batch is a bug upstream.
    """
    if embeddings.shape[0] == 0:
        raise ValueError(
            f"{where}: empty batch, embeddings shape {tuple(embeddings.shape)} (B = 0); "
            "the loss is a mean over the batch and needs B >= 1"
        )


def count_out_of_range(labels: Array, num_classes: int) -> Array:
    """Number of labels outside ``[0, num_classes)``; jit-safe (int32 scalar)."""
    return jnp.sum((labels < 0) | (labels >= num_classes)).astype(jnp.int32)


def checkify_labels(labels: Array, num_classes: int) -> None:
    """In-graph label check for code wrapped in ``checkify.checkify``."""
    checkify.check(
        jnp.all((labels >= 0) & (labels < num_classes)),
        "labels out of range [0, {n}): min {lo}, max {hi}",
        n=jnp.int32(num_classes),
        lo=jnp.min(labels),
        hi=jnp.max(labels),
    )


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------


def _prepare(cosine: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Validate shapes, cast to float32, clip to [-1, 1].

    Returns (cosine (B, C) f32, target mask (B, C) bool, target cosine (B,) f32).
    Rows whose label is outside [0, C) get an all-False mask and cos_y = 0.
    """
    chex.assert_rank(cosine, 2)
    chex.assert_rank(labels, 1)
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([cosine, labels], 1)
    num_classes = cosine.shape[1]
    check_labels(labels, num_classes)
    cosine = clip_cosine(cosine.astype(jnp.float32))
    target_mask = labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]
    cos_y = jnp.sum(jnp.where(target_mask, cosine, 0.0), axis=1)
    return cosine, target_mask, cos_y


def sin_floor(dtype: Any) -> float:
    """Floor of ``sin theta`` in the true gradients for a cosine of ``dtype``.

    ``max(SIN_FLOOR, sin theta)`` at the representable cosine nearest ±1
    (``1 - finfo(dtype).epsneg``). Where that exceeds SIN_FLOOR (float16,
    bfloat16) it binds only at exactly ±1, whose gradient is then within ~1 % of
    the one at the representable neighbour. float32 (and float64): SIN_FLOOR;
    float16: ~2^-5 (the exact X2
    gradient at cos = -1, scale 64, is then ~1.2e4 instead of 3.6e5, which
    exceeds float16's max 65504 and would make the float16 cotangent inf);
    bfloat16: ~2^-3.5.

    Args:
      dtype: dtype of the cosine as passed in (before the float32 cast).

    Returns:
      The floor, a Python float.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return SIN_FLOOR
    epsneg = float(jnp.finfo(dtype).epsneg)
    return max(SIN_FLOOR, math.sqrt(2.0 * epsneg - epsneg * epsneg))


def clip_cosine(cosine: Array) -> Array:
    """Clip to [-1, 1] with gradient 1 everywhere (rounding above 1 must not zero it)."""
    return cosine + jax.lax.stop_gradient(jnp.clip(cosine, -1.0, 1.0) - cosine)


def _replace_target(cosine: Array, target_mask: Array, target: Array, scale: float) -> Array:
    """``scale * cosine`` with column ``labels[i]`` of row i set to ``scale * target[i]``."""
    return scale * jnp.where(target_mask, target[:, None], cosine)


class _TargetMargin(NamedTuple):
    """A margin that changes only the target logit ("target-only").

    Logits: ``scale * target(cos_y)`` in column ``labels[i]`` of row i, ``scale *
    nontarget(cos_j)`` elsewhere, with ``nontarget`` the [-1, 1] clip of
    :func:`clip_cosine` followed, when ``clip = (lo, hi)``, by ``jnp.clip(., lo, hi)``
    (AdaFace). ``target`` is row-wise: ``(B,)`` clipped ``cos_y`` float32 ->
    ``(B,)`` target in cosine units, row i depending on ``cos_y[i]`` only. The
    public margin function builds its (B, C) logits from it
    (:func:`_target_margin_logits`) and :func:`margin_loss` its fused
    cross-entropy (:func:`_target_margin_cross_entropy`).
    """

    scale: float | Array
    target: Callable[[Array], Array]
    clip: tuple[float | Array, float | Array] | None = None


def _target_margin_logits(cosine: Array, labels: Array, margin: _TargetMargin) -> Array:
    """(B, C) float32 logits of a target-only margin from cosine (B, C), labels (B,)."""
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    target = margin.target(cos_y)
    if margin.clip is not None:
        cosine = jnp.clip(cosine, *margin.clip)
    return _replace_target(cosine, target_mask, target, margin.scale)


def _straight_through(cos_y: Array, target: Array) -> Array:
    """Value ``target``, gradient as if it were ``cos_y`` (insightface's no_grad pattern)."""
    return cos_y + jax.lax.stop_gradient(target - cos_y)


def _theta(cos: Array) -> Array:
    """``arccos`` of an already clipped cosine (value only; callers own the gradient)."""
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def safe_arccos(cos: Array, floor: float = SIN_FLOOR) -> Array:
    """``arccos`` on [-1, 1] with the derivative ``-1 / max(sin theta, floor)``."""
    return _safe_arccos(cos, float(floor))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _safe_arccos(cos: Array, floor: float) -> Array:
    return _theta(cos)


@_safe_arccos.defjvp
def _safe_arccos_jvp(floor, primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = _theta(cos)
    return theta, -dcos / jnp.maximum(jnp.sin(theta), floor)


# ----------------------------------------------------------------------------
# X2-Softmax
# ----------------------------------------------------------------------------


def _x2_value(theta: Array, a: float, h: float, k: float) -> Array:
    return a * (theta - h) ** 2 + k


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _x2_exact(cos: Array, a: float, h: float, k: float, floor: float) -> Array:
    return _x2_value(_theta(cos), a, h, k)


@_x2_exact.defjvp
def _x2_exact_jvp(a, h, k, floor, primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = _theta(cos)
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


def _x2_target(
    cos_y: Array,
    *,
    a: float,
    h: float,
    k: float,
    gradient: Literal["straight_through", "exact"],
    floor: float = SIN_FLOOR,
) -> Array:
    """X2 target ``a (arccos(cos_y) - h)^2 + k``, (B,) -> (B,); see :func:`x2_softmax`."""
    if gradient == "straight_through":
        return _straight_through(cos_y, _x2_value(_theta(cos_y), a, h, k))
    if gradient == "exact":
        return _x2_exact(cos_y, float(a), float(h), float(k), float(floor))
    raise ValueError(f"gradient must be 'straight_through' or 'exact', got {gradient!r}")


def _x2_margin(*, scale, a, h, k, gradient, floor=SIN_FLOOR) -> _TargetMargin:
    return _TargetMargin(
        scale, functools.partial(_x2_target, a=a, h=h, k=k, gradient=gradient, floor=floor)
    )


def x2_softmax(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    a: float = -0.9,
    h: float = 0.0,
    k: float = 0.65,
    gradient: Literal["straight_through", "exact"] = "straight_through",
) -> Array:
    """X2-Softmax logits (arXiv 2312.05281): quadratic target logit in the angle.

    ``theta_y = arccos(cos_y)``, target logit ``f(theta_y) = a (theta_y - h)^2 + k``,
    others ``cos theta_j``; all times ``scale``. Official constants: s=64, a=-0.9,
    h=0, k=0.65 (``f(0)=0.65``, ``f(pi/2)=-1.571``, ``f(pi)=-8.233``).

    gradient="straight_through" (official code, in-place under ``no_grad``): the
    gradient reaching ``cos_y`` is that of ``scale * cos_y``, evaluated at the X2
    probabilities. gradient="exact": ``d f/d cos = -2a (theta - h) / sin theta``,
    finite everywhere (exact limit ``-2a`` at theta -> 0 when h = 0; ``sin theta``
    floored at :func:`sin_floor` of the cosine's dtype otherwise).

    Shapes: cosine (B, C) float, labels (B,) int -> (B, C) float32.
    """
    margin = _x2_margin(
        scale=scale, a=a, h=h, k=k, gradient=gradient, floor=sin_floor(cosine.dtype)
    )
    return _target_margin_logits(cosine, labels, margin)


# ----------------------------------------------------------------------------
# Baselines: NormFace, CosFace, ArcFace, SphereFace, combined margin
# ----------------------------------------------------------------------------


def _no_margin(cos_y: Array) -> Array:
    """NormFace target: ``cos_y`` itself, (B,) -> (B,)."""
    return cos_y


def _normface_margin(*, scale) -> _TargetMargin:
    return _TargetMargin(scale, _no_margin)


def normface(cosine: Array, labels: Array, *, scale: float = 64.0) -> Array:
    """Plain normalised softmax (NormFace): ``scale * cos theta_j`` for all j.

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    cosine, _, _ = _prepare(cosine, labels)
    return scale * cosine  # _target_margin_logits with _no_margin, without the no-op replace


def _combined_target(
    cos_y: Array,
    *,
    m1: float,
    m2: float,
    m3: float,
    gradient: Literal["auto", "straight_through", "exact"],
    floor: float = SIN_FLOOR,
) -> Array:
    """Combined-margin target ``cos(m1 arccos(cos_y) + m2) - m3``, (B,) -> (B,)."""
    if gradient == "auto":
        gradient = "straight_through" if m3 == 0 else "exact"
    if gradient == "straight_through":
        return _straight_through(cos_y, jnp.cos(m1 * _theta(cos_y) + m2) - m3)
    if gradient == "exact":
        if m1 == 1.0 and m2 == 0.0:  # CosFace: no arccos, exact everywhere
            return cos_y - m3
        return jnp.cos(m1 * safe_arccos(cos_y, floor) + m2) - m3
    raise ValueError(f"gradient must be 'auto', 'straight_through' or 'exact', got {gradient!r}")


def _combined_margin(
    *, scale, m1, m2, m3, interclass_filtering_threshold, gradient, floor=SIN_FLOOR
) -> _TargetMargin | None:
    if interclass_filtering_threshold > 0:  # changes non-target logits: not target-only
        return None
    target = functools.partial(
        _combined_target, m1=m1, m2=m2, m3=m3, gradient=gradient, floor=floor
    )
    return _TargetMargin(scale, target)


def combined_margin(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
    gradient: Literal["auto", "straight_through", "exact"] = "auto",
) -> Array:
    """insightface's combined margin: target ``cos(m1 * theta_y + m2) - m3``.

    gradient="auto" follows insightface: straight-through when the margin is
    purely angular (``m3 == 0``, ArcFace/SphereFace-style, computed there under
    ``no_grad``), the true gradient otherwise (CosFace's ``cos_y - m3``).
    ``interclass_filtering_threshold > 0`` zeroes non-target cosines above it
    (insightface's inter-class filtering).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    floor = sin_floor(cosine.dtype)
    margin = _combined_margin(
        scale=scale, m1=m1, m2=m2, m3=m3,
        interclass_filtering_threshold=interclass_filtering_threshold, gradient=gradient,
        floor=floor,
    )
    if margin is not None:
        return _target_margin_logits(cosine, labels, margin)
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    dirty = (cosine > interclass_filtering_threshold) & ~target_mask
    cosine = jnp.where(jax.lax.stop_gradient(dirty), 0.0, cosine)
    target = _combined_target(cos_y, m1=m1, m2=m2, m3=m3, gradient=gradient, floor=floor)
    return _replace_target(cosine, target_mask, target, scale)


def _arcface_margin(*, scale, margin) -> _TargetMargin:
    return _combined_margin(
        scale=scale, m1=1.0, m2=margin, m3=0.0, interclass_filtering_threshold=0.0, gradient="auto"
    )


def arcface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.5) -> Array:
    """ArcFace: target ``cos(theta_y + margin)``, straight-through gradient (insightface).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    return _target_margin_logits(cosine, labels, _arcface_margin(scale=scale, margin=margin))


def _cosface_margin(*, scale, margin) -> _TargetMargin:
    return _combined_margin(
        scale=scale, m1=1.0, m2=0.0, m3=margin, interclass_filtering_threshold=0.0, gradient="auto"
    )


def cosface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.35) -> Array:
    """CosFace (large-margin cosine): target ``cos_y - margin``, true gradient.

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    return _target_margin_logits(cosine, labels, _cosface_margin(scale=scale, margin=margin))


def _sphereface_target(cos_y: Array, *, margin: int, lamb: float, floor: float = SIN_FLOOR) -> Array:
    """SphereFace target ``(lamb cos_y + psi(arccos cos_y)) / (1 + lamb)``, (B,) -> (B,)."""
    theta = safe_arccos(cos_y, floor)
    k = jax.lax.stop_gradient(jnp.clip(jnp.floor(margin * theta / math.pi), 0, margin - 1))
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    psi = sign * jnp.cos(margin * theta) - 2.0 * k
    return (lamb * cos_y + psi) / (1.0 + lamb)


def _sphereface_margin(*, scale, margin, lamb, floor=SIN_FLOOR) -> _TargetMargin:
    if int(margin) != margin or margin < 1:
        raise ValueError(f"sphereface margin must be a positive integer, got {margin!r}")
    target = functools.partial(_sphereface_target, margin=margin, lamb=lamb, floor=floor)
    return _TargetMargin(scale, target)


def sphereface(
    cosine: Array,
    labels: Array,
    *,
    scale: float = 64.0,
    margin: int = 4,
    lamb: float = 0.0,
) -> Array:
    """SphereFace (A-Softmax) multiplicative angular margin on normalised features.

    ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta in [k pi/m, (k+1) pi/m]``
    (monotone extension of ``cos(m theta)``), blended as ``(lamb cos + psi)/(1 + lamb)``
    (the original annealing; lamb=0 is the pure margin). True gradient through
    ``arccos`` (``sin theta`` floored at :func:`sin_floor` of the cosine's dtype).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    margin_ = _sphereface_margin(scale=scale, margin=margin, lamb=lamb, floor=sin_floor(cosine.dtype))
    return _target_margin_logits(cosine, labels, margin_)


# ----------------------------------------------------------------------------
# Adaptive-margin peers: CurricularFace, AdaFace, ElasticFace
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

    Target ``cos(theta_y + m)`` where ``cos_y > cos(pi - m)``, else
    ``cos_y - m sin(pi - m)``. Hard negatives (``cos_j > cos(theta_y + m)``) become
    ``cos_j (t + cos_j)``; ``t`` is the running mean of ``cos_y`` from
    :func:`curricularface_update`. True gradient (t and the hard mask are constants).
    The official code advances ``t`` just before using it; the training step
    advances it after the step, a one-step lag that momentum 0.01 makes negligible.
    Not target-only (the hard negatives depend on ``cos_y``): :func:`margin_loss`
    takes the generic path.

    Shapes: cosine (B, C), labels (B,), t scalar -> (B, C) float32.
    """
    floor = sin_floor(cosine.dtype)
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
    cos_y_m = jnp.cos(safe_arccos(cos_y, floor) + margin)
    target = jnp.where(
        cos_y > math.cos(math.pi - margin), cos_y_m, cos_y - math.sin(math.pi - margin) * margin
    )
    hard = jax.lax.stop_gradient(cosine > cos_y_m[:, None]) & ~target_mask
    cosine = jnp.where(hard, cosine * (t + cosine), cosine)
    return _replace_target(cosine, target_mask, target, scale)


def curricularface_update(t: Array, target_cosine: Array, *, momentum: float = 0.01) -> Array:
    """``t <- momentum * mean(cos_y) + (1 - momentum) * t`` (official: 0.01); cos_y (B,)."""
    cos_y = clip_cosine(target_cosine.astype(jnp.float32))
    return jax.lax.stop_gradient(momentum * jnp.mean(cos_y) + (1.0 - momentum) * t)


def _adaface_target(
    cos_y: Array,
    *,
    norms: Array,
    margin: float,
    h: float,
    batch_mean: Array | float,
    batch_std: Array | float,
    eps: float,
) -> Array:
    """AdaFace target ``cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z)``, (B,) -> (B,).

    ``theta_y = arccos(clip(cos_y, -1 + eps, 1 - eps))``; ``z`` (B,) from ``norms`` (B,).
    """
    chex.assert_shape(norms, cos_y.shape)
    cos_y = jnp.clip(cos_y, -1.0 + eps, 1.0 - eps)
    safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32), 0.001, 100.0))
    z = (safe_norms - batch_mean) / (batch_std + eps)
    z = jax.lax.stop_gradient(jnp.clip(z * h, -1.0, 1.0))
    theta = jnp.arccos(cos_y)
    theta_m = jnp.clip(theta - margin * z, eps, math.pi - eps)
    return jnp.cos(theta_m) - (margin + margin * z)


def _adaface_margin(*, norms, scale, margin, h, batch_mean, batch_std, eps) -> _TargetMargin:
    target = functools.partial(
        _adaface_target, norms=norms, margin=margin, h=h,
        batch_mean=batch_mean, batch_std=batch_std, eps=eps,
    )
    return _TargetMargin(scale, target, clip=(-1.0 + eps, 1.0 - eps))


def adaface(
    cosine: Array,
    labels: Array,
    *,
    norms: Array,
    scale: float = 64.0,
    margin: float = 0.4,
    h: float = 0.333,
    batch_mean: Array | float = 20.0,
    batch_std: Array | float = 100.0,
    eps: float = 1e-3,
) -> Array:
    """AdaFace (Kim et al., CVPR 2022), following the official code.

    With ``z = clip(h (||x|| - mean) / (std + eps), -1, 1)`` (feature norms
    detached; ``mean``/``std`` the running statistics from :func:`adaface_update`):
    target ``cos(clip(theta_y - m z, eps, pi - eps)) - (m + m z)``, true gradient.
    All cosines are clipped to ``[-1 + eps, 1 - eps]`` first (true clip gradient).

    Shapes: cosine (B, C), labels (B,), norms (B,) -> (B, C) float32.
    """
    return _target_margin_logits(cosine, labels, _adaface_margin(
        norms=norms, scale=scale, margin=margin, h=h,
        batch_mean=batch_mean, batch_std=batch_std, eps=eps,
    ))


def adaface_update(
    batch_mean: Array, batch_std: Array, norms: Array, *, t_alpha: float = 0.01
) -> tuple[Array, Array]:
    """Running feature-norm statistics of AdaFace (EMA with ``t_alpha``, official 0.01)."""
    safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32), 0.001, 100.0))
    mean = jnp.mean(safe_norms)
    std = jnp.std(safe_norms, ddof=1) if safe_norms.shape[0] > 1 else jnp.float32(0.0)
    return (
        t_alpha * mean + (1.0 - t_alpha) * batch_mean,
        t_alpha * std + (1.0 - t_alpha) * batch_std,
    )


def _elasticface_target(
    cos_y: Array, *, rng: Array, margin: float, sigma: float, floor: float = SIN_FLOOR
) -> Array:
    """ElasticFace-Arc target ``cos(arccos(cos_y) + m_i)``, ``m_i ~ N(margin, sigma)``, (B,) -> (B,)."""
    m = margin + sigma * jax.random.normal(rng, cos_y.shape, jnp.float32)
    return jnp.cos(safe_arccos(cos_y, floor) + m)


def _elasticface_margin(*, rng, scale, margin, sigma, floor=SIN_FLOOR) -> _TargetMargin:
    target = functools.partial(
        _elasticface_target, rng=rng, margin=margin, sigma=sigma, floor=floor
    )
    return _TargetMargin(scale, target)


def elasticface(
    cosine: Array,
    labels: Array,
    *,
    rng: Array,
    scale: float = 64.0,
    margin: float = 0.5,
    sigma: float = 0.05,
) -> Array:
    """ElasticFace-Arc (Boutros et al., CVPRW 2022): ``cos(theta_y + m_i)``, ``m_i ~ N(m, sigma)``.

    One margin per sample drawn from ``rng``; true gradient through ``arccos`` as in
    the official code (``sin theta`` floored at :func:`sin_floor` of the cosine's dtype).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    margin_ = _elasticface_margin(
        rng=rng, scale=scale, margin=margin, sigma=sigma, floor=sin_floor(cosine.dtype)
    )
    return _target_margin_logits(cosine, labels, margin_)


# ----------------------------------------------------------------------------
# Registry and state
# ----------------------------------------------------------------------------

_REGISTRY: dict[str, MarginFn] = {
    "x2_softmax": x2_softmax,
    "normface": normface,
    "softmax": normface,
    "cosface": cosface,
    "arcface": arcface,
    "sphereface": sphereface,
    "combined_margin": combined_margin,
    "curricularface": curricularface,
    "adaface": adaface,
    "elasticface": elasticface,
}
NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def get(name: str) -> MarginFn:
    """Margin function by name (``x2jax.losses.NAMES``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(NAMES)}") from None


def initial_state(name: str) -> dict[str, Array]:
    """Initial loss state (keyword arguments of the margin function), {} if stateless."""
    if name == "curricularface":
        return {"t": jnp.zeros((), jnp.float32)}
    if name == "adaface":
        return {"batch_mean": jnp.full((), 20.0, jnp.float32), "batch_std": jnp.full((), 100.0, jnp.float32)}
    get(name)
    return {}


def update_state(
    name: str, state: dict[str, Array], *, target_cosine: Array, norms: Array
) -> dict[str, Array]:
    """Advance the loss state after a step (official EMA rules); identity if stateless.

    target_cosine: (B,) ``cos_y`` of the batch; norms: (B,) embedding norms.
    """
    if name == "curricularface":
        return {"t": curricularface_update(state["t"], target_cosine)}
    if name == "adaface":
        mean, std = adaface_update(state["batch_mean"], state["batch_std"], norms)
        return {"batch_mean": mean, "batch_std": std}
    return state


def _accepts(fn: MarginFn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# Target-only margins: public margin function -> builder of its _TargetMargin from
# the function's keyword arguments (None where those make it not target-only).
# CurricularFace changes non-target logits and has no entry.
_TARGET_MARGINS: tuple[tuple[MarginFn, Callable[..., _TargetMargin | None]], ...] = (
    (x2_softmax, _x2_margin),
    (normface, _normface_margin),
    (arcface, _arcface_margin),
    (cosface, _cosface_margin),
    (combined_margin, _combined_margin),
    (sphereface, _sphereface_margin),
    (adaface, _adaface_margin),
    (elasticface, _elasticface_margin),
)


def _target_margin(margin_fn: MarginFn, params: dict[str, Any]) -> _TargetMargin | None:
    """``margin_fn(., ., **params)`` as a :class:`_TargetMargin`; None: not target-only.

    Only the registry's own functions (by identity) qualify; their defaults fill
    the parameters not in ``params`` (a bad keyword raises ``TypeError`` as a call would).
    """
    build = next((b for fn, b in _TARGET_MARGINS if fn is margin_fn), None)
    if build is None:
        return None
    bound = inspect.signature(margin_fn).bind(None, None, **params)
    bound.apply_defaults()
    kwargs = dict(bound.arguments)
    del kwargs["cosine"], kwargs["labels"]
    return build(**kwargs)


# ----------------------------------------------------------------------------
# Normalisation, cross-entropy, the full head loss
# ----------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int = -1, eps: float = NORM_EPS) -> Array:
    """``x / max(||x||, eps)`` with finite gradients at ``x = 0`` (float32)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-row softmax cross-entropy ``logsumexp(z) - z_y`` (B,), float32.

    Built on a one-hot mask, not a gather: a traced label outside [0, C) gives 0
    instead of silently reading a clipped column.
    """
    logits = logits.astype(jnp.float32)
    target_mask = labels[:, None] == jnp.arange(logits.shape[1], dtype=labels.dtype)[None, :]
    z_y = jnp.sum(jnp.where(target_mask, logits, 0.0), axis=1)
    in_range = jnp.any(target_mask, axis=1)
    return jnp.where(in_range, jax.nn.logsumexp(logits, axis=1) - z_y, 0.0)


def _target_logits(
    cosine: Array, labels: Array, target: Array, scale: Array, clip: tuple[Array, Array] | None
) -> tuple[Array, Array, Array]:
    """``scale * where(target column, target, nontarget(cosine))``: logits (B, C), mask, nontarget."""
    target_mask = labels[:, None] == jnp.arange(cosine.shape[1], dtype=labels.dtype)[None, :]
    nontarget = jnp.clip(cosine, -1.0, 1.0)
    if clip is not None:
        nontarget = jnp.clip(nontarget, *clip)
    return scale * jnp.where(target_mask, target[:, None], nontarget), target_mask, nontarget


@jax.custom_vjp
def _target_ce(
    cosine: Array,
    labels: Array,
    target: Array,
    dtarget: Array,
    scale: Array,
    clip: tuple[Array, Array] | None,
) -> Array:
    """Per-row cross-entropy of a target-only margin: a logsumexp forward, one-pass backward.

    ``z = scale * nontarget(cosine)`` with column ``labels[i]`` set to ``scale *
    target[i]``; returns ``logsumexp(z) - scale * target`` (B,), 0 where
    ``labels[i] == -1``. The backward is one elementwise pass over (B, C):
    ``dcos = g s p_j nontarget'(cos_j)`` off target and ``g s (p_y - 1) dtarget``
    on it (``dtarget`` (B,) = d target / d cos_y: the target's dependence on the
    cosine enters here, not through ``target``, which must not depend on ``cosine``).
    ``target`` and ``scale`` get their true cotangents; ``dtarget`` gets 0 (it
    only shapes the gradient).

    Shapes: cosine (B, C) f32, labels (B,) int in [0, C) or -1, target, dtarget
    (B,) f32, scale () f32, clip None or (lo, hi) f32 scalars -> (B,) f32.
    """
    return _target_ce_fwd(cosine, labels, target, dtarget, scale, clip)[0]


def _target_ce_fwd(cosine, labels, target, dtarget, scale, clip):
    z, _, _ = _target_logits(cosine, labels, target, scale, clip)
    # Softmax relative to the row maximum, as jax.nn.logsumexp and its gradient:
    # p = exp(z - m) / sumexp keeps 1 - p_y accurate when p_y ~ 1 (exp(z - lse)
    # would round lse at the magnitude of z).
    m = jnp.max(z, axis=1)
    sumexp = jnp.sum(jnp.exp(z - m[:, None]), axis=1)
    ce = jnp.where(labels >= 0, jnp.log(sumexp) + (m - scale * target), 0.0)
    return ce, (cosine, labels, target, dtarget, scale, clip, m, sumexp)


def _target_ce_bwd(res, g):
    cosine, labels, target, dtarget, scale, clip, m, sumexp = res
    g = jnp.where(labels >= 0, g, 0.0)
    z, target_mask, nontarget = _target_logits(cosine, labels, target, scale, clip)
    p = jnp.exp(z - m[:, None]) * (1.0 / sumexp)[:, None]
    gs = (g * scale)[:, None]
    dnontarget = jnp.where(target_mask, 0.0, gs * p)
    if clip is None:  # clip_cosine: value clipped to [-1, 1], derivative 1
        dcos, dclip = dnontarget, None
    else:  # then jnp.clip(., lo, hi) (AdaFace): jnp.clip's own derivative
        _, clip_vjp = jax.vjp(jnp.clip, jnp.clip(cosine, -1.0, 1.0), *clip)
        dcos, *dclip = clip_vjp(dnontarget)
        dclip = tuple(dclip)
    dcos = jnp.where(target_mask, gs * (p - 1.0) * dtarget[:, None], dcos)
    # Unused cotangents (target, scale, clip not differentiated) are dead code under jit.
    target_bar = g * scale * (jnp.exp(scale * target - m) / sumexp - 1.0)
    logits_over_scale = jnp.where(target_mask, target[:, None], nontarget)
    dscale = jnp.sum(g[:, None] * p * logits_over_scale) - jnp.sum(g * target)
    return dcos, None, target_bar, None, dscale, dclip


_target_ce.defvjp(_target_ce_fwd, _target_ce_bwd)


def _target_margin_cross_entropy(cosine: Array, labels: Array, margin: _TargetMargin) -> Array:
    """Per-row cross-entropy (B,) of ``_target_margin_logits(cosine, labels, margin)``, fused.

    Equal (to float32 rounding) in value and gradient to ``cross_entropy`` of those
    logits, without their (B, C) mask, replace and target-sum passes: ``cos_y`` by
    a gather (a label outside [0, C) reads column 0, whose value is then masked
    out: such rows give 0 and zero gradient), the target and its derivative
    ``d target / d cos_y`` by one ``jax.jvp`` of the row-wise ``margin.target``
    on (B,), then :func:`_target_ce`.

    Shapes: cosine (B, C) float, labels (B,) int -> (B,) float32.
    """
    chex.assert_rank([cosine, labels], [2, 1])
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([cosine, labels], 1)
    num_classes = cosine.shape[1]
    check_labels(labels, num_classes)
    cosine = cosine.astype(jnp.float32)
    labels = jnp.where((labels >= 0) & (labels < num_classes), labels, -1)
    cos_y = jnp.take_along_axis(cosine, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    cos_y = jax.lax.stop_gradient(jnp.clip(cos_y, -1.0, 1.0))
    target, dtarget = jax.jvp(margin.target, (cos_y,), (jnp.ones_like(cos_y),))
    clip = None if margin.clip is None else tuple(jnp.asarray(b, jnp.float32) for b in margin.clip)
    scale = jnp.asarray(margin.scale, jnp.float32)
    return _target_ce(cosine, labels, target.astype(jnp.float32), dtarget.astype(jnp.float32), scale, clip)


def target_only_logits(
    margin_fn: MarginFn, params: dict[str, Any]
) -> tuple[Callable[[Array], Array], Callable[[Array], Array]] | None:
    """The two halves of a target-only margin's logits, for heads that split them.

    Returns ``(nontarget, target)``: ``nontarget(cosine)`` (B, C) -> (B, C) float32,
    the logits of every column as a non-target; ``target(cos_y)`` (B,) -> (B,)
    float32, the target logits from the target cosines. Together they equal
    ``margin_fn(cosine, labels, **params)`` (same clips, same gradients); None when
    ``margin_fn`` is not a target-only margin of the registry (CurricularFace,
    inter-class filtering, user functions). ``x2jax.parallel``'s sharded head uses it.
    """
    margin = _target_margin(margin_fn, dict(params))
    if margin is None:
        return None

    def nontarget(cosine: Array) -> Array:
        cosine = clip_cosine(cosine.astype(jnp.float32))
        if margin.clip is not None:
            cosine = jnp.clip(cosine, *margin.clip)
        return margin.scale * cosine

    def target(cos_y: Array) -> Array:
        return margin.scale * margin.target(clip_cosine(cos_y.astype(jnp.float32)))

    return nontarget, target


def margin_loss(
    embeddings: Array,
    weight: Array,
    labels: Array,
    margin_fn: MarginFn | str,
    *,
    precision: jax.lax.PrecisionLike = None,
    **params: Any,
) -> Array:
    """Mean margin-softmax cross-entropy of a (single-device) classification head.

    ``cosine = normalize(embeddings) @ normalize(weight)^T``, ``logits =
    margin_fn(cosine, labels, **params)``, loss = mean over the batch of
    ``logsumexp(logits) - logits_y``. All in float32 whatever the input dtype.
    ``margin_fn`` may be a registry name. Functions that take ``norms`` (AdaFace)
    receive the embedding norms.

    Target-only margins of the registry (all but CurricularFace and a combined
    margin with inter-class filtering) take a fused path with the same value and
    gradients: the cross-entropy is computed from the cosine and the per-row
    target logit in one (B, C) pass forward and one backward
    (:func:`_target_margin_cross_entropy`). Other functions, user-supplied ones
    included, get the generic ``cross_entropy(margin_fn(cosine, labels, **params))``.

    Shapes: embeddings (B, D), weight (C, D) (insightface layout), labels (B,) int
    -> scalar float32. ``B = 0`` raises ``ValueError`` (the batch mean is undefined).
    """
    if isinstance(margin_fn, str):
        margin_fn = get(margin_fn)
    chex.assert_rank([embeddings, weight, labels], [2, 2, 1])
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([embeddings, labels], 1)
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} does not match weight (C, D)={weight.shape}"
        )
    check_nonempty_batch(embeddings, where="margin_loss")
    check_labels(labels, weight.shape[0])
    if _accepts(margin_fn, "norms") and "norms" not in params:
        params["norms"] = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=1)
    margin = _target_margin(margin_fn, params)
    cosine = jnp.matmul(l2_normalize(embeddings), l2_normalize(weight).T, precision=precision)
    if margin is not None:
        return jnp.mean(_target_margin_cross_entropy(cosine, labels, margin))
    return jnp.mean(cross_entropy(margin_fn(cosine, labels, **params), labels))
