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

Row-sparse update (the train step's default with SGD): :func:`select_rows` takes
the same sample before the loss, :func:`gather_rows` reads only those rows of W,
``sharded_margin_loss(..., rows=...)`` is differentiated with respect to them
(no dense gradient of W) and :func:`update_rows` applies SGD with momentum to
those rows of W and its momentum in place (docs/parallel.md, "Row-sparse update").
"""
from __future__ import annotations

import dataclasses
import functools
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
    target_prob: (B,) float32 ``p_y``, the softmax probability of the target
      under the loss's own (margin-modified, scaled) logits over the classes
      this step sees (the sampled ones under Partial FC); ``exp(-loss_i)``.
    nearest_cosine: (B,) float32 the largest non-target cosine over the same
      classes (``-inf`` if there is none): the nearest other class centre.
    """

    row_mask: Array
    sampled: Array
    num_overflow: Array
    target_cosine: Array
    target_prob: Array
    nearest_cosine: Array


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
    eagerly and inside an outer ``jit``. Rows are drawn in float32 and rounded to
    ``dtype`` (a bfloat16 W is the float32 one rounded, chunk by chunk).
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
        w = std * jax.random.normal(jax.random.fold_in(key, i), (embedding_size,), jnp.float32)
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


def _sample_local(key: Array, shard: Array | int, local_y_c: Array, owned: Array, rows_real: Array,
                  num_sampled: int, num_extra: int) -> tuple[Array, Array, Array, Array]:
    """One shard's Partial FC sample (inside ``shard_map``), shared by both head paths.

    Scores: positives of the global batch ``2 + num_local - i`` (above every other
    row, lower index first), other real rows ``U[0, 1)`` from the shard's key, padded
    rows -1; ``top_k`` of ``num_sampled + num_extra`` (ties: lower index first, so
    its first ``num_sampled`` are ``top_k(num_sampled)``).

    Returns:
      rows (num_sampled,) sorted local indices (the sample), extra (num_extra,) the
      next ones by score, sorted (positives that overflowed the sample come first),
      positive (num_local,) bool, sampled (num_local,) bool (padding included).
    """
    num_local = rows_real.shape[0]
    positive = jnp.zeros(num_local, jnp.int32).at[local_y_c].max(owned.astype(jnp.int32)) > 0
    # Independent of the margin function's use of the same key.
    shard_key = jax.random.fold_in(jax.random.fold_in(key, 0x5A3F), shard)
    # Positives above every negative, lower index first (overflow rule);
    # exact in float32 for shards of up to 2**24 rows.
    first_rows = (2 + num_local - jnp.arange(num_local)).astype(jnp.float32)
    scores = jnp.where(positive, first_rows, jnp.where(
        rows_real, jax.random.uniform(shard_key, (num_local,)), -1.0))
    _, top = jax.lax.top_k(scores, num_sampled + num_extra)
    rows = jnp.sort(top[:num_sampled])
    extra = jnp.sort(top[num_sampled:])
    sampled = jnp.zeros(num_local, bool).at[rows].set(True)
    return rows, extra, positive, sampled


def _gathered_index(gathered: Array, num_sampled: int, local_y_c: Array) -> Array:
    """Position of each (owned) label's row in a shard's gathered rows (sample, then extras).

    Both parts are sorted: a binary search in each. Labels the shard does not own
    get some position (their cosine is masked by the caller).
    """
    sample = gathered[:num_sampled]
    pos = jnp.clip(jnp.searchsorted(sample, local_y_c), 0, num_sampled - 1)
    num_extra = gathered.shape[0] - num_sampled
    if num_extra == 0:
        return pos
    extra = gathered[num_sampled:]
    pos_extra = jnp.clip(jnp.searchsorted(extra, local_y_c), 0, num_extra - 1)
    return jnp.where(sample[pos] == local_y_c, pos, num_sampled + pos_extra)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("rows", "update", "sampled", "row_mask", "num_overflow"),
                   meta_fields=("num_rows", "num_sampled", "sample_rate", "mesh", "rules"))
@dataclasses.dataclass(frozen=True)
class SampledRows:
    """A Partial FC sample taken before the loss (:func:`select_rows`), for the row-sparse update.

    Each of the S class shards gathers ``k = num_sampled + num_extra`` of its rows:
    first its sample (``num_sampled`` rows, sorted), then ``num_extra = min(B,
    C_local - num_sampled)`` further rows by score (sorted), which hold every
    positive that overflowed the sample; the others among them are not updated.

    rows: (S * k,) int32 local row indices, split over the class axes like W's rows.
    update: (S * k,) bool, the gathered row gets an optimizer step (a real sampled
      row, or an overflowed positive).
    sampled, row_mask: (C_pad,) bool, as :class:`HeadAux`.
    num_overflow: int32 scalar, as :class:`HeadAux`.
    num_rows: C_pad; num_sampled: per shard; sample_rate; mesh and rules: the layout.
    """

    rows: Array
    update: Array
    sampled: Array
    row_mask: Array
    num_overflow: Array
    num_rows: int
    num_sampled: int
    sample_rate: float
    mesh: Mesh
    rules: ShardingRules


def select_rows(
    labels: Array,
    rng: Array,
    *,
    mesh: Mesh,
    num_rows: int,
    num_classes: int,
    sample_rate: float,
    rules: ShardingRules = DEFAULT_RULES,
) -> SampledRows:
    """The Partial FC sample :func:`sharded_margin_loss` takes with ``rng``, before the loss.

    The same rows as the loss's own sampling with the same key and mesh, plus the
    extra rows of :class:`SampledRows`, so that a step can gather only those rows
    of W (:func:`gather_rows`), differentiate the loss with respect to them
    (``sharded_margin_loss(..., gather_rows(W, s), ..., rows=s)``) and update
    them in place (:func:`update_rows`). Work per shard is O(C_local) on scalars
    (scores, top-k), none on rows of W.

    Args:
      labels: (B,) int global labels, split on the batch axes.
      rng: the key the loss would take.
      mesh, rules: the layout of W (C_pad = ``num_rows`` rows over the class axes).
      num_rows: C_pad; num_classes: real classes C <= C_pad.
      sample_rate: in (0, 1).
    """
    class_axes, batch_axes = rules.classes or (), rules.batch or ()
    n_shards = mesh_axis_size(mesh, class_axes or None)
    if num_rows % n_shards or not 0 < num_classes <= num_rows:
        raise ValueError(f"select_rows: num_rows={num_rows} must be a multiple of the {n_shards} class "
                         f"shards and >= num_classes={num_classes}")
    num_local = num_rows // n_shards
    num_sampled = num_sampled_per_shard(num_local, sample_rate)
    num_extra = min(int(labels.shape[0]), num_local - num_sampled)
    replica_axes = _replica_axes(rules)

    def body(y_loc, key):
        y = jax.lax.all_gather(y_loc, batch_axes, tiled=True) if batch_axes else y_loc
        shard = jax.lax.axis_index(class_axes) if class_axes else 0
        start = shard * num_local
        local_y = y - start
        owned = (local_y >= 0) & (local_y < num_local)
        local_y_c = jnp.clip(local_y, 0, num_local - 1)
        rows_real = (start + jnp.arange(num_local)) < num_classes
        rows, extra, positive, sampled = _sample_local(key, shard, local_y_c, owned, rows_real,
                                                       num_sampled, num_extra)
        overflow = jnp.sum(positive & ~sampled).astype(jnp.int32)
        if class_axes:
            overflow = jax.lax.psum(overflow, class_axes)
        update = jnp.concatenate([rows_real[rows], positive[extra]])
        return _replicated((jnp.concatenate([rows, extra]).astype(jnp.int32), update, sampled & rows_real,
                            (sampled | positive) & rows_real, overflow), replica_axes)

    cspec = P(class_axes or None)
    out = jax.shard_map(body, mesh=mesh, in_specs=(P(batch_axes or None), P()),
                        out_specs=(cspec, cspec, cspec, cspec, P()))(labels.astype(jnp.int32), rng)
    return SampledRows(*out, num_rows=int(num_rows), num_sampled=num_sampled, sample_rate=float(sample_rate),
                       mesh=mesh, rules=rules)


def gather_rows(weight: Array, rows: SampledRows, dtype: Any = jnp.float32) -> Array:
    """``W_local[rows]`` on every shard, as ``dtype``: (S * k, D), split like W's rows. W never moves."""
    class_axes = rows.rules.classes or None
    if weight.shape[0] != rows.num_rows:
        raise ValueError(f"gather_rows: W has {weight.shape[0]} rows, the sample was taken for {rows.num_rows}")
    return jax.shard_map(lambda w, r: w[r].astype(dtype), mesh=rows.mesh,
                         in_specs=(P(class_axes, None), P(class_axes)),
                         out_specs=P(class_axes, None))(weight, rows.rows)


def update_rows(
    weight: Array,
    momentum: Array | None,
    rows: SampledRows,
    values: Array,
    grads: Array,
    *,
    learning_rate: Array | float,
    momentum_decay: float,
    weight_decay: float,
    nesterov: bool = False,
    apply: Array | bool = True,
) -> tuple[Array, Array | None]:
    """SGD with momentum and L2 weight decay on the gathered rows of W, scattered back in place.

    For each gathered row with ``rows.update`` (and ``apply``), in float32
    whatever W and the momentum are stored in (``w = values``, ``g = grads``)::

        g' = g + weight_decay * w              (torch-style L2, optax.add_decayed_weights)
        m' = g' + momentum_decay * m           (optax.trace; m = momentum[row])
        w' = w - lr * (g' + momentum_decay * m' if nesterov else m')

    then ``W[row] = w'`` and ``momentum[row] = m'`` rounded to their dtypes; other
    rows, and all rows when ``apply`` is False, keep their stored values. This is
    optax's ``chain(add_decayed_weights, sgd(momentum))`` on those rows; rows not
    gathered are not read or written (their momentum stays frozen). With
    ``momentum`` None (momentum_decay 0): plain SGD. Donate W and the momentum to
    the enclosing ``jit`` so that the scatter is in place.

    Args:
      weight: (C_pad, D) W, any float dtype; momentum: the same shape (or None).
      rows: the sample; values: ``gather_rows(weight, rows)`` (S * k, D) float32;
      grads: the loss gradient with respect to ``values``.
      learning_rate: scalar; apply: bool scalar (False: a step that changes nothing).

    Returns:
      (new W, new momentum), same shapes, dtypes and shardings.
    """
    class_axes = rows.rules.classes or None
    wspec, rspec = P(class_axes, None), P(class_axes)
    has_momentum = momentum is not None

    def body(w, m, r, upd, v, g, lr, ok):
        v, g = v.astype(jnp.float32), g.astype(jnp.float32)
        g = g + weight_decay * v
        if has_momentum:
            m_old = m[r].astype(jnp.float32)
            m_new = g + momentum_decay * m_old
            step = g + momentum_decay * m_new if nesterov else m_new
        else:
            step = g
        keep = (upd & ok)[:, None]
        w = w.at[r].set(jnp.where(keep, v - lr * step, v).astype(w.dtype), unique_indices=True)
        if has_momentum:
            m = m.at[r].set(jnp.where(keep, m_new, m_old).astype(m.dtype), unique_indices=True)
        return w, m

    lr = jnp.asarray(learning_rate, jnp.float32)
    ok = jnp.asarray(apply, bool)
    m_in = momentum if has_momentum else jnp.zeros((), jnp.float32)
    mspec = wspec if has_momentum else P()
    new_w, new_m = jax.shard_map(body, mesh=rows.mesh,
                                 in_specs=(wspec, mspec, rspec, rspec, wspec, wspec, P(), P()),
                                 out_specs=(wspec, mspec))(weight, m_in, rows.rows, rows.update, values,
                                                           grads, lr, ok)
    return new_w, (new_m if has_momentum else None)


def _replica_axes(rules: ShardingRules) -> tuple[str, ...]:
    """Batch axes that W is replicated over (not among the class axes)."""
    return tuple(a for a in (rules.batch or ()) if a not in (rules.classes or ()))


def _replicated(tree: Any, axes: tuple[str, ...]) -> Any:
    """Values computed alike on every device of ``axes`` (from an all-gathered batch), typed replicated.

    With ``rules.classes`` not covering every batch axis, W is replicated over the
    rest, and shard_map's outputs must say so: floats through ``pmean``, integers
    and booleans through ``pmax``; the values do not change.
    """
    if not axes:
        return tree

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.lax.pmean(x, axes)
        return jax.lax.pmax(x.astype(jnp.int32), axes).astype(x.dtype)

    return jax.tree.map(one, tree)


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
    rows: SampledRows | None = None,
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
      rows: a sample taken beforehand by :func:`select_rows` (the row-sparse
        update): ``weight`` is then the gathered rows ``gather_rows(W, rows)``
        (S * k, D), not W, the loss is the same function of them as of W with
        ``sample_rate=rows.sample_rate`` and the same key, and its gradient is
        per gathered row; ``sample_rate`` is ignored.
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
    if rows is not None:
        if padded != rows.rows.shape[0]:
            raise ValueError(f"sharded_margin_loss: with rows=, weight must be gather_rows(W, rows) of "
                             f"{rows.rows.shape[0]} rows, got {weight.shape}")
        padded = rows.num_rows
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
    sampling = sample_rate < 1.0 or rows is not None
    num_sampled = rows.num_sampled if rows is not None else num_sampled_per_shard(num_local, sample_rate)
    wants_rng = spec.needs_rng
    if ((sampling and rows is None) or wants_rng) and rng is None:
        raise ValueError(
            "sharded_margin_loss: an rng key is needed (sample_rate < 1 or a margin "
            f"function that takes rng: {getattr(margin_fn, '__name__', margin_fn)})")
    if "rng" in margin_params:
        raise ValueError("sharded_margin_loss: pass the key as rng=..., it also reaches "
                         "margin functions that take one")
    if wants_rng:
        margin_params["rng"] = rng
    if not sampling or rng is None:
        rng = jax.random.key(0)  # unused placeholder with a fixed pytree structure
    static_params, array_params = _split_params(margin_params)
    wants_norms = spec.needs_norms and "norms" not in margin_params
    # Non-target logits that need cos_y (CurricularFace's hard negatives) get it
    # appended to the block as the target column; every other function gets its
    # block with label -1 ("no target here", see x2jax.losses) and a separate
    # (B, 1) call for the target logit, which saves a copy of the block.
    target_dependent = spec.nontarget_depends_on_target

    replica_axes = _replica_axes(rules)

    def body(e_loc, w_loc, y_loc, key, arrays, given):
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

        # 2. exact target cosine from the owning shard (with a given sample, from
        # its gathered rows: every positive is among them).
        y_idx = _gathered_index(given[0], num_sampled, local_y_c) if given else local_y_c
        w_y = losses.l2_normalize(w_loc[y_idx])
        cos_y = jnp.where(owned, jnp.sum(e_n * w_y, axis=1), 0.0)
        if class_axes:
            cos_y = jax.lax.psum(cos_y, class_axes)

        # Partial FC sample of local rows (static size).
        if given:  # select_rows: the sample leads the gathered rows
            rows = given[0][:num_sampled]
            w_blk = w_loc[:num_sampled]
            sampled, row_mask, overflow = given[1], given[2], given[3]
        elif sampling:
            rows, _, positive, sampled = _sample_local(key, shard, local_y_c, owned, rows_real,
                                                       num_sampled, 0)
            w_blk = w_loc[rows]
            overflow = jnp.sum(positive & ~sampled).astype(jnp.int32)
            row_mask = (sampled | positive) & rows_real
            sampled = sampled & rows_real
        else:
            rows = jnp.arange(num_local)
            w_blk = w_loc
            sampled = row_mask = rows_real
            overflow = jnp.zeros((), jnp.int32)
        if class_axes and not given:
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
        # Metrics, not differentiated: p_y from the softmax statistics above, and
        # the nearest non-target centre reduced over the shards like the row maxima.
        target_prob = jax.lax.stop_gradient(jnp.exp(tgt - m) / sumexp)
        nearest = jnp.max(jnp.where(keep, jax.lax.stop_gradient(cos), -jnp.inf), axis=1)
        if class_axes:
            nearest = jax.lax.pmax(nearest, class_axes)
        aux = HeadAux(row_mask=row_mask, sampled=sampled, num_overflow=overflow,
                      target_cosine=cos_y, target_prob=target_prob, nearest_cosine=nearest)
        # Batch axes that W is replicated over: every replica computed the same values
        # from the gathered batch (pmean's transpose gives each replica 1/n of the
        # cotangent, the all-gather's transpose sums them back).
        return _replicated((loss, aux), replica_axes)

    cspec = P(class_axes or None)
    bspec = P(batch_axes or None)
    given = () if rows is None else (rows.rows, rows.sampled, rows.row_mask, rows.num_overflow)
    in_specs = (P(batch_axes or None, None), P(class_axes or None, None), bspec, P(),
                jax.tree.map(lambda _: P(), array_params),
                () if rows is None else (cspec, cspec, cspec, P()))
    out_specs = (P(), HeadAux(row_mask=cspec, sampled=cspec, num_overflow=P(),
                              target_cosine=P(), target_prob=P(), nearest_cosine=P()))
    loss, aux = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
        embeddings, weight, labels.astype(jnp.int32), rng, array_params, given)
    return (loss, aux) if return_aux else loss
