"""A jitted training step of the class-sharded head alone (a test and benchmark reference).

Used by the multi-host test and ``benchmarks/head_scaling.py``; the full
training step (backbone + head) in ``x2jax.train`` follows the same pattern:
shardings of W and its optimizer state pinned with ``in_shardings`` /
``out_shardings``, W and the state donated, ``row_mask`` passed to the
optimizer for Partial FC.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax.parallel.head import HeadAux, sharded_margin_loss
from x2jax.parallel.optim import masked_row_updates
from x2jax.parallel.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    batch_sharding,
    class_centers_sharding,
    opt_state_shardings,
    replicated,
)


class HeadStepOutput(NamedTuple):
    weight: jax.Array
    opt_state: Any
    loss: jax.Array
    grad_embeddings: jax.Array
    aux: HeadAux


def make_head_step(
    tx: optax.GradientTransformation,
    weight_shape: tuple[int, int],
    *,
    margin_fn: Callable[..., jax.Array] | str,
    mesh: Mesh,
    num_classes: int,
    sample_rate: float = 1.0,
    rules: ShardingRules = DEFAULT_RULES,
    donate: bool = True,
    **margin_params: Any,
) -> tuple[Callable[..., HeadStepOutput], Callable[[jax.Array], Any]]:
    """Returns ``(step, init_opt_state)``.

    ``step(weight, opt_state, embeddings, labels, rng) -> HeadStepOutput``: one
    optimizer step of W on ``sharded_margin_loss`` (``tx`` wrapped in
    :func:`masked_row_updates`, so with ``sample_rate < 1`` only sampled rows
    move). ``init_opt_state(weight)`` builds the optimizer state with W's
    sharding. W and the optimizer state are donated when ``donate``.
    """
    tx = masked_row_updates(tx)
    w_sharding = class_centers_sharding(mesh, rules)
    abstract_w = jax.ShapeDtypeStruct(weight_shape, jnp.float32, sharding=w_sharding)
    state_shardings = opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_w), w_sharding,
                                          mesh)
    init_opt_state = jax.jit(tx.init, in_shardings=w_sharding, out_shardings=state_shardings)

    def step(weight, opt_state, embeddings, labels, rng):
        def loss_fn(w, e):
            return sharded_margin_loss(
                e, w, labels, margin_fn=margin_fn, mesh=mesh, num_classes=num_classes,
                sample_rate=sample_rate, rng=rng, rules=rules, return_aux=True,
                **margin_params)

        (loss, aux), (grad_w, grad_e) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(weight, embeddings)
        updates, opt_state = tx.update(grad_w, opt_state, weight, row_mask=aux.row_mask if sample_rate < 1 else None)
        weight = optax.apply_updates(weight, updates)
        return HeadStepOutput(weight, opt_state, loss, grad_e, aux)

    rep = replicated(mesh)
    bsh = batch_sharding(mesh, rules)
    rows = NamedSharding(mesh, P(rules.classes))
    aux_shardings = HeadAux(row_mask=rows, sampled=rows, num_overflow=rep, target_cosine=rep, target_prob=rep,
                            nearest_cosine=rep)
    jitted = jax.jit(
        step,
        in_shardings=(w_sharding, state_shardings, bsh, bsh, rep),
        out_shardings=HeadStepOutput(w_sharding, state_shardings, rep, bsh, aux_shardings),
        donate_argnums=(0, 1) if donate else (),
    )
    return jitted, init_opt_state
