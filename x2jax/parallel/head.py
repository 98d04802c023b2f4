"""Class-sharded margin-softmax head (model parallel) with Partial FC sampling.

The class-centre matrix W (C_pad, D) is split by rows over the ``classes`` mesh
axes (every device of the default mesh): shard ``r`` of ``n`` owns the
contiguous block ``[r * C_pad/n, (r+1) * C_pad/n)``. The loss is written with
``jax.shard_map`` and explicit collectives (insightface Partial FC):

1. all-gather the embeddings and labels of the global batch (B, D) - W never moves;
2. target cosine ``cos_y``: the owning shard gathers its row ``W[y]`` and dots
   it with the embedding, a ``psum`` over the class axes gives it to all shards;
3. each shard computes its block of cosines (B, C_local) (or of its sampled
   rows) and calls the *unchanged* margin function on it with label -1 (no
   target in the block: all columns are non-target logits), and once on
   ``cos_y[:, None]`` for the target logit. Target-only margins (the spec has
   a ``target_margin``) get their non-target and target logits directly;
   margins whose non-target logits depend on ``cos_y`` (the spec's
   ``nontarget_depends_on_target``, CurricularFace) get ``cos_y`` appended to
   the block as its target column instead;
4. the target's own column inside the block, padded rows and (with sampling)
   unsampled rows are masked to ``-inf``; softmax cross-entropy uses a ``pmax``
   of the row maxima and a ``psum`` of the exp-sums; the target logit enters once.

Every shard ends with the same scalar: the mean over the global batch, equal
to :func:`x2jax.losses.margin_loss` on the unsharded W. The gradient of W (and
any optimizer state built from it) keeps W's sharding.

Partial FC (``sample_rate < 1``): every shard keeps a fixed number
``num_sampled = ceil(sample_rate * C_local)`` of its rows: all rows that are
positives of the *global* batch, filled with uniformly random negatives (top-k
of random scores, positives scored above every negative, indices sorted).
If a shard holds more distinct positives than ``num_sampled`` (overflow), the
sample keeps the lowest-indexed ones; the others still get their exact target
logit and gradient through step 2 (the target never depends on the sample) but
are not negatives for the rest of the batch. ``HeadAux.num_overflow`` counts
them. Only rows in ``HeadAux.row_mask`` (sample plus positives) get a gradient;
wrap the class-centre optimizer in :func:`x2jax.parallel.optim.masked_row_updates`
and pass ``row_mask`` so that momentum and weight decay do not touch the other
rows (insightface's behaviour).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from x2jax import losses
from x2jax.parallel.mesh import mesh_axis_size
from x2jax.parallel.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    class_centers_sharding,
    num_class_shards,
)

Array = jax.Array
INIT_CHUNK_ROWS = 16384


class HeadAux(NamedTuple):
    """Side outputs of :func:`sharded_margin_loss` (``return_aux=True``).

    row_mask: (C_pad,) bool, sharded like W's rows: rows that received a
      gradient this step (sampled rows and positives; all real rows without
      sampling). Feed it to ``masked_row_updates``.
    sampled: (C_pad,) bool: rows in the fixed-size sample (all real rows
      without sampling).
    num_overflow: int32 scalar: positives that did not fit in their shard's
      sample (0 without sampling).
    target_cosine: (B,) float32 ``cos_y`` of the global batch (for loss state
      updates, e.g. CurricularFace's running mean).
    """

    row_mask: Array
    sampled: Array
    num_overflow: Array
    target_cosine: Array


def pad_num_classes(num_classes: int, num_shards: int) -> int:
    """Smallest multiple of ``num_shards`` that is >= ``num_classes``."""
    if num_classes < 1 or num_shards < 1:
        raise ValueError(
            f"pad_num_classes: need num_classes >= 1 and num_shards >= 1, got "
            f"{num_classes}, {num_shards}")
    return -(-num_classes // num_shards) * num_shards


def num_sampled_per_shard(num_local: int, sample_rate: float) -> int:
    """Static Partial FC sample size of one shard: ``ceil(sample_rate * num_local)``."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return max(1, min(num_local, math.ceil(sample_rate * num_local - 1e-9)))


def init_class_centers(
    rng: Array,
    num_classes: int,
    embedding_size: int,
    mesh: Mesh,
    *,
    std: float = 0.01,
    dtype: Any = jnp.float32,
    rules: ShardingRules = DEFAULT_RULES,
    num_rows: int | None = None,
) -> Array:
    """W ~ N(0, std^2), shape (num_rows, D), created sharded.

    ``num_rows`` defaults to ``pad_num_classes(C, shards)``; a larger multiple
    of the shard count is allowed. Row ``i`` is ``std * normal(fold_in(rng,
    i), (D,))``: the same W for any mesh. Padded rows are zero (and stay masked
    in the loss). Each shard generates its own rows in chunks of
    ``INIT_CHUNK_ROWS``: no device ever materialises the full matrix and the
    random-bit temporaries stay at one chunk (a plain ``jax.random.normal`` of
    the whole (C, D) matrix needs about 3 more W-sized temporaries). Works
    eagerly and inside an outer ``jit``.
    """
    n_shards = num_class_shards(mesh, rules)
    padded = pad_num_classes(num_classes, n_shards) if num_rows is None else int(num_rows)
    if padded < num_classes or padded % n_shards:
        raise ValueError(
            f"init_class_centers: num_rows={padded} must be >= num_classes={num_classes} and "
            f"a multiple of the {n_shards} class shards")
    num_local = padded // n_shards
    class_axes = rules.classes or ()

    def row(key, i):
        w = std * jax.random.normal(jax.random.fold_in(key, i), (embedding_size,), dtype)
        return jnp.where(i < num_classes, w, 0).astype(dtype)

    chunk = min(num_local, INIT_CHUNK_ROWS)
    num_chunks = -(-num_local // chunk)

    def local_init(key):
        shard = jax.lax.axis_index(class_axes) if class_axes else 0

        def fill(j, w):
            # The last chunk is shifted back to end at num_local; rows it
            # rewrites get the same values (they depend only on the row index).
            begin = jnp.minimum(j * chunk, num_local - chunk)
            rows = shard * num_local + begin + jnp.arange(chunk)
            return jax.lax.dynamic_update_slice(w, jax.vmap(lambda i: row(key, i))(rows),
                                                (begin, 0))

        w0 = jnp.zeros((num_local, embedding_size), dtype)
        if class_axes:
            w0 = jax.lax.pcast(w0, class_axes, to="varying")
        return jax.lax.fori_loop(0, num_chunks, fill, w0)

    init = jax.shard_map(local_init, mesh=mesh, in_specs=P(),
                         out_specs=P(class_axes or None, None))
    out = jax.jit(init, out_shardings=class_centers_sharding(mesh, rules))(rng)
    assert out.shape == (padded, embedding_size)
    return out


def _split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Python scalars/strings are static; anything array-like is a traced input."""
    static, arrays = {}, {}
    for k, v in params.items():
        if isinstance(v, (jax.Array, np.ndarray)) or hasattr(v, "shape"):
            arrays[k] = v
        else:
            static[k] = v
    return static, arrays


def sharded_margin_loss(
    embeddings: Array,
    weight: Array,
    labels: Array,
    *,
    margin_fn: Callable[..., Array] | str,
    mesh: Mesh,
    num_classes: int | None = None,
    sample_rate: float = 1.0,
    rng: Array | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    precision: jax.lax.PrecisionLike = None,
    return_aux: bool = False,
    **margin_params: Any,
) -> Array | tuple[Array, HeadAux]:
    """``losses.margin_loss`` with W sharded over the class axes of ``mesh``.

    Args:
      embeddings: (B, D) float, B divisible by the batch-axes size.
      weight: (C_pad, D) class centres (insightface layout), C_pad divisible by
        the number of class shards (see :func:`pad_num_classes`,
        :func:`init_class_centers`).
      labels: (B,) int in ``[0, num_classes)``.
      margin_fn: a margin function or its registry name; its
        ``x2jax.losses.MarginSpec`` says what the head fills in and how it splits
        the logits (a function outside the registry: the generic label -1 path,
        nothing filled in).
      mesh: the device mesh.
      num_classes: real class count C <= C_pad; rows >= C are padding (masked,
        zero gradient). Default: ``weight.shape[0]``.
      sample_rate: Partial FC sample rate in (0, 1]; 1 = the full head.
      rng: PRNG key, required when ``sample_rate < 1`` (each shard folds in its
        index) or when the spec ``needs_rng`` (ElasticFace), which gets
        this key unchanged, as ``margin_loss(..., rng=rng)``.
      rules: sharding rules (which mesh axes split the batch and the classes).
      precision: matmul precision of the cosine block.
      return_aux: also return :class:`HeadAux`.
      **margin_params: keyword arguments of ``margin_fn`` (python scalars are
        static; arrays, e.g. CurricularFace's ``t``, are replicated inputs).
        ``norms`` is filled with the embedding norms when the spec ``needs_norms``.

    Returns:
      Scalar float32 mean cross-entropy over the global batch (and ``HeadAux``).

    Raises:
      ValueError: an empty batch (B = 0), shapes that do not fit the mesh, labels
        out of range (concrete labels), a missing ``rng``.
    """
    spec = losses.spec_of(margin_fn)
    margin_fn = spec.fn
    chex.assert_rank([embeddings, weight, labels], [2, 2, 1])
    chex.assert_type(labels, int)
    chex.assert_equal_shape_prefix([embeddings, labels], 1)
    batch, dim = embeddings.shape
    padded, wdim = weight.shape
    if dim != wdim:
        raise ValueError(
            f"sharded_margin_loss: embedding dim {dim} does not match weight (C, D)={weight.shape}")
    losses.check_nonempty_batch(embeddings, where="sharded_margin_loss")
    num_classes = padded if num_classes is None else int(num_classes)
    if not 0 < num_classes <= padded:
        raise ValueError(
            f"sharded_margin_loss: num_classes={num_classes} must be in [1, weight rows={padded}]")
    class_axes, batch_axes = rules.classes or (), rules.batch or ()
    n_shards = mesh_axis_size(mesh, class_axes or None)
    n_batch = mesh_axis_size(mesh, batch_axes or None)
    if padded % n_shards:
        raise ValueError(
            f"sharded_margin_loss: weight rows {padded} not divisible by {n_shards} class "
            f"shards (mesh axes {class_axes}); pad with pad_num_classes({num_classes}, "
            f"{n_shards}) = {pad_num_classes(num_classes, n_shards)} rows and pass "
            f"num_classes={num_classes}")
    if batch % n_batch:
        raise ValueError(
            f"sharded_margin_loss: batch {batch} not divisible by {n_batch} batch shards "
            f"(mesh axes {batch_axes})")
    losses.check_labels(labels, num_classes)
    num_local = padded // n_shards
    sampling = sample_rate < 1.0
    num_sampled = num_sampled_per_shard(num_local, sample_rate)
    wants_rng = spec.needs_rng
    if (sampling or wants_rng) and rng is None:
        raise ValueError(
            "sharded_margin_loss: an rng key is needed (sample_rate < 1 or a margin "
            f"function that takes rng: {getattr(margin_fn, '__name__', margin_fn)})")
    if "rng" in margin_params:
        raise ValueError("sharded_margin_loss: pass the key as rng=..., it also reaches "
                         "margin functions that take one")
    if wants_rng:
        margin_params["rng"] = rng
    if not sampling:
        rng = jax.random.key(0)  # unused placeholder with a fixed pytree structure
    static_params, array_params = _split_params(margin_params)
    wants_norms = spec.needs_norms and "norms" not in margin_params
    # Non-target logits that need cos_y (CurricularFace's hard negatives) get it
    # appended to the block as the target column; every other function gets its
    # block with label -1 ("no target here", see x2jax.losses) and a separate
    # (B, 1) call for the target logit, which saves a copy of the block.
    target_dependent = spec.nontarget_depends_on_target

    def body(e_loc, w_loc, y_loc, key, arrays):
        # 1. global batch on every shard; W stays local.
        e = jax.lax.all_gather(e_loc, batch_axes, tiled=True) if batch_axes else e_loc
        y = jax.lax.all_gather(y_loc, batch_axes, tiled=True) if batch_axes else y_loc
        shard = jax.lax.axis_index(class_axes) if class_axes else 0
        start = shard * num_local
        e_n = losses.l2_normalize(e)
        local_y = y - start
        owned = (local_y >= 0) & (local_y < num_local)
        local_y_c = jnp.clip(local_y, 0, num_local - 1)
        rows_real = (start + jnp.arange(num_local)) < num_classes

        # 2. exact target cosine from the owning shard.
        w_y = losses.l2_normalize(w_loc[local_y_c])
        cos_y = jnp.where(owned, jnp.sum(e_n * w_y, axis=1), 0.0)
        if class_axes:
            cos_y = jax.lax.psum(cos_y, class_axes)

        # Partial FC sample of local rows (static size).
        if sampling:
            positive = jnp.zeros(num_local, jnp.int32).at[local_y_c].max(owned.astype(jnp.int32)) > 0
            # Independent of the margin function's use of the same key.
            shard_key = jax.random.fold_in(jax.random.fold_in(key, 0x5A3F), shard)
            # Positives above every negative, lower index first (overflow rule);
            # exact in float32 for shards of up to 2**24 rows.
            first_rows = (2 + num_local - jnp.arange(num_local)).astype(jnp.float32)
            scores = jnp.where(positive, first_rows, jnp.where(
                rows_real, jax.random.uniform(shard_key, (num_local,)), -1.0))
            _, rows = jax.lax.top_k(scores, num_sampled)
            rows = jnp.sort(rows)
            w_blk = w_loc[rows]
            sampled = jnp.zeros(num_local, bool).at[rows].set(True)
            overflow = jnp.sum(positive & ~sampled).astype(jnp.int32)
            row_mask = (sampled | positive) & rows_real
            sampled = sampled & rows_real
        else:
            rows = jnp.arange(num_local)
            w_blk = w_loc
            sampled = row_mask = rows_real
            overflow = jnp.zeros((), jnp.int32)
        if class_axes:
            overflow = jax.lax.psum(overflow, class_axes)

        # 3. block logits and the target logit.
        # (Normalising W first is faster on XLA:CPU than scaling the (B, C_local)
        # product per column, and the temporaries are about the same.)
        cos = jnp.matmul(e_n, losses.l2_normalize(w_blk).T, precision=precision)
        kw = dict(static_params, **arrays)
        if wants_norms:
            kw["norms"] = jnp.linalg.norm(e.astype(jnp.float32), axis=1)
        b = cos.shape[0]
        split = losses.target_only_logits(spec, kw)  # None: not target-only
        if split is not None:
            # Target-only margin: non-target logits straight from the block, the
            # target logit from cos_y (no (B, C) target mask, replace or sum).
            nontarget, target = split
            logits = nontarget(cos)
            tgt = target(cos_y)
        elif target_dependent:
            # Non-target logits need cos_y: append it as the target column.
            ext = jnp.concatenate([cos, cos_y[:, None]], axis=1)
            logits_ext = margin_fn(ext, jnp.full((b,), cos.shape[1], jnp.int32), **kw)
            logits = logits_ext[:, :-1].astype(jnp.float32)
            tgt = logits_ext[:, -1].astype(jnp.float32)
        else:
            # Label -1: no target in the block, every column is a non-target logit.
            logits = margin_fn(cos, jnp.full((b,), -1, jnp.int32), **kw).astype(jnp.float32)
            tgt = margin_fn(cos_y[:, None], jnp.zeros((b,), jnp.int32), **kw)[:, 0]
            tgt = tgt.astype(jnp.float32)
        if class_axes:
            # Every shard holds the same target logit, but its type may vary over
            # the mesh (it can depend on the gathered embeddings, e.g. AdaFace's
            # norms): take shard 0's, a replicated value with one gradient path.
            tgt = jax.lax.psum(jnp.where(shard == 0, tgt, 0.0), class_axes)

        # 4. cross-entropy over all shards, the target counted once.
        keep = rows_real[rows][None, :] & (rows[None, :] != local_y[:, None])
        logits = jnp.where(keep, logits, -jnp.inf)
        row_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
        if class_axes:
            row_max = jax.lax.pmax(row_max, class_axes)
        m = jnp.maximum(row_max, jax.lax.stop_gradient(tgt))
        sumexp = jnp.sum(jnp.exp(logits - m[:, None]), axis=1)
        if class_axes:
            sumexp = jax.lax.psum(sumexp, class_axes)
        sumexp = sumexp + jnp.exp(tgt - m)
        loss = jnp.mean(jnp.log(sumexp) + m - tgt)
        aux = HeadAux(row_mask=row_mask, sampled=sampled, num_overflow=overflow,
                      target_cosine=cos_y)
        return loss, aux

    cspec = P(class_axes or None)
    bspec = P(batch_axes or None)
    in_specs = (P(batch_axes or None, None), P(class_axes or None, None), bspec, P(),
                jax.tree.map(lambda _: P(), array_params))
    out_specs = (P(), HeadAux(row_mask=cspec, sampled=cspec, num_overflow=P(),
                              target_cosine=P()))
    loss, aux = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
        embeddings, weight, labels.astype(jnp.int32), rng, array_params)
    return (loss, aux) if return_aux else loss
