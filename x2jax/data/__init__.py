"""Data: insightface RecordIO and .bin without MXNet, synthetic faces, TFDS builders, loader.

Entry points for ``train.py`` / ``eval.py``::

  src = x2jax.data.get_train_source("synthetic_small")           # or "rec", data_dir=...
  it = x2jax.data.make_train_loader(src.source, batch_size=128, seed=0,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count())
  sets = x2jax.data.get_verification_sets(["synthetic_small"])   # {name: (images, issame)}

Train source names (``data_dir`` meaning in brackets):

- ``synthetic_small`` / ``synthetic_large``: generated in memory (unused);
  keyword overrides of :class:`SyntheticConfig` fields.
- ``rec``: insightface ``train.rec`` / ``train.idx`` / ``property`` (that folder).
- ``folder``: ``root/<identity>/<image>`` (the root); ``image_size=(H, W)``.
- ``tfds:<builder>/<config>``, e.g. ``tfds:synthetic_faces/small``,
  ``tfds:insightface_rec/ms1mv3``, ``tfds:face_image_folder``: a TFDS dataset
  (the TFDS data_dir), prepared on first use; ``manual_dir=`` for the raw files.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from x2jax.data import recordio, sources, synthetic, verification_bin
from x2jax.data.pipeline import (
    checkpoint_restore_args,
    checkpoint_save_args,
    make_train_loader,
    normalize,
    steps_per_epoch,
)
from x2jax.data.recordio import (
    IRHeader,
    MXIndexedRecordIO,
    MXRecordIO,
    pack,
    pack_img,
    read_insightface_rec,
    unpack,
    unpack_img,
)
from x2jax.data.synthetic import SyntheticConfig, generate_train, generate_verification
from x2jax.data.verification_bin import load_bin, write_bin

__all__ = [
    "TrainSource",
    "get_train_source",
    "get_verification_sets",
    "make_train_loader",
    "checkpoint_save_args",
    "checkpoint_restore_args",
    "normalize",
    "steps_per_epoch",
    "IRHeader",
    "MXIndexedRecordIO",
    "MXRecordIO",
    "pack",
    "pack_img",
    "unpack",
    "unpack_img",
    "read_insightface_rec",
    "SyntheticConfig",
    "generate_train",
    "generate_verification",
    "load_bin",
    "write_bin",
    "recordio",
    "sources",
    "synthetic",
    "verification_bin",
]


class TrainSource(NamedTuple):
    """A random-access training source and what the model / head need to know."""

    source: Any
    num_classes: int
    image_size: tuple[int, int]


def _require_dir(data_dir, what: str) -> str:
    if data_dir is None:
        raise ValueError(f"{what} needs data_dir=<path>")
    path = os.fspath(data_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: data path not found: {path}")
    return path


def _tfds_kwargs(manual_dir):
    if manual_dir is None:
        return None
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    manual_dir = os.fspath(manual_dir)
    if not os.path.exists(manual_dir):
        raise FileNotFoundError(f"manual_dir not found: {manual_dir}")
    return {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}


def get_train_source(name: str, *, data_dir: str | os.PathLike | None = None, **kwargs) -> TrainSource:
    """Training source by name (module docstring) -> (source, num_classes, image_size)."""
    if name.startswith("synthetic_"):
        cfg = synthetic.get_config(name[len("synthetic_") :], **kwargs)
        images, labels = synthetic.generate_train(cfg)
        src = sources.ArraySource(images, labels, cfg.num_identities, name=name)
    elif name == "rec":
        src = sources.RecordIOSource(_require_dir(data_dir, "rec source"), **kwargs)
    elif name == "folder":
        src = sources.ImageFolderSource(_require_dir(data_dir, "folder source"), **kwargs)
    elif name.startswith("tfds:"):
        manual_dir = kwargs.pop("manual_dir", None)
        src = sources.TfdsSource(
            name[len("tfds:") :],
            data_dir=data_dir,
            download_and_prepare_kwargs=_tfds_kwargs(manual_dir),
            **kwargs,
        )
    else:
        raise ValueError(
            f"unknown train source {name!r}; use synthetic_small, synthetic_large, "
            "rec, folder or tfds:<builder>/<config>"
        )
    return TrainSource(src, int(src.num_classes), tuple(int(s) for s in src.image_size))


def get_verification_sets(
    names: Sequence[str],
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: tuple[int, int] | None = (112, 112),
    synthetic_overrides: dict[str, Any] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (images uint8 (2N, H, W, 3), issame bool (N,))}``.

    ``synthetic_small`` / ``synthetic_large``: generated (native size; pass the
    same ``synthetic_overrides`` as the train source so identities stay held out).
    Other names: ``<data_dir>/<name>.bin``, else a prepared TFDS
    ``face_verification/<name>`` in ``data_dir``; images resized to ``image_size``.
    """
    out = {}
    for name in names:
        if name.startswith("synthetic_"):
            cfg = synthetic.get_config(name[len("synthetic_") :], **(synthetic_overrides or {}))
            out[name] = synthetic.generate_verification(cfg)
            continue
        if data_dir is None:
            raise ValueError(f"verification set {name!r} needs data_dir=<folder with {name}.bin>")
        bin_path = os.path.join(os.fspath(data_dir), f"{name}.bin")
        if os.path.isfile(bin_path):
            out[name] = verification_bin.load_bin(bin_path, image_size)
            continue
        tfds_dir = os.path.join(os.fspath(data_dir), "face_verification", name)
        if os.path.isdir(tfds_dir):
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
            from x2jax.data import tfds_builders  # pylint: disable=import-outside-toplevel

            ds = tfds.data_source(
                f"face_verification/{name}",
                data_dir=data_dir,
                split="test",
                download=False,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
            bins, issame = tfds_builders.read_verification_source(ds)
            images = np.stack([verification_bin.decode_and_resize(b, image_size) for b in bins])
            out[name] = (images, issame)
            continue
        raise FileNotFoundError(
            f"verification set {name!r} not found: neither {bin_path} nor a prepared TFDS dataset {tfds_dir}"
        )
    return out
