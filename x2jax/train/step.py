"""The training step: backbone (data parallel) -> class-sharded margin head -> optimizer.

``step(state, batch) -> (state, metrics)`` is a pure function, jitted with the
state's shardings in and out and the state donated. Per step:

1. embeddings = backbone(images) in the compute dtype (BN in train mode over the
   global batch), cast to float32;
2. loss = ``sharded_margin_loss`` (W stays split over the class axes; Partial FC
   sampling when ``sample_rate < 1``), times the float16 loss scale;
3. gradients (unscaled), optimizer update (the head only on sampled rows);
4. a step whose loss or gradients are not finite, or whose batch has a label
   outside [0, C), changes nothing but the step counter, the rng and the loss
   scale: metrics ``skipped`` / ``nonfinite`` / ``bad_labels`` tell the loop,
   which stops or carries on (``config.on_nonfinite``). With float16 a
   non-finite gradient halves the loss scale (GradScaler semantics) and is not
   an error.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from x2jax import losses
from x2jax.parallel.head import sharded_margin_loss
from x2jax.parallel.sharding import DEFAULT_RULES, ShardingRules, batch_sharding, replicated
from x2jax.train.state import LOSS_SCALE_GROWTH_INTERVAL, TrainState


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(
    *,
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    mesh: Mesh,
    shardings: TrainState,
    num_classes: int,
    loss_name: str,
    loss_params: dict[str, Any],
    sample_rate: float = 1.0,
    float16: bool = False,
    rules: ShardingRules = DEFAULT_RULES,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``jit(step, in_shardings, out_shardings, donate_argnums=0)``.

    batch: {'image': (B, H, W, 3) float32, 'label': (B,) int32}, split on the batch axes.
    metrics: replicated scalars (loss, lr, grad_norm, skipped, nonfinite, bad_labels,
    loss_scale, head_overflow, embedding_norm).
    """
    loss_spec = losses.spec(loss_name)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        images, labels = batch["image"], batch["label"]
        rng, dropout_rng, head_rng = jax.random.split(state.rng, 3)
        scale = state.loss_scale["scale"]

        def loss_fn(params):
            embeddings, updates = model.apply(
                {"params": params["backbone"], "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            embeddings = embeddings.astype(jnp.float32)
            loss, aux = sharded_margin_loss(
                embeddings,
                params["head"]["weight"],
                labels,
                margin_fn=loss_spec.fn,
                mesh=mesh,
                num_classes=num_classes,
                sample_rate=sample_rate,
                rng=head_rng,
                rules=rules,
                return_aux=True,
                **loss_params,
                **state.loss_state,
            )
            return loss * scale, (loss, updates["batch_stats"], aux, embeddings)

        grads, (loss, batch_stats, aux, embeddings) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree.map(lambda g: g / scale, grads)
        grads_finite = _all_finite(grads)
        bad_labels = losses.count_out_of_range(labels, num_classes)
        ok = grads_finite & jnp.isfinite(loss) & (bad_labels == 0)

        # Partial FC: only sampled rows of W move (the full head needs no W-sized mask).
        row_mask = aux.row_mask if sample_rate < 1.0 else None
        updates, opt_state = tx.update(grads, state.opt_state, state.params, row_mask=row_mask)
        params = optax.apply_updates(state.params, updates)
        norms = jnp.linalg.norm(embeddings, axis=1)
        loss_state = loss_spec.update_state(
            state.loss_state, target_cosine=aux.target_cosine, norms=norms
        )
        if float16:
            good = jnp.where(grads_finite, state.loss_scale["good_steps"] + 1, 0)
            grow = good >= LOSS_SCALE_GROWTH_INTERVAL
            loss_scale = {
                "scale": jnp.where(grads_finite, jnp.where(grow, scale * 2.0, scale), scale * 0.5),
                "good_steps": jnp.where(grow, 0, good).astype(jnp.int32),
            }
        else:
            loss_scale = state.loss_scale

        new_state = TrainState(
            step=state.step + 1,
            params=_select(ok, params, state.params),
            batch_stats=_select(ok, batch_stats, state.batch_stats),
            opt_state=_select(ok, opt_state, state.opt_state),
            loss_state=_select(ok, loss_state, state.loss_state),
            loss_scale=loss_scale,
            rng=rng,
        )
        metrics = {
            "loss": loss,
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads["backbone"]),
            "skipped": (~ok).astype(jnp.int32),
            "nonfinite": (~(grads_finite & jnp.isfinite(loss))).astype(jnp.int32),
            "bad_labels": bad_labels,
            "loss_scale": scale,
            "head_overflow": aux.num_overflow,
            "embedding_norm": jnp.mean(norms),
        }
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(shardings, batch_shardings(mesh, rules)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )


def batch_shardings(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict[str, NamedSharding]:
    """Shardings of a global batch {'image', 'label'}: split on the batch axes."""
    return {"image": batch_sharding(mesh, rules), "label": batch_sharding(mesh, rules)}


def batch_spec(global_batch_size: int, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch as the loader yields it: image f32 (B, S, S, 3), label i32 (B,)."""
    return {"image": jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}


class AheadOfTimeStep:
    """A jitted train step compiled in a background thread from abstract inputs.

    ``jitted.lower(abstract_state, abstract_batch).compile()`` (an XLA compile, or a
    load from the persistent compilation cache) starts at construction, so the
    rest of the startup (data loader, checkpoint restore, the step-0 evaluation)
    runs while it compiles; the first call waits only for what is left of it.
    With ``warm_up`` the thread then also runs the compiled step once on zeros of
    the same shapes and shardings (donated and discarded): XLA:CPU sets up its
    YNNPACK fusions and x2jax's oneDNN convolutions create their primitives on a
    program's first execution, which would otherwise land in the first real step.
    It costs one step's compute and a second copy of the state while it runs; the
    training loop turns it on for single-process CPU runs only (in a multi-process
    run its collectives would interleave with the main thread's).
    Calls with a batch of other shapes or dtypes than ``abstract_batch`` use
    ``jitted`` itself (it compiles for them); ``compiled_ahead`` tells which ran.
    A compile (or warm-up) error is raised by the first call.
    """

    def __init__(self, jitted: Callable, abstract_state: Any, abstract_batch: Any, *,
                 warm_up: bool = False):
        self._jitted = jitted
        self._batch_types = _types(abstract_batch)
        self._compiled = None
        self.compiled_ahead = False

        def compile_and_warm_up():
            compiled = jitted.lower(abstract_state, abstract_batch).compile()
            if warm_up:
                _run_on_zeros(compiled, (abstract_state, abstract_batch))
            return compiled

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="x2jax-compile")
        self._future = pool.submit(compile_and_warm_up)
        pool.shutdown(wait=False)

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
        if self._future is not None:
            self._compiled, self._future = self._future.result(), None
        if _types(batch) == self._batch_types:
            self.compiled_ahead = True
            return self._compiled(state, batch)
        self.compiled_ahead = False
        return self._jitted(state, batch)


def _run_on_zeros(compiled: Any, abstract_args: tuple) -> None:
    """Executes ``compiled`` once on zeros shaped and sharded as its inputs; discards the result."""
    shardings = compiled.input_shardings[0]
    zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_args),
                    out_shardings=tuple(shardings))()
    jax.block_until_ready(compiled(*zeros))


def _types(tree: Any) -> Any:
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)
