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
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


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
