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

The metrics also carry what a loss researcher reads, from what the head has
already computed: ``target_prob`` (mean p_y under the loss's own logits),
``target_angle_deg`` and ``nearest_angle_deg`` (mean angle to the class centre
and to the nearest other centre the step sees).

:func:`make_step_fn` is the pure, unjitted step (several losses behind a
``jax.lax.switch`` on a per-run index for ``x2jax.compare``'s batched runs);
:func:`make_train_step` jits it for one loss.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from x2jax import losses
from x2jax.parallel.head import gather_rows, select_rows, sharded_margin_loss
from x2jax.parallel.sharding import DEFAULT_RULES, ShardingRules, batch_sharding, replicated
from x2jax.train.state import LOSS_SCALE_GROWTH_INTERVAL, TrainState


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _mean_degrees(cosine: jax.Array) -> jax.Array:
    return jnp.mean(jnp.degrees(jnp.arccos(jnp.clip(cosine, -1.0, 1.0))))


@dataclasses.dataclass(frozen=True)
class LossBranch:
    """One loss a step can take: its registry name and the params fixed when it is traced.

    ``params`` are python values (``config.loss.params``); a batched step adds
    per-run traced params on top (``run["loss_params"]``).
    """

    name: str
    params: Mapping[str, Any]


StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def make_step_fn(
    *,
    model: nn.Module,
    tx: optax.GradientTransformationExtraArgs,
    schedule: optax.Schedule,
    mesh: Mesh,
    num_classes: int,
    branches: Sequence[LossBranch],
    sample_rate: float = 1.0,
    float16: bool = False,
    rules: ShardingRules = DEFAULT_RULES,
    row_sparse_head: bool = False,
) -> StepFn:
    """The pure, unjitted train step ``step(state, batch, run=None) -> (state, metrics)``.

    :func:`make_train_step` jits it for train.py (one branch, ``run=None``);
    ``x2jax.compare`` vmaps it over runs.

    Args:
      model, tx, schedule, mesh, num_classes, sample_rate, float16, rules,
        row_sparse_head: as :func:`make_train_step`.
      branches: the losses the step can take. With one, ``state.loss_state`` is
        that loss's state (train.py's layout). With several, it is a tuple of
        every branch's state and ``run["loss_index"]`` (int32 scalar) picks the
        branch with ``jax.lax.switch``; only that branch's state advances.

    Returns:
      ``step``; ``run`` is None or ``{"loss_index": int32 (), "loss_params":
      tuple (one dict per branch) of float32 scalars}``, the traced loss params
      merged over each branch's static ones.
    """
    branches = tuple(branches)
    if not branches:
        raise ValueError("make_step_fn: give at least one loss branch")
    specs = tuple(losses.spec(b.name) for b in branches)
    multi = len(branches) > 1

    def head(index: int, embeddings, weight, labels, head_rng, loss_state, traced, rows=None):
        return sharded_margin_loss(
            embeddings,
            weight,
            labels,
            margin_fn=specs[index].fn,
            mesh=mesh,
            num_classes=num_classes,
            sample_rate=sample_rate,
            rng=head_rng,
            rows=rows,
            rules=rules,
            return_aux=True,
            **branches[index].params,
            **traced,
            **loss_state,
        )

    def step(state: TrainState, batch: dict[str, jax.Array], run: dict[str, Any] | None = None):
        images, labels = batch["image"], batch["label"]
        rng, dropout_rng, head_rng = jax.random.split(state.rng, 3)
        scale = state.loss_scale["scale"]
        traced = run["loss_params"] if run is not None else ({},) * len(branches)
        index = run["loss_index"] if multi else None
        if row_sparse_head:
            # Partial FC, row-sparse: sample first, gather the sampled rows of W (float32) and
            # differentiate with respect to them; W's dense gradient never exists.
            weight = state.params["head"]["weight"]
            rows = select_rows(labels, head_rng, mesh=mesh, num_rows=weight.shape[0], num_classes=num_classes,
                               sample_rate=sample_rate, rules=rules)
            diff_params = {"backbone": state.params["backbone"], "head": {"weight": gather_rows(weight, rows)}}
        else:
            rows, diff_params = None, state.params

        def loss_fn(params):
            embeddings, updates = model.apply(
                {"params": params["backbone"], "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_rng},
            )
            embeddings = embeddings.astype(jnp.float32)
            args = (embeddings, params["head"]["weight"], labels, head_rng)
            if multi:
                loss, aux = jax.lax.switch(
                    index,
                    [functools.partial(lambda b, *a: head(b, *a, state.loss_state[b], traced[b], rows=rows), b)
                     for b in range(len(branches))],
                    *args,
                )
            else:
                loss, aux = head(0, *args, state.loss_state, traced[0], rows=rows)
            return loss * scale, (loss, updates["batch_stats"], aux, embeddings)

        grads, (loss, batch_stats, aux, embeddings) = jax.grad(loss_fn, has_aux=True)(diff_params)
        grads = jax.tree.map(lambda g: g / scale, grads)
        grads_finite = _all_finite(grads)
        bad_labels = losses.count_out_of_range(labels, num_classes)
        ok = grads_finite & jnp.isfinite(loss) & (bad_labels == 0)

        if row_sparse_head:
            # row_sparse_sgd updates the gathered rows of W and its momentum in place (the state is
            # donated) and returns the new W as the head's "update"; with ok False it changes nothing.
            updates, opt_state = tx.update(grads, state.opt_state, state.params, rows=rows,
                                           row_values=diff_params["head"]["weight"], apply=ok)
            params = {"backbone": optax.apply_updates(state.params["backbone"], updates["backbone"]),
                      "head": updates["head"]}
        else:
            # Partial FC: only sampled rows of W move (the full head needs no W-sized mask).
            row_mask = aux.row_mask if sample_rate < 1.0 else None
            updates, opt_state = tx.update(grads, state.opt_state, state.params, row_mask=row_mask)
            params = optax.apply_updates(state.params, updates)
        norms = jnp.linalg.norm(embeddings, axis=1)
        if multi:
            loss_state = tuple(
                _select(index == b, spec.update_state(s, target_cosine=aux.target_cosine, norms=norms), s)
                for b, (spec, s) in enumerate(zip(specs, state.loss_state))
            )
        else:
            loss_state = specs[0].update_state(state.loss_state, target_cosine=aux.target_cosine, norms=norms)
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
            # (row-sparse: the head's rows and state were kept by row_sparse_sgd; no W-sized select)
            params=(_select(ok, params, state.params) if not row_sparse_head else
                    {"backbone": _select(ok, params["backbone"], state.params["backbone"]), "head": params["head"]}),
            batch_stats=_select(ok, batch_stats, state.batch_stats),
            opt_state=(_select(ok, opt_state, state.opt_state) if not row_sparse_head else
                       opt_state._replace(inner_states={**opt_state.inner_states, "backbone": _select(
                           ok, opt_state.inner_states["backbone"], state.opt_state.inner_states["backbone"])})),
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
            # what a loss researcher reads (docs/design.md, "Metrics"): batch means
            "target_prob": jnp.mean(aux.target_prob),
            "target_angle_deg": _mean_degrees(aux.target_cosine),
            "nearest_angle_deg": _mean_degrees(aux.nearest_cosine),
        }
        return new_state, metrics

    return step


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
    row_sparse_head: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``jit(step, in_shardings, out_shardings, donate_argnums=0)`` of :func:`make_step_fn`.

    ``row_sparse_head`` (Partial FC with ``tx`` from ``make_optimizer(..., row_sparse_head=True)``):
    the step gathers the sampled rows of W, differentiates the loss with respect to them and
    updates them and their momentum in place (docs/parallel.md, "Row-sparse update").

    batch: {'image': (B, H, W, 3) float32, 'label': (B,) int32}, split on the batch axes.
    metrics: replicated scalars (loss, lr, grad_norm, skipped, nonfinite, bad_labels,
    loss_scale, head_overflow, embedding_norm, target_prob, target_angle_deg,
    nearest_angle_deg).
    """
    step_fn = make_step_fn(model=model, tx=tx, schedule=schedule, mesh=mesh, num_classes=num_classes,
                           branches=[LossBranch(loss_name, loss_params)], sample_rate=sample_rate,
                           float16=float16, rules=rules, row_sparse_head=row_sparse_head)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        return step_fn(state, batch)

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
