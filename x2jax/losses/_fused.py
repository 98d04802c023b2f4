"""The classification head: ``margin_loss`` and the fused cross-entropy of target-only margins."""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from x2jax.losses._common import (
    MarginFn,
    TargetMargin,
    check_labels,
    check_nonempty_batch,
    clip_cosine,
    cross_entropy,
    l2_normalize,
)
from x2jax.losses._registry import MarginSpec, spec_of

Array = jax.Array


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


def target_margin_cross_entropy(cosine: Array, labels: Array, margin: TargetMargin) -> Array:
    """Per-row cross-entropy of ``target_margin_logits(cosine, labels, margin)``, fused.

    Equal (to float32 rounding) in value and gradient to ``cross_entropy`` of
    those logits, without their (B, C) mask, replace and target-sum passes:
    ``cos_y`` by a gather, the target and ``d target / d cos_y`` by one
    ``jax.jvp`` of ``margin.target`` on (B,), then a custom-VJP cross-entropy
    whose backward is one elementwise pass, ``dcos_j = s p_j`` off target and
    ``s (p_y - 1) d target / d cos_y`` on it. A traced label outside ``[0, C)``
    gives 0 and zero gradient.

    Args:
      cosine: (B, C) float.
      labels: (B,) int.
      margin: the :class:`TargetMargin`.

    Returns:
      (B,) float32.

    Raises:
      ValueError: concrete labels outside ``[0, C)``.
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
    margin_fn: MarginFn | str | MarginSpec, params: dict[str, Any]
) -> tuple[Callable[[Array], Array], Callable[[Array], Array]] | None:
    """The two halves of a target-only margin's logits, for heads that split them.

    Args:
      margin_fn: a registered margin function, its name or its spec.
      params: its keyword arguments.

    Returns:
      ``(nontarget, target)``, which together give ``margin_fn(cosine, labels,
      **params)`` (same clips, same gradients): ``nontarget(cosine)`` (B, C) ->
      (B, C) float32, the logits of every column as a non-target;
      ``target(cos_y)`` (B,) -> (B,) float32, the target logits. None when the
      margin is not target-only (CurricularFace, inter-class filtering,
      functions outside the registry).
    """
    margin = spec_of(margin_fn).target_only(dict(params))
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
    """Mean margin-softmax cross-entropy of a single-device classification head.

    ``cosine = normalize(embeddings) @ normalize(weight)^T``, ``logits =
    margin_fn(cosine, labels, **params)``, loss ``mean_i logsumexp(logits_i) -
    logits_iy``, all in float32. A registered loss that needs ``norms`` (AdaFace)
    gets the embedding norms. A target-only margin (its spec has a
    ``target_margin``) takes the fused :func:`target_margin_cross_entropy`, same
    value and gradients in one (B, C) pass each way; any other function the
    generic ``cross_entropy(margin_fn(cosine, labels, **params))``.

    Args:
      embeddings: (B, D) float, B >= 1.
      weight: (C, D) class centres (insightface layout).
      labels: (B,) int in ``[0, C)``.
      margin_fn: a margin function or a registry name.
      precision: matmul precision of the cosine.
      **params: keyword arguments of ``margin_fn``.

    Returns:
      Scalar float32.

    Raises:
      ValueError: an unknown name, ``B = 0``, mismatched dims, concrete labels
        outside ``[0, C)``.
      TypeError: a keyword the margin does not take.

    Examples:
      >>> loss = margin_loss(embeddings, weight, labels, "x2_softmax")
      >>> grads = jax.grad(margin_loss, argnums=1)(embeddings, weight, labels, "arcface", margin=0.4)
    """
    spec = spec_of(margin_fn)
    chex.assert_rank([embeddings, weight, labels], [2, 2, 1])
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([embeddings, labels], 1)
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embedding dim {embeddings.shape[1]} does not match weight (C, D)={weight.shape}"
        )
    check_nonempty_batch(embeddings, where="margin_loss")
    check_labels(labels, weight.shape[0])
    if spec.needs_norms and "norms" not in params:
        params["norms"] = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=1)
    margin = spec.target_only(params)
    cosine = jnp.matmul(l2_normalize(embeddings), l2_normalize(weight).T, precision=precision)
    if margin is not None:
        return jnp.mean(target_margin_cross_entropy(cosine, labels, margin))
    return jnp.mean(cross_entropy(spec.fn(cosine, labels, **params), labels))
