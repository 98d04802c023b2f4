"""From ``config.data`` / ``config.eval`` to a training source and verification sets.

The one place where config names meet ``x2jax.data`` (``get_train_source``) and
``x2jax.evaluation.sets`` (``open_verification_sets``, shared with ``eval.py``):

=================  ==========================================  =====================
``data.name``      source                                      ``data.path``
=================  ==========================================  =====================
synthetic          generated in memory (``data.variant``)      --
insightface_rec    ``train.rec`` / ``train.idx`` / ``property``  the folder
image_folder       ``root/<identity>/<image>``                 the root
tfds               a TFDS ArrayRecord dataset                  ``builder/config``
=================  ==========================================  =====================

Eval set ``synthetic`` is the held-out split of the synthetic training config
(``synthetic_hard`` / ``synthetic_easy``: its hard / easy negative halves, with families);
any other name is ``<eval.data_dir>/<name>.bin`` (or a prepared TFDS
``face_verification/<name>`` there), resized to the training image size
(:mod:`x2jax.evaluation.sets`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from x2jax import data as x2data
from x2jax.evaluation import sets as eval_sets


def synthetic_overrides(data_cfg: Any) -> dict[str, Any]:
    """Overrides of the synthetic variant: non-zero sizes (``data.num_identities`` ...) and
    families / long tail (``data.family_size``, ``family_similarity``, ``zipf_exponent``) off their defaults."""
    return dict(eval_sets.SyntheticSetRef.from_data_config(data_cfg).overrides)


@dataclasses.dataclass
class TrainData:
    source: Any
    num_classes: int
    image_size: int
    data_cfg: Any
    seed: int

    def make_iterator(self, *, batch_size: int, shard_index: int, shard_count: int):
        """Endless per-process iterator of {'image' f32 (B,S,S,3), 'label' i32 (B,)}; checkpointable."""
        return x2data.make_train_loader(
            self.source,
            batch_size=batch_size,
            seed=self.seed,
            shard_index=shard_index,
            shard_count=shard_count,
            flip=bool(self.data_cfg.flip),
            worker_count=int(self.data_cfg.worker_count),
            on_corrupt=self.data_cfg.on_corrupt,
        )


def open_train_data(data_cfg: Any, *, seed: int) -> TrainData:
    """The training source named by ``data.name`` (table in the module docstring)."""
    path = os.path.expanduser(data_cfg.path) if data_cfg.path else None
    if data_cfg.name == "synthetic":
        src = x2data.get_train_source(f"synthetic_{data_cfg.variant}", **synthetic_overrides(data_cfg))
    elif data_cfg.name == "insightface_rec":
        src = x2data.get_train_source("insightface_rec", data_dir=path)
    elif data_cfg.name == "image_folder":
        src = x2data.get_train_source("folder", data_dir=path)
    elif data_cfg.name == "tfds":
        tfds_dir = os.path.expanduser(data_cfg.tfds_data_dir) if data_cfg.tfds_data_dir else None
        src = x2data.get_train_source(f"tfds:{data_cfg.path}", data_dir=tfds_dir)
    else:
        raise ValueError(f"data.name {data_cfg.name!r} unknown")
    height, width = src.image_size
    if height != width:
        raise ValueError(f"{data_cfg.name}: images must be square, got {height}x{width}")
    return TrainData(src.source, src.num_classes, int(height), data_cfg, seed)


def open_verification_sets(
    names: list[str], *, data_dir: str, data_config: Any, image_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (images uint8 (2N, S, S, 3), issame bool (N,))}`` for the eval set names.

    Args:
      names: ``synthetic`` and/or ``.bin`` / TFDS set names under ``data_dir``.
      data_dir: ``eval.data_dir`` ("" = the current directory).
      data_config: ``config.data``; names the held-out synthetic identities.
      image_size: the training image size; other sizes are resized to it.

    Raises:
      ValueError: ``synthetic`` is asked for but ``data.name`` is not synthetic.
      FileNotFoundError: a set is not under ``data_dir``.
    """
    wants_synthetic = any(name in eval_sets.SYNTHETIC_NAMES for name in names)
    synthetic = eval_sets.SyntheticSetRef.from_data_config(data_config) if wants_synthetic else None
    return eval_sets.open_verification_sets(names, data_dir=data_dir, image_size=image_size, synthetic=synthetic)
