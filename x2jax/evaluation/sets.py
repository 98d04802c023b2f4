"""Verification sets by name, for training and for ``eval.py`` alike.

Names:

* ``synthetic``: the held-out identities of a synthetic training config
  (:class:`SyntheticSetRef`), rendered at the model's image size;
* ``synthetic_hard`` / ``synthetic_easy`` (synthetic data with families,
  ``family_size`` > 1): the half of ``synthetic``'s pairs whose negatives are
  two identities of one family (hard) or of two families (easy), each with as
  many positives (:func:`x2jax.data.synthetic.negative_subset`);
* any other name: ``<data_dir>/<name>.bin`` (insightface ``.bin``), else a
  prepared TFDS ``face_verification/<name>`` in ``data_dir``.

Resize policy: images of another size than the model's are resized, bilinear,
to the model's size, as insightface's ``load_bin`` does (one decoder and
resizer for every source: :func:`x2jax.data.images.decode_image`). ``resize=False`` turns that into
an error naming the set, for callers that want sizes to agree (``eval.py``
without ``--resize``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from x2jax.data import synthetic as synthetic_data
from x2jax.data import verification_bin

SYNTHETIC = "synthetic"
"""Name of the held-out synthetic verification set."""

SYNTHETIC_SUBSETS = {"synthetic_hard": "hard", "synthetic_easy": "easy"}
"""Set name -> negative subset of the ``synthetic`` set (synthetic data with families)."""
SYNTHETIC_NAMES = (SYNTHETIC, *SYNTHETIC_SUBSETS)
"""Every generated set name."""

SIZE_FIELDS = ("num_identities", "images_per_identity", "image_size")
"""Training data-config fields that change a synthetic variant's size (0 = the variant's)."""

SHAPE_FIELDS = {"family_size": 1, "family_similarity": 0.0, "zipf_exponent": 0.0}
"""Training data-config fields passed to the synthetic config when they differ from these
defaults (the variants' values): families of look-alikes and the long tail."""

VerificationSet = tuple[np.ndarray, np.ndarray]
"""(images uint8 (2N, S, S, 3), issame bool (N,)); pair i is images 2i and 2i+1."""


@dataclasses.dataclass(frozen=True)
class SyntheticSetRef:
    """The synthetic config whose held-out identities form the ``synthetic`` set.

    Identities of the verification split start after ``num_identities``, so the
    reference must be the training run's (variant and size overrides). The image
    size is not part of it: the set is rendered at the requested size (the
    identities and pairs do not depend on it).

    Attributes:
      variant: :data:`x2jax.data.synthetic.CONFIGS` name ('small', 'large').
      overrides: (field, value) pairs of :class:`x2jax.data.synthetic.SyntheticConfig`,
        sorted; a mapping is accepted and converted.
    """

    variant: str = "small"
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        object.__setattr__(self, "overrides", tuple(sorted((str(k), v) for k, v in items)))

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any] | Any) -> SyntheticSetRef:
        """The reference of a training data config (``config.data`` or a checkpoint's copy).

        Args:
          data_config: mapping or ``ConfigDict`` with ``name``, ``variant`` and
            the :data:`SIZE_FIELDS` (0 = the variant's value); the :data:`SHAPE_FIELDS`
            count where present and not at their default.

        Raises:
          ValueError: ``data_config["name"]`` is not ``synthetic``.
        """
        if data_config["name"] != SYNTHETIC:
            raise ValueError(f"eval set 'synthetic' needs data.name='synthetic', got {data_config['name']!r}")
        fields = {k: int(data_config[k]) for k in SIZE_FIELDS if int(data_config.get(k) or 0) > 0}
        for k, default in SHAPE_FIELDS.items():
            value = data_config.get(k, default)
            if value is not None and value != default:
                fields[k] = type(default)(value)
        return cls(str(data_config["variant"]), fields)

    @classmethod
    def from_info(cls, synthetic_info: Mapping[str, Any] | None) -> SyntheticSetRef:
        """From a checkpoint's ``info["synthetic"]`` (``{"variant": name, **fields}``); None: the default."""
        fields = dict(synthetic_info or {})
        return cls(str(fields.pop("variant", cls.variant)), fields)

    def as_info(self) -> dict[str, Any]:
        """``{"variant": name, **fields}``, the form :meth:`from_info` reads."""
        return {"variant": self.variant, **dict(self.overrides)}

    def replace(self, *, variant: str | None = None, **overrides: Any) -> SyntheticSetRef:
        """A copy with another variant and/or some fields set."""
        return SyntheticSetRef(self.variant if variant is None else variant, {**dict(self.overrides), **overrides})

    def settings(self, image_size: int) -> tuple[str, dict[str, Any]]:
        """(variant, overrides) of :func:`x2jax.data.synthetic.get_config` at ``image_size``."""
        return self.variant, {**dict(self.overrides), "image_size": int(image_size)}

    def config(self, image_size: int) -> synthetic_data.SyntheticConfig:
        """The :class:`~x2jax.data.synthetic.SyntheticConfig` rendered at ``image_size``."""
        variant, overrides = self.settings(image_size)
        return synthetic_data.get_config(variant, **overrides)


@dataclasses.dataclass(frozen=True)
class SetSource:
    """Where a named set is read from.

    Attributes:
      name: the set's name.
      kind: 'synthetic', 'bin' or 'tfds'.
      path: the ``.bin`` file, or the TFDS data_dir; None for synthetic.
    """

    name: str
    kind: Literal["synthetic", "bin", "tfds"]
    path: str | None = None


def resolve_verification_sets(names: Sequence[str], *, data_dir: str | os.PathLike | None) -> list[SetSource]:
    """Locate every named set (reads no images), so that a missing one fails before any work.

    Args:
      names: set names (module docstring).
      data_dir: folder of the ``.bin`` files / TFDS datasets; None or "" is the
        current directory, ``~`` is expanded.

    Returns:
      One :class:`SetSource` per name, in order.

    Raises:
      FileNotFoundError: naming the ``.bin`` path (and the TFDS folder) looked for.
    """
    root = os.path.expanduser(os.fspath(data_dir)) if data_dir else "."
    found = []
    for name in names:
        if name in SYNTHETIC_NAMES:
            found.append(SetSource(name, "synthetic"))
            continue
        bin_path = os.path.join(root, f"{name}.bin")
        tfds_dir = os.path.join(root, "face_verification", name)
        if os.path.isfile(bin_path):
            found.append(SetSource(name, "bin", bin_path))
        elif os.path.isdir(tfds_dir):
            found.append(SetSource(name, "tfds", root))
        else:
            raise FileNotFoundError(
                f"verification set {name!r} not found: {bin_path} (nor a prepared TFDS dataset {tfds_dir}; "
                "set --data-dir / eval.data_dir)"
            )
    return found


def _read_tfds(source: SetSource, size: tuple[int, int] | None) -> VerificationSet:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from x2jax.data import tfds_builders  # pylint: disable=import-outside-toplevel

    ds = tfds.data_source(
        f"face_verification/{source.name}",
        data_dir=source.path,
        split="test",
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    bins, issame = tfds_builders.read_verification_source(ds)
    where = os.path.join(os.fspath(source.path), "face_verification", source.name)
    return verification_bin.decode_pairs(bins, size, where=where), issame


def open_verification_set(
    source: SetSource,
    *,
    image_size: int,
    synthetic: SyntheticSetRef | None = None,
    resize: bool = True,
) -> VerificationSet:
    """Read one located set at the model's image size.

    Args:
      source: from :func:`resolve_verification_sets`.
      image_size: the model's (square) image size S.
      synthetic: reference of the ``synthetic`` set (None: ``SyntheticSetRef()``, 'small').
      resize: resize images of another size (bilinear); False raises instead.

    Returns:
      (images uint8 (2N, S, S, 3), issame bool (N,)).

    Raises:
      ValueError: the set's images are not S x S and ``resize`` is False, the
        images and pairs disagree, or an image does not decode (naming the file).
    """
    size = (int(image_size), int(image_size))
    if source.kind == "synthetic":
        ref = synthetic or SyntheticSetRef()
        cfg = ref.config(image_size)
        if source.name in SYNTHETIC_SUBSETS and cfg.family_size < 2:
            raise ValueError(f"set {source.name!r} needs synthetic families (data.family_size > 1); the synthetic "
                             f"config has family_size={cfg.family_size}")
        images, issame = synthetic_data.generate_verification(cfg)
        if source.name in SYNTHETIC_SUBSETS:
            keep = synthetic_data.negative_subset(cfg, SYNTHETIC_SUBSETS[source.name])
            images = images.reshape(issame.shape[0], 2, *images.shape[1:])[keep].reshape(-1, *images.shape[1:])
            issame = issame[keep]
        where = f"synthetic variant {ref.variant!r}"
    elif source.kind == "bin":
        images, issame = verification_bin.load_bin(source.path, size if resize else None)
        where = source.path
    elif source.kind == "tfds":
        images, issame = _read_tfds(source, size if resize else None)
        where = os.path.join(os.fspath(source.path), "face_verification", source.name)
    else:
        raise ValueError(f"set {source.name!r}: unknown source kind {source.kind!r}")
    if images.shape[0] != 2 * issame.shape[0]:
        raise ValueError(
            f"set {source.name!r} ({where}): {images.shape[0]} images for {issame.shape[0]} pairs (need 2 per pair)"
        )
    if images.shape[1:3] != size:
        raise ValueError(
            f"set {source.name!r} has {images.shape[1]}x{images.shape[2]} images but the checkpoint's model is for "
            f"{size[0]}x{size[1]} ({where}); resize them with resize=True (eval.py: without --no-resize)"
        )
    return images, issame


def open_verification_sets(
    names: Sequence[str],
    *,
    data_dir: str | os.PathLike | None,
    image_size: int,
    synthetic: SyntheticSetRef | None = None,
    resize: bool = True,
) -> dict[str, VerificationSet]:
    """``{name: (images uint8 (2N, S, S, 3), issame bool (N,))}`` for the named sets.

    Args:
      names: set names (module docstring); every one is located before any is read.
      data_dir: folder of the ``.bin`` files / TFDS datasets (None: current directory).
      image_size: the model's (square) image size S.
      synthetic: reference of the ``synthetic`` set (None: 'small' with no overrides).
      resize: resize images of another size (bilinear, the default); False raises instead.

    Raises:
      FileNotFoundError: a set is not found (naming the paths looked for).
      ValueError: see :func:`open_verification_set`.
    """
    return {
        source.name: open_verification_set(source, image_size=image_size, synthetic=synthetic, resize=resize)
        for source in resolve_verification_sets(names, data_dir=data_dir)
    }
