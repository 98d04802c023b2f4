"""Random-access training sources (grain ``RandomAccessDataSource`` protocol).

Every source has ``len(source)``, ``source[i] -> {'image', 'label', 'key'}``
and the attributes ``num_classes`` and ``image_size`` (H, W):

- ``image``: encoded bytes (JPEG / PNG) or a decoded RGB uint8 (H, W, 3) array;
- ``label``: int identity in ``[0, num_classes)``;
- ``key``: a string naming the record (file + record key / path) for errors.

``image_size_origin`` names where ``image_size`` comes from (for error
messages). A source with no records raises :class:`EmptyDatasetError` naming
its path when opened.

Sources hold no open file handles across pickling, so grain worker processes
(spawned) can use them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from x2jax.data import recordio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


class RecordIOSource:
    """insightface ``train.rec`` / ``train.idx`` / ``property`` folder, read without MXNet."""

    def __init__(self, directory: str | os.PathLike, *, prefix: str = "train", labels_from: str = "auto"):
        self.directory = os.fspath(directory)
        self.info = recordio.read_insightface_rec(self.directory, prefix=prefix, labels_from=labels_from)
        require_images_in_rec(self.info)
        self.num_classes = self.info.num_classes
        self.image_size = self.info.image_size
        prop = os.path.join(self.directory, "property")
        self.image_size_origin = (
            prop if os.path.isfile(prop) else f"the default: no property file in {self.directory}"
        )
        self._reader = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def _rec(self) -> recordio.MXIndexedRecordIO:
        if self._reader is None:
            self._reader = self.info.reader()
        return self._reader

    def __len__(self) -> int:
        return len(self.info.image_keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Raises ``RecordIOError`` naming file, record key and byte offset on a bad frame."""
        key = int(self.info.image_keys[index])
        name = f"{self.info.rec_path} record {key}"
        rec = self._rec()
        try:
            _, payload = recordio.unpack(rec.read_idx(key))
        except recordio.RecordIOError as e:
            reason = f".idx offset {rec.idx.get(key)}: {e.reason}"
            raise recordio.RecordIOError(
                f"{name}: {reason}", reason=reason, offset=e.offset, record_key=name
            ) from e
        return {"image": payload, "label": int(self.info.labels[index]), "key": name}


def require_images_in_rec(info: recordio.InsightFaceRec) -> None:
    """Raises :class:`EmptyDatasetError` (naming the .rec) when ``info`` lists no image records."""
    if len(info.image_keys):
        return
    with open(info.idx_path) as f:
        num_records = sum(1 for line in f if line.strip())
    raise EmptyDatasetError(
        f"{info.rec_path}: the dataset is empty: no image records ({info.idx_path} lists "
        f"{num_records} record(s), none of them an image)"
    )


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``root/<identity>/<image>`` -> (paths, labels int32, identity names).

    Identities are the sorted sub-directory names (label = position); images
    the sorted files with an image extension. Raises if root is missing or empty.
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
    """``root/<identity>/<image>.jpg`` (the official X2-Softmax layout)."""

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


class TfdsSource:
    """A ``tfds.data_source`` split whose examples have 'image' (bytes) and 'label'.

    Opened with ``SkipDecoding`` on the image so decoding (and the corrupt-image
    policy) stays in the loader.
    """

    def __init__(
        self,
        name: str,
        *,
        data_dir: str | os.PathLike | None,
        split: str = "train",
        num_classes: int | None = None,
        image_size: tuple[int, int] | None = None,
        builder_kwargs: dict[str, Any] | None = None,
        download_and_prepare_kwargs: dict[str, Any] | None = None,
    ):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        # Importing registers our builders with TFDS.
        from x2jax.data import tfds_builders  # noqa: F401  pylint: disable=unused-import

        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self._kwargs = dict(
            builder_kwargs=builder_kwargs, download_and_prepare_kwargs=download_and_prepare_kwargs
        )
        builder = tfds.builder(name, data_dir=self.data_dir, **(builder_kwargs or {}))
        if not builder.is_prepared():
            builder.download_and_prepare(**(download_and_prepare_kwargs or {}))
        meta = dict(builder.info.metadata or {})
        self.num_classes = int(num_classes if num_classes is not None else meta["num_classes"])
        size = image_size if image_size is not None else meta.get("image_size", (112, 112))
        self.image_size = tuple(int(s) for s in size)
        self.image_size_origin = (
            "TfdsSource's image_size argument" if image_size is not None else f"the TFDS metadata of {name}"
        )
        self._source = None
        self._len = None
        self._open()
        if self._len == 0:
            raise EmptyDatasetError(
                f"tfds {name} split {split!r} in {builder.data_dir}: the dataset is empty (0 records)"
            )

    def _open(self):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        # Importing registers our builders with TFDS.
        from x2jax.data import tfds_builders  # noqa: F401  pylint: disable=unused-import

        builder = tfds.builder(self.name, data_dir=self.data_dir, **(self._kwargs["builder_kwargs"] or {}))
        self._source = builder.as_data_source(
            split=self.split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        self._len = len(self._source)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            self._open()
        ex = self._source[index]
        return {
            "image": ex["image"],
            "label": int(ex["label"]),
            "key": f"tfds {self.name}[{self.split}][{index}]",
        }
