"""Training datasets by name: :func:`get_train_source`.

Train source names (``data_dir`` meaning in brackets):

- ``synthetic_small`` / ``synthetic_large``: generated in memory (unused);
  keyword overrides of :class:`x2jax.data.synthetic.SyntheticConfig` fields.
- ``insightface_rec``: insightface ``train.rec`` /
  ``train.idx`` / ``property`` (that folder).
- ``folder``: ``root/<identity>/<image>`` (the root); ``image_size=(H, W)``.
- ``tfds:<builder>/<config>``, e.g. ``tfds:synthetic_faces/small``,
  ``tfds:insightface_rec/ms1mv3``, ``tfds:face_image_folder``: a TFDS dataset
  (the TFDS data_dir), prepared on first use; ``manual_dir=`` for the raw files.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from x2jax.data import synthetic
from x2jax.data.image_folder import ImageFolderSource
from x2jax.data.insightface_rec import InsightFaceRecSource
from x2jax.data.sources import ArraySource

INSIGHTFACE_REC = "insightface_rec"


class TrainSource(NamedTuple):
    """A random-access training source and what the model / head need to know."""

    source: Any
    num_classes: int
    image_size: tuple[int, int]


def _require_dir(data_dir: str | os.PathLike | None, what: str) -> str:
    if data_dir is None:
        raise ValueError(f"{what} needs data_dir=<path>")
    path = os.fspath(data_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: data path not found: {path}")
    return path


def _tfds_kwargs(manual_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    if manual_dir is None:
        return None
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    manual_dir = os.fspath(manual_dir)
    if not os.path.exists(manual_dir):
        raise FileNotFoundError(f"manual_dir not found: {manual_dir}")
    return {"download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}


def get_train_source(name: str, *, data_dir: str | os.PathLike | None = None, **kwargs) -> TrainSource:
    """The training source called ``name`` (module docstring).

    Args:
      name: a source name.
      data_dir: its folder (see the module docstring).
      kwargs: passed to the source (synthetic config overrides, ``image_size``,
        ``labels_from``, TFDS ``builder_kwargs`` / ``manual_dir`` ...).

    Returns:
      (source, num_classes, image_size).

    Raises:
      ValueError: an unknown name, or no ``data_dir`` where one is needed.
      FileNotFoundError: ``data_dir`` (or a file in it) is missing.
    """
    if name.startswith("synthetic_"):
        cfg = synthetic.get_config(name[len("synthetic_") :], **kwargs)
        images, labels = synthetic.generate_train(cfg)
        src = ArraySource(images, labels, cfg.num_identities, name=name)
    elif name == INSIGHTFACE_REC:
        src = InsightFaceRecSource(_require_dir(data_dir, f"{INSIGHTFACE_REC} source"), **kwargs)
    elif name == "folder":
        src = ImageFolderSource(_require_dir(data_dir, "folder source"), **kwargs)
    elif name.startswith("tfds:"):
        from x2jax.data.tfds_builders import TfdsSource  # pylint: disable=import-outside-toplevel

        manual_dir = kwargs.pop("manual_dir", None)
        src = TfdsSource(
            name[len("tfds:") :],
            data_dir=data_dir,
            download_and_prepare_kwargs=_tfds_kwargs(manual_dir),
            **kwargs,
        )
    else:
        raise ValueError(
            f"unknown train source {name!r}; use synthetic_small, synthetic_large, "
            f"{INSIGHTFACE_REC}, folder or tfds:<builder>/<config>"
        )
    return TrainSource(src, int(src.num_classes), tuple(int(s) for s in src.image_size))
