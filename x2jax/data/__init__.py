"""Data: insightface RecordIO and .bin without MXNet, synthetic faces, TFDS builders, loader.

Entry points for ``train.py`` / ``eval.py``::

  src = x2jax.data.get_train_source("synthetic_small")   # or "insightface_rec", data_dir=...
  it = x2jax.data.make_train_loader(src.source, batch_size=128, seed=0,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count())

Verification sets are opened by :func:`x2jax.evaluation.sets.open_verification_sets`.

Source names are listed in :mod:`x2jax.data.registry`. Modules: ``recordio``
(RecordIO framing), ``insightface_rec`` (the train.rec layout), ``images``
(the image codec), ``verification_bin``, ``synthetic``, ``sources``,
``image_folder``, ``pipeline`` (the loader), ``registry`` (names),
``tfds_builders`` (import it to register the TFDS builders).
"""

from __future__ import annotations

from x2jax._extras import require

require("train", "grain", "PIL", what="x2jax.data")

from x2jax.data import (
    image_folder,
    images,
    insightface_rec,
    pipeline,
    recordio,
    registry,
    sources,
    synthetic,
    verification_bin,
)
from x2jax.data.images import decode_image, encode_image, normalize, resize_image
from x2jax.data.insightface_rec import InsightFaceRecSource, read_insightface_rec, write_insightface_rec
from x2jax.data.pipeline import (
    checkpoint_restore_args,
    checkpoint_save_args,
    make_train_loader,
    steps_per_epoch,
)
from x2jax.data.registry import TrainSource, get_train_source
from x2jax.data.sources import EmptyDatasetError
from x2jax.data.synthetic import SyntheticConfig, generate_train, generate_verification
from x2jax.data.verification_bin import load_bin, write_bin

__all__ = [
    "TrainSource",
    "get_train_source",
    "make_train_loader",
    "checkpoint_save_args",
    "checkpoint_restore_args",
    "steps_per_epoch",
    "EmptyDatasetError",
    "decode_image",
    "encode_image",
    "normalize",
    "resize_image",
    "InsightFaceRecSource",
    "read_insightface_rec",
    "write_insightface_rec",
    "SyntheticConfig",
    "generate_train",
    "generate_verification",
    "load_bin",
    "write_bin",
    "image_folder",
    "images",
    "insightface_rec",
    "pipeline",
    "recordio",
    "registry",
    "sources",
    "synthetic",
    "verification_bin",
]
