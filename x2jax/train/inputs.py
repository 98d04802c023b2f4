"""From ``config.data`` / ``config.eval`` to a training source and verification sets.

The one place where config names meet ``x2jax.data`` (whose entry points
``get_train_source`` / ``get_verification_sets`` do the work):

=================  ==========================================  =====================
``data.name``      source                                      ``data.path``
=================  ==========================================  =====================
synthetic          generated in memory (``data.variant``)      --
insightface_rec    ``train.rec`` / ``train.idx`` / ``property``  the folder
image_folder       ``root/<identity>/<image>``                 the root
tfds               a TFDS ArrayRecord dataset                  ``builder/config``
=================  ==========================================  =====================

Eval set ``synthetic`` is the held-out split of the synthetic training config;
any other name is ``<eval.data_dir>/<name>.bin`` (or a prepared TFDS
``face_verification/<name>`` there), resized to the training image size.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from x2jax import data as x2data


def synthetic_overrides(data_cfg: Any) -> dict[str, int]:
    """Non-zero size overrides of the synthetic variant (``data.num_identities`` ...)."""
    return {k: int(data_cfg[k]) for k in ("num_identities", "images_per_identity", "image_size") if data_cfg[k] > 0}


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
        src = x2data.get_train_source("rec", data_dir=path)
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
    """``{name: (images uint8 (2N, S, S, 3), issame bool (N,))}`` for the eval set names."""
    sets = {}
    for name in names:
        if name == "synthetic":
            if data_config.name != "synthetic":
                raise ValueError("eval set 'synthetic' needs data.name='synthetic'")
            variant = f"synthetic_{data_config.variant}"
            found = x2data.get_verification_sets(
                [variant], synthetic_overrides=synthetic_overrides(data_config)
            )[variant]
        else:
            found = x2data.get_verification_sets(
                [name], data_dir=os.path.expanduser(data_dir or "."), image_size=(image_size, image_size)
            )[name]
        sets[name] = found
    return sets
