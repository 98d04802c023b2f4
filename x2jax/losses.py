"""Margin losses for face recognition, as pure functions.

Every margin function has one contract::

    fn(cosine, labels, *, scale=..., <margin params>) -> logits

``cosine`` is ``(B, C)`` float (L2-normalised embeddings @ L2-normalised class
centres^T), ``labels`` is ``(B,)`` int, and the result is the scaled logits
``(B, C)`` in float32, ready for softmax cross-entropy. Only the target column
``labels[i]`` of each row is changed by the margin; every other column is
``scale * cosine``. Inputs of any float dtype (float32, bfloat16, float16) are
computed in float32.

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
from typing import Any, Callable, Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array
MarginFn = Callable[..., Array]

# Floor of sin(theta) in the exact X2-Softmax gradient: keeps d f / d cos finite
# at theta -> pi (and at theta -> 0 when h != 0), where it is singular.
SIN_FLOOR = 1e-3
# Normalisation floor, as torch.nn.functional.normalize.
NORM_EPS = 1e-12

__all__ = [
    "NAMES",
    "adaface",
    "adaface_update",
    "arcface",
    "check_labels",
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


def clip_cosine(cosine: Array) -> Array:
    """Clip to [-1, 1] with gradient 1 everywhere (rounding above 1 must not zero it)."""
    return cosine + jax.lax.stop_gradient(jnp.clip(cosine, -1.0, 1.0) - cosine)


def _replace_target(cosine: Array, target_mask: Array, target: Array, scale: float) -> Array:
    """``scale * cosine`` with column ``labels[i]`` of row i set to ``scale * target[i]``."""
    return scale * jnp.where(target_mask, target[:, None], cosine)


def _straight_through(cos_y: Array, target: Array) -> Array:
    """Value ``target``, gradient as if it were ``cos_y`` (insightface's no_grad pattern)."""
    return cos_y + jax.lax.stop_gradient(target - cos_y)


def _theta(cos: Array) -> Array:
    """``arccos`` of an already clipped cosine (value only; callers own the gradient)."""
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


@jax.custom_jvp
def safe_arccos(cos: Array) -> Array:
    """``arccos`` on [-1, 1] with the derivative ``-1 / max(sin theta, SIN_FLOOR)``."""
    return _theta(cos)


@safe_arccos.defjvp
def _safe_arccos_jvp(primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = _theta(cos)
    return theta, -dcos / jnp.maximum(jnp.sin(theta), SIN_FLOOR)


# ----------------------------------------------------------------------------
# X2-Softmax
# ----------------------------------------------------------------------------


def _x2_value(theta: Array, a: float, h: float, k: float) -> Array:
    return a * (theta - h) ** 2 + k


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _x2_exact(cos: Array, a: float, h: float, k: float) -> Array:
    return _x2_value(_theta(cos), a, h, k)


@_x2_exact.defjvp
def _x2_exact_jvp(a, h, k, primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = _theta(cos)
    sin = jnp.maximum(jnp.sin(theta), SIN_FLOOR)
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
    floored at ``SIN_FLOOR`` otherwise).

    Shapes: cosine (B, C) float, labels (B,) int -> (B, C) float32.
    """
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    if gradient == "straight_through":
        target = _straight_through(cos_y, _x2_value(_theta(cos_y), a, h, k))
    elif gradient == "exact":
        target = _x2_exact(cos_y, float(a), float(h), float(k))
    else:
        raise ValueError(f"gradient must be 'straight_through' or 'exact', got {gradient!r}")
    return _replace_target(cosine, target_mask, target, scale)


# ----------------------------------------------------------------------------
# Baselines: NormFace, CosFace, ArcFace, SphereFace, combined margin
# ----------------------------------------------------------------------------


def normface(cosine: Array, labels: Array, *, scale: float = 64.0) -> Array:
    """Plain normalised softmax (NormFace): ``scale * cos theta_j`` for all j.

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    cosine, _, _ = _prepare(cosine, labels)
    return scale * cosine


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
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    if interclass_filtering_threshold > 0:
        dirty = (cosine > interclass_filtering_threshold) & ~target_mask
        cosine = jnp.where(jax.lax.stop_gradient(dirty), 0.0, cosine)
    if gradient == "auto":
        gradient = "straight_through" if m3 == 0 else "exact"
    if gradient == "straight_through":
        target = _straight_through(cos_y, jnp.cos(m1 * _theta(cos_y) + m2) - m3)
    elif gradient == "exact":
        if m1 == 1.0 and m2 == 0.0:  # CosFace: no arccos, exact everywhere
            target = cos_y - m3
        else:
            target = jnp.cos(m1 * safe_arccos(cos_y) + m2) - m3
    else:
        raise ValueError(f"gradient must be 'auto', 'straight_through' or 'exact', got {gradient!r}")
    return _replace_target(cosine, target_mask, target, scale)


def arcface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.5) -> Array:
    """ArcFace: target ``cos(theta_y + margin)``, straight-through gradient (insightface).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    return combined_margin(cosine, labels, scale=scale, m1=1.0, m2=margin, m3=0.0)


def cosface(cosine: Array, labels: Array, *, scale: float = 64.0, margin: float = 0.35) -> Array:
    """CosFace (large-margin cosine): target ``cos_y - margin``, true gradient.

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    return combined_margin(cosine, labels, scale=scale, m1=1.0, m2=0.0, m3=margin)


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
    ``arccos`` (``sin theta`` floored at ``SIN_FLOOR``).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    if int(margin) != margin or margin < 1:
        raise ValueError(f"sphereface margin must be a positive integer, got {margin!r}")
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    theta = safe_arccos(cos_y)
    k = jax.lax.stop_gradient(jnp.clip(jnp.floor(margin * theta / math.pi), 0, margin - 1))
    sign = 1.0 - 2.0 * jnp.mod(k, 2.0)
    psi = sign * jnp.cos(margin * theta) - 2.0 * k
    target = (lamb * cos_y + psi) / (1.0 + lamb)
    return _replace_target(cosine, target_mask, target, scale)


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

    Shapes: cosine (B, C), labels (B,), t scalar -> (B, C) float32.
    """
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
    cos_y_m = jnp.cos(safe_arccos(cos_y) + margin)
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

    Shapes: cosine (B, C), labels (B,), norms (B,) -> (B, C) float32.
    """
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    chex.assert_shape(norms, (cosine.shape[0],))
    cosine = jnp.clip(cosine, -1.0 + eps, 1.0 - eps)
    cos_y = jnp.clip(cos_y, -1.0 + eps, 1.0 - eps)
    safe_norms = jax.lax.stop_gradient(jnp.clip(norms.astype(jnp.float32), 0.001, 100.0))
    z = (safe_norms - batch_mean) / (batch_std + eps)
    z = jax.lax.stop_gradient(jnp.clip(z * h, -1.0, 1.0))
    theta = jnp.arccos(cos_y)
    theta_m = jnp.clip(theta - margin * z, eps, math.pi - eps)
    target = jnp.cos(theta_m) - (margin + margin * z)
    return _replace_target(cosine, target_mask, target, scale)


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
    the official code (``sin theta`` floored at ``SIN_FLOOR``).

    Shapes: cosine (B, C), labels (B,) -> (B, C) float32.
    """
    cosine, target_mask, cos_y = _prepare(cosine, labels)
    m = margin + sigma * jax.random.normal(rng, cos_y.shape, jnp.float32)
    target = jnp.cos(safe_arccos(cos_y) + m)
    return _replace_target(cosine, target_mask, target, scale)


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

    Shapes: embeddings (B, D), weight (C, D) (insightface layout), labels (B,) int
    -> scalar float32.
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
    check_labels(labels, weight.shape[0])
    if _accepts(margin_fn, "norms") and "norms" not in params:
        params["norms"] = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=1)
    cosine = jnp.matmul(l2_normalize(embeddings), l2_normalize(weight).T, precision=precision)
    logits = margin_fn(cosine, labels, **params)
    return jnp.mean(cross_entropy(logits, labels))
