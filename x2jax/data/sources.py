"""The training-source protocol (grain ``RandomAccessDataSource``) and the in-memory source.

Every source has ``len(source)``, ``source[i] -> {'image', 'label', 'key'}``
and the attributes ``num_classes`` and ``image_size`` (H, W):

- ``image``: encoded bytes (JPEG / PNG) or a decoded RGB uint8 (H, W, 3) array;
- ``label``: int identity in ``[0, num_classes)``;
- ``key``: a string naming the record (file + record key / path) for errors.

``image_size_origin`` names where ``image_size`` comes from (for error
messages). A source with no records raises :class:`EmptyDatasetError` naming
its path when opened.

Sources hold no open file handles across pickling, so grain worker processes
(spawned) can use them. The sources:

- :class:`ArraySource` (here): decoded arrays in memory (synthetic data);
- :class:`x2jax.data.insightface_rec.InsightFaceRecSource`: ``train.rec`` folders;
- :class:`x2jax.data.image_folder.ImageFolderSource`: ``root/<identity>/<image>``;
- :class:`x2jax.data.tfds_builders.TfdsSource`: a prepared TFDS dataset.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class EmptyDatasetError(ValueError):
    """A training dataset holds no images (the message names its path)."""


class ArraySource:
    """In-memory decoded images: uint8 (N, H, W, 3) and int labels (N,)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, num_classes: int | None = None, name: str = "array"
    ):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.shape[:1] == (0,):
            raise EmptyDatasetError(f"{name}: the dataset is empty (0 images)")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}: labels shape {labels.shape} != ({images.shape[0]},)")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{name}: labels outside [0, {self.num_classes})")
        self.image_size = tuple(images.shape[1:3])
        self.image_size_origin = f"the array shape of {name}"
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index]), "key": f"{self.name}[{index}]"}
