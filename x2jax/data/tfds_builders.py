"""TFDS dataset builders (ArrayRecord files; no TensorFlow needed) and their training source.

Prepare once, then read with ``tfds.data_source`` (random access, grain):

- ``synthetic_faces/{small,large}``: generated from a seed (``synthetic.py``),
  split ``train``: image (PNG or JPEG bytes), label, index (position in
  :func:`x2jax.data.synthetic.generate_train`).
- ``face_verification/<set>``: pairs in ``.bin`` order: image, index
  (0 .. 2N-1), issame (of the image's pair), split ``test``. Real sets read
  ``<manual_dir>/<set>.bin``; ``synthetic_small`` / ``synthetic_large`` are
  generated.
- ``insightface_rec/<name>``: an insightface ``train.rec`` folder (``<manual_dir>/<name>/``
  or ``rec_dir=``), JPEG bytes kept as stored, label, key (record key).
- ``face_image_folder``: ``root/<identity>/<image>`` (``<manual_dir>`` or
  ``root=``), image bytes as stored, label (sorted identity order), identity
  name.

Metadata ``num_classes`` and ``image_size`` are stored with the dataset and
read back by :class:`TfdsSource`, the training source over a prepared split.
TFDS shuffles examples when writing: use ``index`` / ``key`` to recover order.
Importing this module registers the builders.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from x2jax.data import insightface_rec, synthetic, verification_bin
from x2jax.data.image_folder import scan_image_folder
from x2jax.data.images import encode_image
from x2jax.data.recordio import unpack
from x2jax.data.sources import EmptyDatasetError

_CITATION_INSIGHTFACE = "https://github.com/deepinsight/insightface"


def _encode(img: np.ndarray, fmt: str) -> bytes:
    """Stored image bytes: PNG at zlib level 1 (fast, lossless) or JPEG quality 95."""
    return encode_image(img, fmt, quality=95, compress_level=1)


def _manual_path(dl_manager, override: str | None, *parts: str) -> str:
    if override:
        return os.fspath(override)
    manual_dir = getattr(dl_manager, "manual_dir", None)
    if manual_dir is None:
        raise FileNotFoundError(
            "no manual_dir: pass download_config=tfds.download.DownloadConfig(manual_dir=...) "
            "or the path as a builder kwarg"
        )
    return os.path.join(os.fspath(manual_dir), *parts)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: ArrayRecord files by default (TFRecord would need TensorFlow).

    ``code_path`` is overridden: TFDS's own lookup needs ``importlib_resources``
    for builders inside a package (a backport TFDS does not install on
    Python >= 3.9).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
        return epath.Path(inspect.getfile(cls))


# ---------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
    synthetic: synthetic.SyntheticConfig = dataclasses.field(default_factory=synthetic.SyntheticConfig)


class SyntheticFaces(_Builder):
    """Synthetic face identities (x2jax.data.synthetic), deterministic from a seed."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticFacesConfig(name=n, description=f"synthetic.CONFIGS[{n!r}]", synthetic=c)
        for n, c in synthetic.CONFIGS.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config.synthetic
        s = cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format=cfg.image_format),
                    "label": tfds.features.Scalar(dtype=np.int64),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(num_classes=cfg.num_identities, image_size=[s, s]),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config.synthetic
        index = 0
        for imgs, ids in synthetic.render_identities(cfg, range(cfg.num_identities), synthetic.train_image_counts(cfg)):
            for img, ident in zip(imgs, ids):
                yield index, {"image": _encode(img, cfg.image_format), "label": int(ident), "index": index}
                index += 1


# ---------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class FaceVerificationConfig(tfds.core.BuilderConfig):
    synthetic: synthetic.SyntheticConfig | None = None  # None: read <manual_dir>/<name>.bin


class FaceVerification(_Builder):
    """Face verification pairs in insightface .bin order (lfw, cfp_fp, agedb_30, ...)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place insightface's verification files (<name>.bin, e.g. lfw.bin, cfp_fp.bin, "
        "agedb_30.bin, from the faces_emore / ms1m-retinaface-t1 archives) in manual_dir."
    )
    BUILDER_CONFIGS = [
        FaceVerificationConfig(name=n, description=f"{n}.bin from manual_dir")
        for n in verification_bin.VERIFICATION_NAMES
    ] + [
        FaceVerificationConfig(name=f"synthetic_{n}", description=f"synthetic.CONFIGS[{n!r}]", synthetic=c)
        for n, c in synthetic.CONFIGS.items()
    ]

    def __init__(self, *, bin_path: str | None = None, **kwargs):
        self._bin_path = bin_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "issame": tfds.features.Scalar(dtype=np.bool_),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage=_CITATION_INSIGHTFACE,
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if cfg.synthetic is not None:
            images, issame = synthetic.generate_verification(cfg.synthetic)
            fmt = cfg.synthetic.image_format
            bins = [_encode(im, fmt) for im in images]
            size = cfg.synthetic.image_size
            self.info.metadata.update(num_pairs=len(issame), image_size=[size, size])
        else:
            path = _manual_path(dl_manager, self._bin_path, f"{cfg.name}.bin")
            bins, issame = verification_bin.read_bin_raw(path)
            self.info.metadata.update(num_pairs=len(issame), source=path)
        return {"test": self._generate_examples(bins, issame)}

    def _generate_examples(self, bins, issame):
        for i, b in enumerate(bins):
            yield i, {"image": b, "index": i, "issame": bool(issame[i // 2])}


def read_verification_source(ds) -> tuple[list[bytes], np.ndarray]:
    """A ``face_verification`` data source (SkipDecoding) -> (.bin-ordered bytes, issame)."""
    n = len(ds)
    bins: list[bytes | None] = [None] * n
    issame = np.zeros((n // 2,), bool)
    for ex in ds:
        i = int(ex["index"])
        bins[i] = ex["image"]
        issame[i // 2] = bool(ex["issame"])
    if any(b is None for b in bins):
        raise ValueError("face_verification source has missing indices")
    return bins, issame


# ---------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class InsightFaceRecConfig(tfds.core.BuilderConfig):
    prefix: str = "train"


class InsightFaceRecBuilder(_Builder):
    """insightface RecordIO training sets (MS1MV2/3, Glint360K, ...), JPEG bytes kept."""

    name = "insightface_rec"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the insightface folder (train.rec, train.idx, property) at "
        "<manual_dir>/<config name>/ (e.g. <manual_dir>/ms1mv3/train.rec), or pass "
        "builder_kwargs={'rec_dir': ...}."
    )
    BUILDER_CONFIGS = [
        InsightFaceRecConfig(name=n, description=f"<manual_dir>/{n}/train.rec")
        for n in ("ms1mv3", "ms1mv2", "glint360k", "webface42m", "casia_webface", "custom")
    ]

    def __init__(self, *, rec_dir: str | None = None, **kwargs):
        self._rec_dir = rec_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.Scalar(dtype=np.int64),
                    "key": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
            homepage=_CITATION_INSIGHTFACE,
        )

    def _split_generators(self, dl_manager):
        rec_dir = _manual_path(dl_manager, self._rec_dir, self.builder_config.name)
        info = insightface_rec.read_insightface_rec(rec_dir, prefix=self.builder_config.prefix)
        insightface_rec.require_images_in_rec(info)
        self.info.metadata.update(
            num_classes=info.num_classes, image_size=list(info.image_size), source=rec_dir
        )
        return {"train": self._generate_examples(info)}

    def _generate_examples(self, info: insightface_rec.InsightFaceRec):
        rec = info.reader()
        for key, label in zip(info.image_keys, info.labels):
            _, payload = unpack(rec.read_idx(int(key)))
            yield int(key), {"image": payload, "label": int(label), "key": int(key)}
        rec.close()


# ---------------------------------------------------------------------------
class FaceImageFolder(_Builder):
    """``root/<identity>/<image>`` folders (the official X2-Softmax layout)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "manual_dir (or builder_kwargs={'root': ...}) is the root holding one folder per "
        "identity with aligned face images."
    )

    def __init__(self, *, root: str | None = None, image_size: tuple[int, int] = (112, 112), **kwargs):
        self._root = root
        self._image_size = tuple(image_size)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.Scalar(dtype=np.int64),
                    "identity": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = _manual_path(dl_manager, self._root)
        paths, labels, names = scan_image_folder(root)
        self.info.metadata.update(num_classes=len(names), image_size=list(self._image_size), source=root)
        return {"train": self._generate_examples(paths, labels, names)}

    def _generate_examples(self, paths, labels, names):
        for i, (path, label) in enumerate(zip(paths, labels)):
            with open(path, "rb") as f:
                data = f.read()
            yield i, {"image": data, "label": int(label), "identity": names[label]}


# ---------------------------------------------------------------------------
class TfdsSource:
    """Training source over a ``tfds.data_source`` split with 'image' (bytes) and 'label'.

    Prepared on first use. Opened with ``SkipDecoding`` on the image so decoding
    (and the corrupt-image policy) stays in the loader.

    Args:
      name: ``builder/config`` (e.g. ``insightface_rec/ms1mv3``).
      data_dir: the TFDS data folder.
      split: the split to read.
      num_classes: default the dataset metadata's ``num_classes``.
      image_size: (H, W); default the metadata's ``image_size``, else 112x112.
      builder_kwargs: passed to ``tfds.builder`` (e.g. ``config=``, ``rec_dir=``).
      download_and_prepare_kwargs: passed to ``download_and_prepare``.

    Raises:
      EmptyDatasetError: the split has no records.
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
