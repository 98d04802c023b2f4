"""From ``config.data`` / ``config.eval`` to a training source and verification sets.

The one place where config names meet ``x2jax.data``: ``open_train_data`` returns
the random-access source with its class count and image size and builds the
per-process grain iterator; ``open_verification_sets`` loads the pairs used for
periodic verification (held-out synthetic identities or insightface ``.bin`` sets).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from x2jax.data import synthetic
from x2jax.data.pipeline import make_train_loader
from x2jax.data.sources import ArraySource, ImageFolderSource, RecordIOSource
from x2jax.data.verification_bin import load_bin


def synthetic_config(data_cfg: Any) -> synthetic.SyntheticConfig:
    """The synthetic dataset config named by ``data.variant`` with the non-zero overrides."""
    overrides = {
        k: int(data_cfg[k]) for k in ("num_identities", "images_per_identity", "image_size") if data_cfg[k] > 0
    }
    return synthetic.get_config(data_cfg.variant, **overrides)


@dataclasses.dataclass
class TrainData:
    source: Any
    num_classes: int
    image_size: int
    data_cfg: Any
    seed: int

    def make_iterator(self, *, batch_size: int, shard_index: int, shard_count: int):
        """Endless per-process iterator of {'image' f32 (B,S,S,3), 'label' i32 (B,)}; checkpointable."""
        return make_train_loader(
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
    """Training source for ``data.name`` in ('synthetic', 'insightface_rec', 'image_folder')."""
    if data_cfg.name == "synthetic":
        cfg = synthetic_config(data_cfg)
        images, labels = synthetic.generate_train(cfg)
        source = ArraySource(images, labels, num_classes=cfg.num_identities, name=f"synthetic/{data_cfg.variant}")
    elif data_cfg.name == "insightface_rec":
        source = RecordIOSource(os.path.expanduser(data_cfg.path))
    elif data_cfg.name == "image_folder":
        source = ImageFolderSource(os.path.expanduser(data_cfg.path))
    else:
        raise ValueError(f"data.name {data_cfg.name!r} unknown")
    height, width = source.image_size
    if height != width:
        raise ValueError(f"{data_cfg.name}: images must be square, got {height}x{width}")
    return TrainData(source, int(source.num_classes), int(height), data_cfg, seed)


def open_verification_sets(
    names: list[str], *, data_dir: str, data_config: Any, image_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (images uint8 (2N, S, S, 3), issame bool (N,))}``.

    'synthetic' is the verification split of the synthetic training config (held-out
    identities); any other name is ``<data_dir>/<name>.bin`` resized to the training size.
    """
    sets = {}
    for name in names:
        if name == "synthetic":
            if data_config.name != "synthetic":
                raise ValueError("eval set 'synthetic' needs data.name='synthetic'")
            sets[name] = synthetic.generate_verification(synthetic_config(data_config))
        else:
            path = Path(os.path.expanduser(data_dir or "")) / f"{name}.bin"
            sets[name] = load_bin(path, image_size=(image_size, image_size))
    return sets
