"""insightface training folders: ``train.rec``, ``train.idx``, ``property``.

Layout on top of RecordIO (:mod:`x2jax.data.recordio`): record 0 has labels
``(first_identity_record, end_identity_record)``; images are records
``1 .. first_identity_record - 1`` labelled with their identity; identity
record ``first_identity_record + c`` has labels ``(start, end)``, the image
keys of identity ``c``. ``property`` holds ``num_classes,H,W``.

:func:`read_insightface_rec` reads that index (labels from the identity
records, or from every image header), :func:`write_insightface_rec` writes
it, and :class:`InsightFaceRecSource` serves the images to the loader.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Sequence

import numpy as np

from x2jax.data import images as codec
from x2jax.data.recordio import IRHeader, MXIndexedRecordIO, RecordIOError, pack, unpack
from x2jax.data.sources import EmptyDatasetError

LABEL_STRATEGIES = ("auto", "headers")
_EXACT_FLOAT32_INT = 2**24  # float32 labels stop being exact integers above this


@dataclasses.dataclass(frozen=True)
class InsightFaceRec:
    """An insightface dataset folder: image record keys and their int labels."""

    rec_path: str
    idx_path: str
    image_keys: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int32 (N,)
    num_classes: int
    image_size: tuple[int, int]  # (H, W) from `property`

    def reader(self) -> MXIndexedRecordIO:
        """A new indexed reader of the ``.rec``."""
        return MXIndexedRecordIO(self.idx_path, self.rec_path, "r")


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """Reads a ``property`` file.

    Args:
      path: the file, one line ``num_classes,H,W``.

    Returns:
      (num_classes, H, W).

    Raises:
      ValueError: another content (the message names the file).
    """
    path = os.fspath(path)
    text = open(path).read().strip()
    try:
        num_classes, h, w = (int(v) for v in text.split(","))
    except ValueError as e:
        raise ValueError(f"{path}: expected 'num_classes,H,W', got {text!r}") from e
    return num_classes, h, w


def _scalar_label(label: Any) -> float:
    if isinstance(label, numbers.Number):
        return float(label)
    return float(np.asarray(label).ravel()[0])


def _dataset_paths(directory: str, prefix: str) -> tuple[str, str]:
    """(rec_path, idx_path); ``FileNotFoundError`` naming the missing one."""
    rec_path = os.path.join(directory, f"{prefix}.rec")
    idx_path = os.path.join(directory, f"{prefix}.idx")
    for p in (rec_path, idx_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"insightface dataset file missing: {p} (expected {prefix}.rec, {prefix}.idx, "
                f"property in {directory})"
            )
    return rec_path, idx_path


def _has_identity_records(header0: IRHeader | None) -> bool:
    """Whether record 0 is the (first, end) identity range whose labels are exact ints."""
    return (
        header0 is not None
        and header0.flag > 0
        and float(np.max(header0.label[:2])) <= _EXACT_FLOAT32_INT
        and int(header0.label[1]) > int(header0.label[0])
    )


def _labels_from_identity_records(
    rec: MXIndexedRecordIO, header0: IRHeader
) -> tuple[np.ndarray, np.ndarray, range]:
    """(image keys, int64 labels, identity record keys) from the identity records' ranges."""
    first_id, end_id = int(header0.label[0]), int(header0.label[1])
    image_keys = np.arange(1, first_id, dtype=np.int64)
    labels = np.full(image_keys.shape, -1, np.int64)
    id_keys = range(first_id, end_id)
    for c, key in enumerate(id_keys):
        h = rec.read_header_idx(key)
        if h.flag < 2:
            raise RecordIOError(f"{rec.uri}: identity record {key} has no (start, end) label")
        a, b = int(h.label[0]), int(h.label[1])
        if not 1 <= a <= b <= first_id:
            raise RecordIOError(
                f"{rec.uri}: identity record {key} has image range ({a}, {b}) outside [1, {first_id})"
            )
        labels[a - 1 : b - 1] = c
    if (labels < 0).any():
        missing = int(image_keys[np.argmax(labels < 0)])
        raise RecordIOError(f"{rec.uri}: image record {missing} belongs to no identity record")
    return image_keys, labels, id_keys


def _check_identity_labels(rec: MXIndexedRecordIO, id_keys: range, check_labels: int) -> None:
    """Checks the first image header of up to ``check_labels`` identities against its identity.

    Raises:
      RecordIOError: an image header disagrees (labels not in identity-record order).
    """
    if check_labels <= 0:
        return
    step = max(1, len(id_keys) // check_labels)
    for c in range(0, len(id_keys), step):
        h = rec.read_header_idx(id_keys[c])
        a = int(h.label[0])
        if a < int(h.label[1]):
            try:
                got = _scalar_label(rec.read_header_idx(a).label)
            except RecordIOError:
                continue  # an unreadable image record: the loader skips (or raises on) it
            if int(got) != c:
                raise RecordIOError(
                    f"{rec.uri}: image record {a} is labelled {got} in its header but "
                    f"identity record {id_keys[c]} (identity {c}) claims it; labels are "
                    "not in identity-record order: use labels_from='headers'"
                )


def _labels_from_headers(rec: MXIndexedRecordIO, skip_empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image keys, int64 labels) from every record's header, in key order.

    With ``skip_empty``, records with an empty payload (record 0 and identity
    records) are not images.
    """
    keys, label_list = [], []
    for k in sorted(rec.keys):
        h, payload_len = rec._header_and_payload_len(k)  # pylint: disable=protected-access
        if skip_empty and payload_len == 0:
            continue
        keys.append(k)
        label_list.append(_scalar_label(h.label))
    return np.array(keys, dtype=np.int64), np.array(label_list, np.int64)


def read_insightface_rec(
    directory: str | os.PathLike,
    *,
    prefix: str = "train",
    labels_from: str = "auto",
    check_labels: int = 1000,
) -> InsightFaceRec:
    """Reads the index of ``<directory>/{train.rec, train.idx, property}``.

    Args:
      directory: the dataset folder.
      prefix: file name stem of the ``.rec`` / ``.idx``.
      labels_from: ``'auto'``: labels from the identity records (record 0
        gives their range; one small read per identity), checked against the
        image headers of up to ``check_labels`` identities; falls back to
        ``'headers'`` without record 0 or when record keys pass 2**24 (float32
        labels stop being exact integers). ``'headers'``: every image record's
        header (~40 bytes read each; records with an empty payload, i.e.
        record 0 and identity records, are not images).
      check_labels: identities checked in ``'auto'`` mode (0: none).

    Returns:
      The image keys, labels, ``num_classes`` and ``image_size`` (from
      ``property``, else the labels and 112x112).

    Raises:
      FileNotFoundError: the ``.rec`` or ``.idx`` is missing.
      RecordIOError: bad framing or identity records, or labels outside ``[0, num_classes)``.
      ValueError: ``labels_from`` unknown, or a malformed ``property``.
    """
    if labels_from not in LABEL_STRATEGIES:
        raise ValueError(f"labels_from must be 'auto' or 'headers', got {labels_from!r}")
    directory = os.fspath(directory)
    rec_path, idx_path = _dataset_paths(directory, prefix)
    prop_path = os.path.join(directory, "property")
    prop = read_property(prop_path) if os.path.isfile(prop_path) else None

    rec = MXIndexedRecordIO(idx_path, rec_path, "r")
    try:
        header0 = rec.read_header_idx(0) if 0 in rec.idx else None
        if labels_from == "auto" and _has_identity_records(header0):
            image_keys, labels, id_keys = _labels_from_identity_records(rec, header0)
            _check_identity_labels(rec, id_keys, check_labels)
        else:
            has_record0 = header0 is not None and header0.flag > 0
            image_keys, labels = _labels_from_headers(rec, skip_empty=has_record0)
    finally:
        rec.close()

    num_classes = prop[0] if prop else (int(labels.max()) + 1 if labels.size else 0)
    image_size = (prop[1], prop[2]) if prop else (112, 112)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.argmax((labels < 0) | (labels >= num_classes)))
        raise RecordIOError(
            f"{rec_path}: image record {int(image_keys[bad])} has label {int(labels[bad])} "
            f"outside [0, {num_classes}) (num_classes from {prop_path if prop else 'the labels'})"
        )
    return InsightFaceRec(
        rec_path, idx_path, image_keys, labels.astype(np.int32), int(num_classes), image_size
    )


def write_insightface_rec(
    directory: str | os.PathLike,
    images: Sequence[bytes] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    num_classes: int | None = None,
    image_size: tuple[int, int] | None = None,
    quality: int = 95,
    prefix: str = "train",
) -> None:
    """Writes insightface's layout: images sorted by label, identity records, record 0.

    Args:
      directory: output folder (created).
      images: encoded bytes (stored as given), or uint8 (N, H, W, 3) arrays
        (encoded as JPEG with ``quality``).
      labels: int (N,) in ``[0, num_classes)``; image ``i``'s header label.
      num_classes: default ``max(labels) + 1``.
      image_size: (H, W) for ``property``; default the first image's size.
      quality: JPEG quality of array images.
      prefix: file name stem of the ``.rec`` / ``.idx``.

    Raises:
      ValueError: image and label counts differ, or labels outside ``[0, num_classes)``.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    labels = np.asarray(labels, np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    num_classes = int(num_classes)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    order = np.argsort(labels, kind="stable")
    n = len(labels)
    rec = MXIndexedRecordIO(
        os.path.join(directory, f"{prefix}.idx"), os.path.join(directory, f"{prefix}.rec"), "w"
    )
    first_id = n + 1
    rec.write_idx(0, pack(IRHeader(0, [first_id, first_id + num_classes], 0, 0), b""))
    for key, i in enumerate(order, 1):
        header = IRHeader(0, float(labels[i]), key, 0)
        img = images[i]
        if isinstance(img, (bytes, bytearray)):
            rec.write_idx(key, pack(header, img))
        else:
            if image_size is None:
                image_size = tuple(np.asarray(img).shape[:2])
            rec.write_idx(key, pack(header, codec.encode_image(img, "jpeg", quality=quality)))
    sorted_labels = labels[order]
    for c in range(num_classes):
        start = int(np.searchsorted(sorted_labels, c, "left")) + 1
        end = int(np.searchsorted(sorted_labels, c, "right")) + 1
        rec.write_idx(first_id + c, pack(IRHeader(0, [start, end], 0, 0), b""))
    rec.close()
    if image_size is None:
        image_size = codec.decode_image(images[0]).shape[:2] if n else (112, 112)
    with open(os.path.join(directory, "property"), "w") as f:
        f.write(f"{num_classes},{image_size[0]},{image_size[1]}\n")


def require_images_in_rec(info: InsightFaceRec) -> None:
    """Checks that ``info`` lists image records.

    Raises:
      EmptyDatasetError: no image records (the message names the ``.rec`` and ``.idx``).
    """
    if len(info.image_keys):
        return
    with open(info.idx_path) as f:
        num_records = sum(1 for line in f if line.strip())
    raise EmptyDatasetError(
        f"{info.rec_path}: the dataset is empty: no image records ({info.idx_path} lists "
        f"{num_records} record(s), none of them an image)"
    )


class InsightFaceRecSource:
    """Training source over an insightface folder, read without MXNet.

    ``source[i] -> {'image': encoded bytes, 'label': int, 'key': '<rec> record <k>'}``.

    Args:
      directory: the folder with ``train.rec``, ``train.idx``, ``property``.
      prefix: file name stem of the ``.rec`` / ``.idx``.
      labels_from: see :func:`read_insightface_rec`.

    Raises:
      EmptyDatasetError: the ``.rec`` holds no images.
    """

    def __init__(self, directory: str | os.PathLike, *, prefix: str = "train", labels_from: str = "auto"):
        self.directory = os.fspath(directory)
        self.info = read_insightface_rec(self.directory, prefix=prefix, labels_from=labels_from)
        require_images_in_rec(self.info)
        self.num_classes = self.info.num_classes
        self.image_size = self.info.image_size
        prop = os.path.join(self.directory, "property")
        self.image_size_origin = (
            prop if os.path.isfile(prop) else f"the default: no property file in {self.directory}"
        )
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def _rec(self) -> MXIndexedRecordIO:
        if self._reader is None:
            self._reader = self.info.reader()
        return self._reader

    def __len__(self) -> int:
        return len(self.info.image_keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record ``index``; ``RecordIOError`` naming file, record key and byte offset on a bad frame."""
        key = int(self.info.image_keys[index])
        name = f"{self.info.rec_path} record {key}"
        rec = self._rec()
        try:
            _, payload = unpack(rec.read_idx(key))
        except RecordIOError as e:
            reason = f".idx offset {rec.idx.get(key)}: {e.reason}"
            raise RecordIOError(f"{name}: {reason}", reason=reason, offset=e.offset, record_key=name) from e
        return {"image": payload, "label": int(self.info.labels[index]), "key": name}
