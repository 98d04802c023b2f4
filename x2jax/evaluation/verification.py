"""Pair verification (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) by insightface's protocol.

Protocol (insightface ``recognition/arcface_torch/eval/verification.py``):

1. embed every image and its horizontal flip, add the two embeddings
   (:func:`embed_images`);
2. L2-normalise, squared Euclidean distance ``d = ||e1 - e2||^2`` in [0, 4]
   between the two members of each pair (pairs are consecutive rows);
3. thresholds ``np.arange(0, 4, 0.01)``; the pairs are cut into ``folds``
   contiguous folds (scikit-learn ``KFold(folds, shuffle=False)``); for each fold
   the threshold with the best accuracy on the other folds (first maximum) is
   applied to the fold, predicting "same" where ``d < threshold``;
4. report mean and std (population) of the fold accuracies, plus the ROC
   (TPR/FPR per threshold on the test folds, averaged over folds) and
   VAL@FAR=1e-3: thresholds ``np.arange(0, 4, 0.001)``, on the train folds the
   threshold reaching FAR = 1e-3 by linear interpolation of threshold against
   FAR (0 if FAR never reaches 1e-3), VAL and FAR measured on the test fold.

Everything after the embedding is float64 numpy and counts with sorted
distances and ``searchsorted`` (exactly the counts of ``d < threshold``), so it
reproduces insightface's loops without scikit-learn or SciPy.

Two deliberate differences, both where insightface fails rather than answers:
* insightface's VAL interpolation calls ``scipy.interpolate.interp1d(far,
  thresholds, kind='slinear')``, which SciPy >= 1.9 rejects because ``far``
  repeats values ("Expect x to not have duplicates", insightface issue #2152).
  Here the interpolation is the one older SciPy computed (a degree-1 B-spline
  on the sorted FAR values): between two distinct FAR values it joins the last
  threshold of the lower plateau to the first threshold of the upper one.
* a fold without positive (or negative) pairs gives VAL (or FAR) = NaN where
  insightface divides by zero.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypedDict

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from x2jax.parallel.mesh import mesh_axis_size
from x2jax.parallel.sharding import DEFAULT_RULES, batch_sharding, replicated

THRESHOLDS = np.arange(0, 4, 0.01)
"""Accuracy/ROC thresholds on the squared distance (insightface)."""
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
"""Finer thresholds used to find the FAR = ``far_target`` threshold (insightface)."""
FAR_TARGET = 1e-3


class VerificationResult(TypedDict):
    """Result of :func:`verification_accuracy` (all float64; arrays are numpy)."""

    accuracy: float  # mean of fold accuracies
    accuracy_std: float  # population std (np.std) of fold accuracies
    fold_accuracies: np.ndarray  # (folds,)
    best_thresholds: np.ndarray  # (folds,) threshold chosen on each fold's train part
    threshold: float  # mean of best_thresholds
    val: float  # VAL (TAR) at FAR = far_target, mean over folds
    val_std: float
    far: float  # FAR actually reached on the test folds, mean
    tpr: np.ndarray  # (T,) ROC over THRESHOLDS, mean over test folds
    fpr: np.ndarray  # (T,)
    thresholds: np.ndarray  # (T,) == THRESHOLDS


# ----------------------------------------------------------------------------
# Protocol (numpy, float64)
# ----------------------------------------------------------------------------


def kfold_splits(num_pairs: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of ``KFold(folds, shuffle=False)``.

    The first ``num_pairs % folds`` test folds hold one extra pair; ``folds == 1``
    uses every pair for both (insightface's ``LFold``).
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    indices = np.arange(num_pairs)
    if folds == 1:
        return [(indices, indices)]
    if num_pairs < folds:
        raise ValueError(f"cannot split {num_pairs} pairs into {folds} folds (need at least one pair per fold)")
    sizes = np.full(folds, num_pairs // folds, dtype=np.int64)
    sizes[: num_pairs % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [
        (np.concatenate([indices[: bounds[i]], indices[bounds[i + 1] :]]), indices[bounds[i] : bounds[i + 1]])
        for i in range(folds)
    ]


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Number of values ``v < t`` for each threshold t (values sorted ascending)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _split_sorted(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.sort(dist[issame]), np.sort(dist[~issame])


def _accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """(tpr, fpr, acc) for every threshold: predict same where ``dist < thr``."""
    pos, neg = _split_sorted(dist, issame)
    tp = _count_below(pos, thresholds)
    fp = _count_below(neg, thresholds)
    tn = neg.size - fp
    tpr = tp / pos.size if pos.size else np.zeros(thresholds.shape)
    fpr = fp / neg.size if neg.size else np.zeros(thresholds.shape)
    acc = (tp + tn) / dist.size
    return tpr, fpr, acc


def _interp_threshold(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at ``far_target`` by degree-1 B-spline interpolation of thresholds over FAR.

    ``far`` is non-decreasing (it counts distances below growing thresholds) and
    may repeat values. Between distinct FAR values x_lo < target < x_hi the line
    joins the LAST threshold of the x_lo plateau to the FIRST of the x_hi one; a
    target equal to an inner FAR value gives the last threshold of its plateau,
    and a target equal to the largest FAR the first threshold of that plateau
    (what ``interp1d(kind='slinear')`` gave before SciPy rejected duplicates).
    """
    n = far.size
    lo = int(np.searchsorted(far, far_target, side="right")) - 1
    if lo >= n - 1:  # target == max(far): last non-degenerate interval, its right end
        lo = int(np.searchsorted(far, far_target, side="left")) - 1
    if lo < 0:
        raise ValueError(f"far_target {far_target} is below the smallest FAR {far[0]}")
    hi = lo + 1
    x_lo, x_hi = far[lo], far[hi]
    return float(thresholds[lo] + (far_target - x_lo) * (thresholds[hi] - thresholds[lo]) / (x_hi - x_lo))


def _val_far(dist: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    pos, neg = _split_sorted(dist, issame)
    val = _count_below(pos, threshold) / pos.size if pos.size else np.nan
    far = _count_below(neg, threshold) / neg.size if neg.size else np.nan
    return float(val), float(far)


def verification_from_distances(
    dist: np.ndarray, issame: np.ndarray, *, folds: int = 10, far_target: float = FAR_TARGET
) -> VerificationResult:
    """The 10-fold protocol on squared distances ``dist`` (N,) and labels ``issame`` (N,)."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame)
    if dist.ndim != 1 or issame.shape != dist.shape:
        raise ValueError(f"dist and issame must be 1-D of equal length, got {dist.shape} and {issame.shape}")
    if issame.dtype != np.bool_:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame must be boolean (or 0/1)")
        issame = issame.astype(bool)
    if not np.isfinite(dist).all():
        raise ValueError(f"{int((~np.isfinite(dist)).sum())} pair distances are not finite (NaN/inf embeddings?)")

    splits = kfold_splits(dist.size, folds)
    tprs = np.zeros((folds, THRESHOLDS.size))
    fprs = np.zeros((folds, THRESHOLDS.size))
    accuracies = np.zeros(folds)
    best_thresholds = np.zeros(folds)
    vals = np.zeros(folds)
    fars = np.zeros(folds)
    for i, (train, test) in enumerate(splits):
        _, _, acc_train = _accuracy_curve(dist[train], issame[train], THRESHOLDS)
        best = int(np.argmax(acc_train))  # first maximum, as np.argmax in insightface
        tprs[i], fprs[i], acc_test = _accuracy_curve(dist[test], issame[test], THRESHOLDS)
        accuracies[i] = acc_test[best]
        best_thresholds[i] = THRESHOLDS[best]

        train_neg = np.sort(dist[train][~issame[train]])
        if train_neg.size == 0:
            vals[i] = fars[i] = np.nan
            continue
        far_train = _count_below(train_neg, VAL_THRESHOLDS) / train_neg.size
        if far_train.max() >= far_target:
            val_threshold = _interp_threshold(far_train, VAL_THRESHOLDS, far_target)
        else:
            val_threshold = 0.0
        vals[i], fars[i] = _val_far(dist[test], issame[test], val_threshold)

    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        fold_accuracies=accuracies,
        best_thresholds=best_thresholds,
        threshold=float(np.mean(best_thresholds)),
        val=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0),
        thresholds=THRESHOLDS.copy(),
    )


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of L2-normalised consecutive rows: (2N, D) -> (N,).

    A zero row stays zero (as ``sklearn.preprocessing.normalize``).
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, D) with pairs in consecutive rows, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        raise ValueError(f"{bad.size} embedding rows are not finite (first: row {bad[0]})")
    norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
    norms[norms == 0.0] = 1.0
    emb = emb / norms[:, None]
    return np.sum(np.square(emb[0::2] - emb[1::2]), axis=1)


def verification_accuracy(
    embeddings: np.ndarray, issame: np.ndarray, *, folds: int = 10, far_target: float = FAR_TARGET
) -> VerificationResult:
    """insightface's verification protocol on flip-summed embeddings.

    Args:
      embeddings: (2N, D) float, pair i is rows 2i and 2i+1, already the sum of the
        image's and its flip's embedding (not necessarily normalised).
      issame: (N,) bool.
      folds: number of contiguous folds (10 in every published number).
    Returns:
      :class:`VerificationResult` (a dict).
    """
    issame = np.asarray(issame)
    shape = np.shape(embeddings)
    if len(shape) != 2 or shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, D) with pairs in consecutive rows, got shape {shape}")
    emb_rows = shape[0]
    if issame.ndim != 1 or emb_rows != 2 * issame.shape[0]:
        raise ValueError(
            f"pair count mismatch: {emb_rows} embeddings need {emb_rows / 2:g} issame labels, got {issame.shape}"
        )
    return verification_from_distances(pair_distances(embeddings), issame, folds=folds, far_target=far_target)


# ----------------------------------------------------------------------------
# Embedding (JAX)
# ----------------------------------------------------------------------------

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def normalize_images(images_uint8: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1]."""
    return (images_uint8.astype(jnp.float32) / 255.0 - 0.5) / 0.5


@functools.partial(jax.jit, static_argnums=0)
def _flip_sum_embed(apply_fn: ApplyFn, variables: Any, images_uint8: jax.Array) -> jax.Array:
    """Embedding of each image plus that of its horizontal flip, (B, H, W, 3) -> (B, E) float32."""
    x = normalize_images(images_uint8)
    b = x.shape[0]
    # Each image next to its flip, (B, 2, H, W, 3) -> (2B, ...): a batch split over devices
    # stays split the same way (no all-to-all, which concatenating the flips after the batch needs).
    both = apply_fn(variables, jnp.stack([x, x[:, :, ::-1, :]], axis=1).reshape(2 * b, *x.shape[1:]))
    return jnp.sum(both.reshape(b, 2, *both.shape[1:]), axis=1).astype(jnp.float32)


def embed_images(
    apply_fn: ApplyFn,
    variables: Any,
    images_uint8: np.ndarray,
    batch_size: int = 128,
    *,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Flip-summed embeddings of uint8 images, batched and jitted.

    ``emb(x) = f(n(x)) + f(n(flip(x)))`` with ``n(x) = (x / 255 - 0.5) / 0.5`` and
    ``flip`` mirroring the width axis; ``f(v) = apply_fn(variables, v)`` maps float
    (B, H, W, 3) to (B, E). The last batch is zero-padded to ``batch_size`` (one
    compiled shape) and the padding rows are dropped.

    With ``mesh``, each batch is split over the mesh's batch axes
    (:func:`x2jax.parallel.batch_sharding`, the ``"data"`` axis) and the
    variables are replicated; ``batch_size`` must then be a multiple of the
    number of batch shards. ``apply_fn`` is a static jit argument: pass the same
    object (e.g. one ``module.apply``) between calls to reuse the compilation.

    Returns float32 numpy (num_images, E).
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to embed")
    in_sharding = None
    if mesh is not None:
        axes = DEFAULT_RULES.batch
        missing = [a for a in axes if a not in mesh.axis_names]
        if missing:
            raise ValueError(f"mesh has no {missing[0]!r} axis: {mesh.axis_names}")
        shards = mesh_axis_size(mesh, axes)
        if batch_size % shards:
            names = " x ".join(repr(a) for a in axes)
            raise ValueError(f"batch_size {batch_size} is not a multiple of the mesh {names} axis size {shards}")
        in_sharding = batch_sharding(mesh)
        variables = jax.device_put(variables, replicated(mesh))

    outputs = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]), np.uint8)])
        batch = jax.device_put(batch, in_sharding) if in_sharding is not None else batch
        outputs.append((_flip_sum_embed(apply_fn, variables, batch), valid))  # dispatched asynchronously
    result = np.concatenate([np.asarray(out)[:valid] for out, valid in outputs], axis=0)
    chex.assert_shape(result, (n, None))
    return result
