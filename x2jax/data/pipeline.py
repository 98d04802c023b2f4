"""Deterministic, resumable, per-process-sharded training loader (grain).

Stream (one per process)::

  epoch e: global permutation P_e of the source (numpy, seeded by (seed, e),
           the same on every process); process i of n takes positions i, n + i, 2n + i, ... of
           P_e, ``len(source) // n`` records (the remainder is dropped, a
           different one every epoch), so processes are disjoint and equal.
  -> decode (:func:`x2jax.data.images.decode_image`, or an already decoded array)
  -> random horizontal flip (p = 0.5, a splitmix64 hash of (seed, shard, position))
  -> batch ``batch_size`` records, skipping corrupt ones (or raising): undecodable,
     of the wrong size, or unreadable (a RecordIO framing error)
  -> normalise ``(x / 255 - 0.5) / 0.5`` to float32 (:func:`x2jax.data.images.normalize`, in
     the consuming process: worker processes send uint8 batches, a quarter of the bytes)

Epochs are concatenated (a batch may straddle two epochs); ``num_epochs=None``
is endless; with a finite count the last partial batch is dropped.

Batches: ``{'image': float32 (B, H, W, 3), 'label': int32 (B,)}``.
The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()``
and Orbax save / restore via :func:`checkpoint_save_args` /
:func:`checkpoint_restore_args` (grain's handler). A restored iterator yields
exactly the batches the original would have yielded next, given the same
source, seed, batch size, shards and ``worker_count``.

Corrupt data: skipped records are counted (``num_skipped``) and logged at
most once per ``LOG_EVERY_S`` seconds. When ``max_consecutive_corrupt``
(default 1,000) records in a row, or one epoch of the shard if that is fewer,
are all corrupt, :class:`NoUsableRecordsError` says why instead of looping
forever. A batch ends on a good record, so the run of corrupt records is never
part of the checkpointed state.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any

import grain
import numpy as np

from x2jax.data.images import decode_image, normalize
from x2jax.data.recordio import RecordIOError
from x2jax.data.sources import ArraySource, EmptyDatasetError

log = logging.getLogger(__name__)

_SKIPPED = "num_skipped"
MAX_CONSECUTIVE_CORRUPT = 1000
LOG_EVERY_S = 10.0  # at most one "skipped N corrupt records" line per interval (after the first)


class CorruptImageError(ValueError):
    """A training record could not be read or decoded, or has the wrong size."""


class NoUsableRecordsError(ValueError):
    """Every record in a long run was corrupt: no batch can be made (the message says why)."""


# ---------------------------------------------------------------------------
# Index space: per-epoch global shuffle, then a strided per-process shard.
class _EpochShardDataset(grain.MapDataset):
    """Position k of shard i reads record ``P_e[(k % per) * n + i]``, ``e = k // per``.

    ``P_e = np.random.default_rng([seed, e]).permutation(L)``: the same on every
    process, a new one each epoch (the latest two are cached).
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        seed: int,
        shard_index: int,
        shard_count: int,
        num_epochs: int | None,
    ):
        super().__init__(parent)
        self._len_source = len(parent)
        self._seed = seed
        self._shard_index = shard_index
        self._shard_count = shard_count
        self._per_shard = self._len_source // shard_count
        self._num_epochs = num_epochs
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        if self._per_shard == 0:
            raise ValueError(
                f"source of {self._len_source} records is smaller than shard_count={shard_count}"
            )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        if self._num_epochs is None:
            return sys.maxsize
        return self._per_shard * self._num_epochs

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            with self._lock:
                perm = self._perms.get(epoch)
                if perm is None:
                    # int32 halves the memory of 42M-image permutations; same order as permutation(L).
                    dtype = np.int32 if self._len_source < 2**31 else np.int64
                    perm = np.arange(self._len_source, dtype=dtype)
                    np.random.default_rng([self._seed, epoch]).shuffle(perm)
                    self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
                    self._perms[epoch] = perm
        return perm

    def source_index(self, k: int) -> int:
        epoch, j = divmod(k, self._per_shard)
        return int(self._permutation(epoch)[j * self._shard_count + self._shard_index])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.source_index(index)]

    def __str__(self) -> str:
        return (
            f"_EpochShardDataset(shard={self._shard_index}/{self._shard_count}, "
            f"per_shard={self._per_shard}, num_epochs={self._num_epochs})"
        )


def shard_positions(
    num_records: int, *, seed: int, shard_index: int, shard_count: int, epoch: int
) -> np.ndarray:
    """The source indices shard ``shard_index`` reads in ``epoch`` (for tests / audits)."""
    sharded = _EpochShardDataset(
        grain.MapDataset.range(num_records),
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=None,
    )
    per = num_records // shard_count
    return np.array([sharded.source_index(epoch * per + j) for j in range(per)], np.int64)


# ---------------------------------------------------------------------------
# Per-record transforms (run in worker processes when worker_count > 0).
_MASK64 = (1 << 64) - 1


def flip_bit(seed: int, index: int) -> bool:
    """Deterministic fair coin for stream position ``index`` (splitmix64 of seed, index)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return bool((z ^ (z >> 31)) & 1)


class _DecodeFlip:
    """(position, record) -> {'image': uint8 (H, W, 3) or None, 'label', 'key', 'error', ...}.

    Decodes, checks the size, and mirrors the image when ``flip_bit(flip_seed, position)``.
    A corrupt record has ``error`` (the reason), ``error_kind`` ('read', 'decode'
    or 'size') and, for 'size', ``found_size`` ('HxW').
    """

    def __init__(self, image_size: tuple[int, int] | None, on_corrupt: str, flip_seed: int | None):
        self.image_size = None if image_size is None else tuple(image_size)
        self.on_corrupt = on_corrupt
        self.flip_seed = flip_seed

    def __call__(self, position: int, record: dict[str, Any]) -> dict[str, Any]:
        key = record.get("key", "?")
        error, kind, found = record.get("error"), record.get("error_kind", "read"), None
        decoded = None
        if error is None:
            image = record["image"]
            try:
                if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
                    decoded = image
                else:
                    kind = "decode"
                    decoded = decode_image(bytes(image))
                if self.image_size is not None and decoded.shape[:2] != self.image_size:
                    kind, found = "size", "x".join(map(str, decoded.shape[:2]))
                    raise ValueError(f"image size {found} != expected {'x'.join(map(str, self.image_size))}")
            except ValueError as e:
                error, decoded = str(e), None
        if error is not None:
            if self.on_corrupt == "raise":
                raise CorruptImageError(f"{key}: {error}")
            return {
                "image": None,
                "label": np.int32(-1),
                "key": key,
                "error": error,
                "error_kind": kind,
                "found_size": found,
            }
        if self.flip_seed is not None and flip_bit(self.flip_seed, position):
            decoded = decoded[:, ::-1]
        return {"image": decoded, "label": np.int32(record["label"]), "key": key, "error": None}


class _GuardedSource:
    """``source[i]``; a read error (``RecordIOError``, ``CorruptImageError``) becomes an error record."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._source[index]
        except (RecordIOError, CorruptImageError) as e:
            key = getattr(e, "record_key", None)
            if key is None:
                key, error = f"{type(self._source).__name__}[{index}]", str(e)
            else:
                error = getattr(e, "reason", str(e))
            return {"image": None, "label": -1, "key": key, "error": error, "error_kind": "read"}


# ---------------------------------------------------------------------------
# Batching that skips corrupt records.
_KIND_LABELS = {"read": "unreadable record", "decode": "undecodable image"}


def _signature(record: dict[str, Any]) -> str:
    if record.get("error_kind") == "size":
        return f"wrong size {record['found_size']}"
    return _KIND_LABELS.get(record.get("error_kind"), "corrupt record")


def _likely_cause(kinds: collections.Counter, context: dict[str, Any]) -> str:
    expected = context.get("image_size")
    expected = "x".join(map(str, expected)) if expected else "?"
    origin = context.get("image_size_origin") or "the source's image_size"
    sizes = [k[len("wrong size ") :] for k in kinds if k.startswith("wrong size ")]
    if len(sizes) == len(kinds) == 1:
        fix = "correct the property file (num_classes,H,W)" if origin.endswith("property") else "resize them"
        return f"the images are {sizes[0]} but {expected} is expected (from {origin}): {fix}"
    if len(sizes) == len(kinds):
        return f"the images have sizes {', '.join(sizes)} but {expected} is expected (from {origin}): resize them"
    if set(kinds) == {"undecodable image"}:
        return (
            "the payloads are not images PIL can decode (JPEG / PNG): the wrong files, a .rec of "
            "raw arrays, or a damaged copy of the dataset"
        )
    if set(kinds) == {"unreadable record"}:
        return (
            "the records cannot be read: the .idx does not belong to this .rec (rebuild it), or "
            "the .rec is truncated or damaged"
        )
    return "the dataset is mostly corrupt, for the mixed reasons above: check (or re-copy) the files"


class _SkipBatchIterator(grain.DatasetIterator):
    """Batches good records; counts, logs (rate-limited) and skips corrupt ones.

    Raises :class:`NoUsableRecordsError` after ``max_consecutive`` corrupt
    records in a row (in this process or worker).
    """

    def __init__(
        self, parent: grain.DatasetIterator, batch_size: int, max_consecutive: int, context: dict[str, Any]
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._max_consecutive = max_consecutive
        self._context = context
        self._total = 0  # skipped by this iterator (not checkpointed; TrainLoaderIterator's is)
        self._since_log = 0
        self._last_log: float | None = None
        self._reset_run()

    def _reset_run(self) -> None:
        self._run = 0
        self._run_kinds: collections.Counter = collections.Counter()
        self._first: list[str] = []  # the run's first 3 reasons
        self._distinct: list[str] = []  # the run's first reason of each kind (3 at most)

    def _note_corrupt(self, record: dict[str, Any]) -> None:
        self._total += 1
        self._since_log += 1
        self._run += 1
        line = f"{record['key']}: {record['error']}"
        sig = _signature(record)
        self._run_kinds[sig] += 1
        if self._run_kinds[sig] == 1 and len(self._distinct) < 3:
            self._distinct.append(line)
        if len(self._first) < 3:
            self._first.append(line)
        now = time.monotonic()
        if self._last_log is None:
            log.warning(
                "skipping corrupt training record %s (further ones are counted, one line per %.0f s)",
                line,
                LOG_EVERY_S,
            )
            self._last_log, self._since_log = now, 0
        elif now - self._last_log >= LOG_EVERY_S:
            log.warning(
                "skipped %s corrupt training records in the last %.0f s (%s in all; last: %s)",
                f"{self._since_log:,}",
                now - self._last_log,
                f"{self._total:,}",
                line,
            )
            self._last_log, self._since_log = now, 0
        if self._run >= self._max_consecutive:
            raise self._starved_error()

    def _starved_error(self) -> NoUsableRecordsError:
        ctx = self._context
        examples = self._distinct + [x for x in self._first if x not in self._distinct]
        reasons = ", ".join(f"{n:,} {sig}" for sig, n in self._run_kinds.most_common())
        first = "".join(f"\n    {x}" for x in examples[:3])
        return NoUsableRecordsError(
            f"no usable training record in {self._run:,} consecutive records of shard "
            f"{ctx['shard_index']} of {ctx['shard_count']}: every one was corrupt and skipped "
            f"({self._total:,} skipped by this loader so far; the limit is "
            f"max_consecutive_corrupt={ctx['max_consecutive_corrupt']:,} or one epoch of the shard, "
            f"{ctx['per_shard']:,} records, whichever is smaller)"
            f"\n  reasons: {reasons}"
            f"\n  likely cause: {_likely_cause(self._run_kinds, ctx)}"
            f"\n  first skipped:{first}"
        )

    def __next__(self) -> dict[str, np.ndarray]:
        images, labels, skipped = [], [], 0
        while len(images) < self._batch_size:
            record = next(self._parent)  # StopIteration drops the partial batch
            if record["error"] is not None:
                skipped += 1
                self._note_corrupt(record)
                continue
            if self._run:
                self._reset_run()
            images.append(record["image"])
            labels.append(record["label"])
        # uint8 here: with worker processes a quarter of the bytes cross the process
        # boundary; TrainLoaderIterator normalises.
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32), _SKIPPED: np.int64(skipped)}

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._reset_run()


class _SkipBatchDataset(grain.IterDataset):
    def __init__(
        self, parent: grain.IterDataset, batch_size: int, max_consecutive: int, context: dict[str, Any]
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._max_consecutive = max_consecutive
        self._context = context

    def __iter__(self) -> _SkipBatchIterator:
        return _SkipBatchIterator(self._parent.__iter__(), self._batch_size, self._max_consecutive, self._context)


class TrainLoaderIterator(grain.DatasetIterator):
    """Yields ``{'image', 'label'}`` batches; ``num_skipped`` counts corrupt records.

    State: ``{'parent': <grain state>, 'num_skipped': int}`` (JSON).
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.num_skipped += int(batch.pop(_SKIPPED))
        batch["image"] = normalize(batch["image"])
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])


class _TrainLoaderDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> TrainLoaderIterator:
        return TrainLoaderIterator(self._parent.__iter__())


# ---------------------------------------------------------------------------
def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; scripts without absl.app need this."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(
    source,
    *,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    flip: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int | None = None,
    image_size: tuple[int, int] | None = None,
    on_corrupt: str = "skip",
    max_consecutive_corrupt: int = MAX_CONSECUTIVE_CORRUPT,
) -> grain.IterDataset:
    """The grain ``IterDataset`` behind :func:`make_train_loader` (same arguments)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if on_corrupt not in ("skip", "raise"):
        raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if max_consecutive_corrupt < 1:
        raise ValueError(f"max_consecutive_corrupt must be >= 1, got {max_consecutive_corrupt}")
    if len(source) == 0:
        where = next((getattr(source, a) for a in ("directory", "root", "name") if hasattr(source, a)), "")
        raise EmptyDatasetError(
            f"training source {type(source).__name__} {where}: the dataset is empty (0 records)"
        )
    if image_size is None:
        image_size = getattr(source, "image_size", None)
        image_size_origin = getattr(source, "image_size_origin", None)
    else:
        image_size_origin = "make_train_loader's image_size argument"
    if read_threads is None:
        # Decoded in-memory arrays: a thread hand-off costs more than the read itself.
        read_threads = 0 if isinstance(source, ArraySource) else 2
    ds = _EpochShardDataset(
        grain.MapDataset.source(_GuardedSource(source)),
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
    )
    flip_seed = (seed * 1_000_003 + shard_index) if flip else None
    ds = ds.map_with_index(_DecodeFlip(image_size, on_corrupt, flip_seed))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch_size, 16))
    )
    per_shard = len(source) // shard_count
    context = dict(
        image_size=image_size,
        image_size_origin=image_size_origin,
        shard_index=shard_index,
        shard_count=shard_count,
        per_shard=per_shard,
        max_consecutive_corrupt=max_consecutive_corrupt,
    )
    it_ds = _SkipBatchDataset(it_ds, batch_size, min(max_consecutive_corrupt, per_shard), context)
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return _TrainLoaderDataset(it_ds)


def make_train_loader(
    source,
    *,
    batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    flip: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    **kwargs,
) -> TrainLoaderIterator:
    """Iterator of per-process batches ``{'image': float32 (B,H,W,3), 'label': int32 (B,)}``.

    Args:
      source: random-access source with ``len`` and ``[i] -> {'image', 'label', 'key'}``
        (see :mod:`x2jax.data.sources`); its ``image_size`` (H, W) is enforced.
      batch_size: per-process batch size B.
      seed: shuffle / flip seed; identical on all processes.
      shard_index, shard_count: this process and the process count
        (``jax.process_index()``, ``jax.process_count()``).
      flip: random horizontal flip with p = 0.5.
      num_epochs: ``None`` for an endless stream.
      worker_count: grain worker processes (0: decode in threads of this
        process). Workers are spawned: scripts need an ``if __name__ ==
        "__main__":`` guard. The batch order depends on ``worker_count``: resume
        with the same value.
      kwargs: ``worker_buffer_size``, ``read_threads`` (threads decoding ahead in
        each process; default 2, 0 for an in-memory ``ArraySource``), ``image_size``,
        ``on_corrupt`` ('skip': count in ``iterator.num_skipped`` and log, at most
        one line per ``LOG_EVERY_S``; 'raise': ``CorruptImageError`` naming the
        record), ``max_consecutive_corrupt`` (default 1,000: that many corrupt
        records in a row, or one epoch of the shard if fewer, raise
        ``NoUsableRecordsError``; with workers, counted in each worker).

    Corrupt: undecodable, of another size than ``image_size``, or unreadable
    (a ``RecordIOError`` from the source: bad magic, wrong offset, truncated).
    An empty source raises ``EmptyDatasetError``.
    """
    ds = make_train_dataset(
        source,
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        flip=flip,
        num_epochs=num_epochs,
        worker_count=worker_count,
        **kwargs,
    )
    return iter(ds)


def steps_per_epoch(source, *, batch_size: int, shard_count: int) -> int:
    """Full batches per process per epoch (records per shard // batch_size)."""
    return (len(source) // shard_count) // batch_size


# ---------------------------------------------------------------------------
# Orbax checkpointing (grain's CheckpointHandler, registered with orbax args).
def checkpoint_save_args(iterator: grain.DatasetIterator):
    """Orbax args that save ``iterator``'s state, e.g. inside ``ocp.args.Composite``.

    ``manager.save(step, args=ocp.args.Composite(data=checkpoint_save_args(it), ...))``
    writes ``process_<i>-of-<n>.json`` (one per process).
    """
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator):
    """Orbax args that restore into ``iterator`` (a fresh loader built with the same args)."""
    return grain.checkpoint.CheckpointRestore(iterator)
