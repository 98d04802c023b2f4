"""Shared pieces of the margin losses: label checks, clipping, arccos, target-only logits, cross-entropy."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

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


# ----------------------------------------------------------------------------
# Label checks
# ----------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(labels: Array | np.ndarray, num_classes: int, *, what: str = "labels") -> None:
    """Checks that concrete labels lie in ``[0, num_classes)``; no-op for traced labels.

    Args:
      labels: integer labels, any shape.
      num_classes: the class count C.
      what: the name used in the error message.

    Raises:
      TypeError: labels of a non-integer dtype.
      ValueError: a label outside ``[0, C)``, naming the first offending positions.
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
    """Checks that a batch has rows; holds under ``jit`` too (shapes are static).

    Args:
      embeddings: (B, D) batch.
      where: the caller's name, for the error message.

    Raises:
      ValueError: ``B = 0`` (a mean over the batch would be NaN).
    """
    if embeddings.shape[0] == 0:
        raise ValueError(
            f"{where}: empty batch, embeddings shape {tuple(embeddings.shape)} (B = 0); "
            "the loss is a mean over the batch and needs B >= 1"
        )


def count_out_of_range(labels: Array, num_classes: int) -> Array:
    """Number of labels outside ``[0, num_classes)``, an int32 scalar (jit-safe)."""
    return jnp.sum((labels < 0) | (labels >= num_classes)).astype(jnp.int32)


def checkify_labels(labels: Array, num_classes: int) -> None:
    """In-graph label check for code wrapped in ``jax.experimental.checkify``."""
    checkify.check(
        jnp.all((labels >= 0) & (labels < num_classes)),
        "labels out of range [0, {n}): min {lo}, max {hi}",
        n=jnp.int32(num_classes),
        lo=jnp.min(labels),
        hi=jnp.max(labels),
    )


# ----------------------------------------------------------------------------
# Cosines and angles
# ----------------------------------------------------------------------------


def sin_floor(dtype: Any) -> float:
    """Floor of ``sin theta`` in the true arccos gradients for a cosine of ``dtype``.

    ``max(SIN_FLOOR, sin theta)`` at the representable cosine nearest ±1
    (``1 - finfo(dtype).epsneg``): SIN_FLOOR for float32 and float64, ~2^-5 for
    float16 (the exact X2 gradient at cos = -1, scale 64, is then ~1.2e4 instead
    of 3.6e5, above float16's max 65504), ~2^-3.5 for bfloat16. Where it exceeds
    SIN_FLOOR it binds only at exactly ±1, whose gradient is then within ~1 % of
    the one at the representable neighbour.

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
    """Clips to [-1, 1] with gradient 1 everywhere (rounding above 1 must not zero it)."""
    return cosine + jax.lax.stop_gradient(jnp.clip(cosine, -1.0, 1.0) - cosine)


def straight_through(cos_y: Array, target: Array) -> Array:
    """Value ``target``, gradient as if it were ``cos_y`` (insightface's ``no_grad`` pattern)."""
    return cos_y + jax.lax.stop_gradient(target - cos_y)


def theta_of(cos: Array) -> Array:
    """``arccos`` of an already clipped cosine (value only; callers own the gradient)."""
    return jnp.arccos(jnp.clip(cos, -1.0, 1.0))


def safe_arccos(cos: Array, floor: float = SIN_FLOOR) -> Array:
    """``arccos`` on [-1, 1] with the derivative ``-1 / max(sin theta, floor)``."""
    return _safe_arccos(cos, float(floor))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _safe_arccos(cos: Array, floor: float) -> Array:
    return theta_of(cos)


@_safe_arccos.defjvp
def _safe_arccos_jvp(floor, primals, tangents):
    (cos,), (dcos,) = primals, tangents
    theta = theta_of(cos)
    return theta, -dcos / jnp.maximum(jnp.sin(theta), floor)


# ----------------------------------------------------------------------------
# Target-only margins
# ----------------------------------------------------------------------------


class TargetMargin(NamedTuple):
    """A margin that changes only the target logit.

    Logits: ``scale * target(cos_y)[i]`` in column ``labels[i]`` of row i and
    ``scale * nontarget(cos_j)`` elsewhere, with ``nontarget`` the [-1, 1] clip of
    :func:`clip_cosine` followed, when ``clip = (lo, hi)``, by ``jnp.clip(., lo, hi)``.

    Attributes:
      scale: the scale s, a float or a float32 scalar.
      target: ``(B,)`` clipped ``cos_y`` float32 -> ``(B,)`` target in cosine units,
        row i depending on ``cos_y[i]`` only.
      clip: None, or the ``(lo, hi)`` bounds of the non-target cosines.
    """

    scale: float | Array
    target: Callable[[Array], Array]
    clip: tuple[float | Array, float | Array] | None = None


def prepare(cosine: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Validates shapes, casts to float32 and clips to [-1, 1].

    Args:
      cosine: (B, C) float.
      labels: (B,) int; a row whose label is outside ``[0, C)`` gets no target.

    Returns:
      ``(cosine, target_mask, cos_y)``: (B, C) float32, (B, C) bool, (B,) float32
      (0 where the row has no target).
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


def replace_target(cosine: Array, target_mask: Array, target: Array, scale: float | Array) -> Array:
    """``scale * cosine`` with column ``labels[i]`` of row i set to ``scale * target[i]``."""
    return scale * jnp.where(target_mask, target[:, None], cosine)


def target_margin_logits(cosine: Array, labels: Array, margin: TargetMargin) -> Array:
    """The (B, C) logits of a target-only margin.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      margin: the :class:`TargetMargin`.

    Returns:
      (B, C) float32 logits, ``scale * target(cos_y)`` on target and ``scale *
      nontarget(cos_j)`` off it.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
    """
    cosine, target_mask, cos_y = prepare(cosine, labels)
    target = margin.target(cos_y)
    if margin.clip is not None:
        cosine = jnp.clip(cosine, *margin.clip)
    return replace_target(cosine, target_mask, target, margin.scale)


# ----------------------------------------------------------------------------
# Normalisation and cross-entropy
# ----------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int = -1, eps: float = NORM_EPS) -> Array:
    """``x / max(||x||, eps)`` in float32, with finite gradients at ``x = 0``."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-row softmax cross-entropy ``logsumexp(z) - z_y``.

    Built on a one-hot mask, not a gather: a traced label outside ``[0, C)``
    gives 0 instead of silently reading a clipped column.

    Args:
      logits: (B, C) float.
      labels: (B,) int.

    Returns:
      (B,) float32.
    """
    logits = logits.astype(jnp.float32)
    target_mask = labels[:, None] == jnp.arange(logits.shape[1], dtype=labels.dtype)[None, :]
    z_y = jnp.sum(jnp.where(target_mask, logits, 0.0), axis=1)
    in_range = jnp.any(target_mask, axis=1)
    return jnp.where(in_range, jax.nn.logsumexp(logits, axis=1) - z_y, 0.0)
