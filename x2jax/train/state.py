"""Train state, created directly sharded over the mesh.

``TrainState`` holds everything a step reads and writes. Its shardings come from
the rules of :mod:`x2jax.parallel.sharding`: backbone params replicated (or
FSDP), the class-centre matrix W and every optimizer leaf shaped like it split
over the class axes, scalars replicated. ``create_train_state`` runs the
initialiser under ``jax.jit(..., out_shardings=...)`` so no device ever holds
the full W.

W is stored in ``head_dtype`` (float32, or bfloat16 for the row-sparse Partial FC
head, whose optimizer keeps its momentum in ``optimizer.head_momentum_dtype``); its
optimizer state has the same layout whichever head update the step uses
(``x2jax.parallel.optim.row_sparse_sgd`` keeps the dense head's), so a checkpoint of
one restores into the other.

W has ``C_pad`` rows: ``C`` rounded up to a multiple of ``lcm(128, shards)``.
The padding does not depend on the device count as long as the class-shard
count divides 128, so a checkpoint restores onto 1, 2, 4, ... 128 class
shards unchanged (rows >= C are zero, masked in the loss, never updated).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from x2jax import losses
from x2jax.models.registry import init_variables
from x2jax.parallel.head import init_class_centers, pad_num_classes
from x2jax.parallel.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    class_centers_sharding,
    num_class_shards,
    opt_state_shardings,
    param_shardings,
    replicated,
)

# Class rows are padded to a multiple of lcm(CLASS_PAD_MULTIPLE, shards).
CLASS_PAD_MULTIPLE = 128
# torch.cuda.amp.GradScaler defaults, for float16 training.
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_GROWTH_INTERVAL = 2000


@flax.struct.dataclass
class TrainState:
    """step: int32 (batches consumed); params: {'backbone', 'head': {'weight': (C_pad, D)}};
    batch_stats: BN statistics; opt_state: optax state; loss_state: margin-function state
    (CurricularFace t, AdaFace norm statistics); loss_scale: {'scale' f32, 'good_steps' i32}
    (dynamic float16 loss scaling; scale stays 1 otherwise); rng: uint32[2] PRNG key."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_state: Any
    loss_scale: Any
    rng: jax.Array


def checkpoint_class_rows(num_classes: int, num_shards: int) -> int:
    """Rows of W as trained and checkpointed: ``num_classes`` rounded up to a multiple of
    ``lcm(128, num_shards)`` (:func:`x2jax.parallel.pad_num_classes` pads to the shard
    count only), so a checkpoint restores on any shard count dividing 128."""
    return pad_num_classes(num_classes, math.lcm(CLASS_PAD_MULTIPLE, num_shards))


def _init_state(
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    num_classes: int,
    padded_classes: int,
    loss_name: str,
    float16: bool,
    mesh: Mesh,
    rules: ShardingRules,
    head_dtype: Any = jnp.float32,
) -> TrainState:
    rng, model_rng, head_rng = jax.random.split(rng, 3)
    variables = init_variables(model, model_rng)
    # N(0, 0.01) as the official code; each shard draws its own rows (same W on any mesh),
    # in float32, rounded to head_dtype chunk by chunk.
    weight = init_class_centers(
        head_rng, num_classes, model.embedding_size, mesh, num_rows=padded_classes, rules=rules,
        dtype=jnp.dtype(head_dtype),
    )
    params = {"backbone": variables["params"], "head": {"weight": weight}}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        loss_state=losses.spec(loss_name).init_state(),
        loss_scale={
            "scale": jnp.asarray(LOSS_SCALE_INIT if float16 else 1.0, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32),
        },
        rng=rng,
    )


def state_shardings(
    abstract_state: TrainState,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    param_strategy: str = "replicate",
    rules: ShardingRules = DEFAULT_RULES,
) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) TrainState."""
    rep = replicated(mesh)
    params = {
        "backbone": param_shardings(abstract_state.params["backbone"], mesh, strategy=param_strategy, rules=rules),
        "head": {"weight": class_centers_sharding(mesh, rules)},
    }
    return TrainState(
        step=rep,
        params=params,
        batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
        opt_state=opt_state_shardings(tx, abstract_state.opt_state, params, mesh),
        loss_state=jax.tree.map(lambda _: rep, abstract_state.loss_state),
        loss_scale=jax.tree.map(lambda _: rep, abstract_state.loss_scale),
        rng=rep,
    )


def make_state_factory(
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    num_classes: int,
    loss_name: str,
    float16: bool = False,
    param_strategy: str = "replicate",
    rules: ShardingRules = DEFAULT_RULES,
    head_dtype: Any = "float32",
) -> tuple[Any, TrainState, TrainState]:
    """Returns ``(create(rng) -> TrainState, shardings, abstract state with shardings)``.

    ``create`` is the initialiser jitted with ``out_shardings``; the abstract state
    (``jax.ShapeDtypeStruct`` carrying the target shardings) is what a checkpoint
    restores into, on this mesh whatever mesh saved it. ``head_dtype``: W's storage
    dtype (``loss.head_store_dtype``).
    """
    padded = checkpoint_class_rows(num_classes, num_class_shards(mesh, rules))
    init = functools.partial(
        _init_state,
        model=model,
        tx=tx,
        num_classes=num_classes,
        padded_classes=padded,
        loss_name=loss_name,
        float16=float16,
        mesh=mesh,
        rules=rules,
        head_dtype=head_dtype,
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_shardings(abstract, tx, mesh, param_strategy=param_strategy, rules=rules)
    create = jax.jit(init, out_shardings=shardings)
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return create, shardings, abstract_sharded
