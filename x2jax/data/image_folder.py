"""Image folders ``root/<identity>/<image>`` (the official X2-Softmax layout).

Identities are the sorted sub-directory names (label = position); images are
the sorted files with an extension in :data:`IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from x2jax.data.sources import EmptyDatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Lists the images of ``root/<identity>/<image>``.

    Args:
      root: the folder holding one sub-folder per identity.

    Returns:
      (image paths, labels int32, identity names).

    Raises:
      FileNotFoundError: ``root`` is not a folder.
      EmptyDatasetError: no images (the message names ``root``).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, name in enumerate(names):
        d = os.path.join(root, name)
        for f in sorted(os.listdir(d)):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(d, f))
                labels.append(label)
    if not paths:
        raise EmptyDatasetError(
            f"{root}: the dataset is empty: no images found in root/<identity>/<image> layout "
            f"(extensions {IMAGE_EXTENSIONS})"
        )
    return paths, np.asarray(labels, np.int32), names


class ImageFolderSource:
    """Training source over ``root/<identity>/<image>.jpg``; images are served as stored bytes.

    Args:
      root: the folder (see :func:`scan_image_folder`).
      image_size: (H, W) every image must have (others count as corrupt).
    """

    def __init__(self, root: str | os.PathLike, image_size: tuple[int, int] = (112, 112)):
        self.root = os.fspath(root)
        self.paths, self.labels, self.class_names = scan_image_folder(self.root)
        self.num_classes = len(self.class_names)
        self.image_size = tuple(image_size)
        self.image_size_origin = "ImageFolderSource's image_size argument, default 112x112"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        return {"image": data, "label": int(self.labels[index]), "key": path}
