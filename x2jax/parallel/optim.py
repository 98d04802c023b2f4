"""Optimizer wrapper for Partial FC: only sampled class-centre rows are updated.

insightface's Partial FC keeps the momentum of class centres that were not
sampled in a step frozen, and applies no update (no weight decay either) to
them. :func:`masked_row_updates` gives the same for any optax optimizer of the
class-centre matrix W (C_pad, D)::

    tx_head = masked_row_updates(optax.chain(optax.add_decayed_weights(5e-4),
                                             optax.sgd(lr, momentum=0.9)))
    loss, aux = sharded_margin_loss(..., sample_rate=0.1, rng=key, return_aux=True)
    updates, state = tx_head.update(grad_w, state, w, row_mask=aux.row_mask)

Rows where ``row_mask`` is False get a zero update and keep their previous
optimizer state; other rows follow ``inner`` exactly. Scalar state (step
counts) advances as usual. With ``row_mask=None`` it is ``inner`` unchanged.
Inside ``optax.partition`` the ``row_mask`` keyword reaches it as an extra arg.

:func:`row_sparse_sgd` is the same optimizer (SGD with momentum and L2 weight
decay) for the row-sparse step, which never forms W's dense gradient: it reads
and writes only the gathered rows (:func:`x2jax.parallel.head.update_rows`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from x2jax.parallel.head import SampledRows, update_rows


def _row_select(mask: jax.Array, new: Any, old: Any) -> Any:
    """``where(mask[:, None, ...], new, old)`` for arrays whose leading dim is len(mask)."""
    if not hasattr(new, "shape") or new.ndim == 0 or new.shape[0] != mask.shape[0]:
        return new
    m = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
    return jnp.where(m, new, old)


def masked_row_updates(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap the optimizer of W so rows outside ``row_mask`` are left untouched.

    ``update(updates, state, params=None, *, row_mask=None, **extra)``;
    ``row_mask`` (C_pad,) bool. Every leaf of ``updates`` must have leading
    dim C_pad (the wrapper is meant for the class-centre matrix only).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, *, row_mask=None, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        if row_mask is None:
            return new_updates, new_state
        rows = row_mask.shape[0]
        for leaf in jax.tree.leaves(updates):
            if leaf.ndim == 0 or leaf.shape[0] != rows:
                raise ValueError(
                    f"masked_row_updates: update leaf of shape {leaf.shape} does not have "
                    f"{rows} rows (row_mask {row_mask.shape}); wrap only the class-centre "
                    "optimizer")
        new_updates = jax.tree.map(
            lambda u: _row_select(row_mask, u, jnp.zeros_like(u)), new_updates)
        new_state = jax.tree.map(lambda n, o: _row_select(row_mask, n, o), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def row_sparse_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    momentum_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The class-centre optimizer of the row-sparse Partial FC step: SGD on gathered rows only.

    Its state is exactly that of ``chain(add_decayed_weights(weight_decay),
    sgd(learning_rate, momentum, nesterov, accumulator_dtype=momentum_dtype))`` on W
    (the dense head's optimizer), so checkpoints of either step restore into the
    other; the momentum may be stored in bfloat16 (``momentum_dtype``), updates are
    computed in float32.

    ``update(grads, state, params, *, rows, row_values, apply=True)``: the tree
    holds the one leaf W (e.g. ``{'weight': ...}``, masked inside
    ``optax.partition``); its gradient leaf is the loss gradient with respect to
    ``row_values = gather_rows(W, rows)`` (S * k, D), not a W-shaped array.
    :func:`x2jax.parallel.head.update_rows` updates those rows of W and of the
    momentum in place; the learning rate is ``learning_rate(count)`` and the
    count advances when ``apply``. **The returned "updates" are the new W**, not
    an increment: take them as the new value (``params['head'] = updates['head']``),
    never through ``optax.apply_updates``, which would add them to W.
    """
    inner = optax.chain(optax.add_decayed_weights(weight_decay),
                        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov,
                                  accumulator_dtype=None if momentum_dtype is None else jnp.dtype(momentum_dtype)))
    is_part = lambda x: isinstance(x, (optax.TraceState, optax.ScaleByScheduleState))  # noqa: E731

    def update_fn(updates, state, params=None, *, rows: SampledRows | None = None,
                  row_values: jax.Array | None = None, apply: Any = True, **extra):
        if rows is None or row_values is None or params is None:
            raise ValueError("row_sparse_sgd: pass params (W), rows=select_rows(...) and "
                             "row_values=gather_rows(W, rows); its gradient is that of the gathered rows")
        (grads,), (weight,) = jax.tree.leaves(updates), jax.tree.leaves(params)
        parts = [x for x in jax.tree.leaves(state, is_leaf=is_part) if is_part(x)]
        traces = [x for x in parts if isinstance(x, optax.TraceState)]
        (count,) = [x.count for x in parts if isinstance(x, optax.ScaleByScheduleState)]
        mom = jax.tree.leaves(traces[0].trace)[0] if traces else None
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        new_w, new_m = update_rows(weight, mom, rows, row_values, grads, learning_rate=lr,
                                   momentum_decay=float(momentum), weight_decay=float(weight_decay),
                                   nesterov=nesterov, apply=apply)
        ok = jnp.asarray(apply, bool)

        def replace(x):
            if isinstance(x, optax.TraceState):
                return optax.TraceState(trace=jax.tree.unflatten(jax.tree.structure(x.trace), [new_m]))
            if isinstance(x, optax.ScaleByScheduleState):
                return optax.ScaleByScheduleState(count=x.count + ok.astype(x.count.dtype))
            return x

        new_state = jax.tree.map(replace, state, is_leaf=is_part)
        return jax.tree.unflatten(jax.tree.structure(params), [new_w]), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
