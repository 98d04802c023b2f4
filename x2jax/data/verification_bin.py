"""insightface verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw, ...).

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``2N`` encoded images
(JPEG bytes), pair ``i`` is images ``2i`` and ``2i+1``; ``issame_list`` has
``N`` booleans. Files written by Python 2 hold the images as ``str``, read
back as ``bytes`` with ``encoding='bytes'``.

A pickle can run any callable it names, so :func:`read_bin_raw` unpickles with
:class:`SafeUnpickler`: the only globals it resolves are the two a pickled
``bytes`` needs under protocols 0-2 (``_codecs.encode(str, 'latin1')`` and
``bytes()`` for ``b''``, both checked); any other global or a persistent id
raises :class:`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from x2jax.data.images import decode_image, encode_image

VERIFICATION_NAMES = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


class UnsafePickleError(ValueError):
    """A ``.bin`` pickle asked for a global or persistent id outside the allow-list."""


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as Python 3 pickles ``bytes`` (protocols 0-2): str, 'latin1' -> bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"_codecs.encode called with ({type(text).__name__}, {encoding!r}); "
            "a pickled bytes object calls it with (str, 'latin1')"
        )
    return text.encode("latin-1")


def _empty_bytes(*args):
    """``bytes()`` as Python 3 pickles ``b''`` (protocols 0-2); any argument is refused."""
    if args:
        raise UnsafePickleError(f"bytes called with {len(args)} argument(s); a pickled b'' calls bytes()")
    return b""


# (module, name) as written in the pickle -> the checked callable returned for it.
SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,  # the Python 2 name protocols 0-2 write
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler of verification ``.bin`` files: only :data:`SAFE_GLOBALS`, no persistent ids.

    Args:
      file: binary file object positioned at the pickle.
    """

    def __init__(self, file):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes; Python 3 str unaffected

    def find_class(self, module, name):
        """The checked callable for an allowed global; ``UnsafePickleError`` otherwise."""
        try:
            return SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            allowed = ", ".join(sorted({f"{m}.{n}" for m, n in SAFE_GLOBALS}))
            raise UnsafePickleError(
                f"refused to unpickle global {module!s}.{name!s}: a verification .bin "
                f"holds only byte strings and bools (allowed globals: {allowed}); "
                "if the file is trusted, re-save it as (list of bytes, list of bool)"
            ) from None

    def persistent_load(self, pid):
        """Always ``UnsafePickleError``: a ``.bin`` has no persistent ids."""
        raise UnsafePickleError(f"refused persistent id {pid!r} (a verification .bin has none)")


def _check_structure(path: str, obj) -> tuple[list[bytes], np.ndarray]:
    """Validated (bins, issame) from an unpickled object; ``ValueError`` naming ``path`` otherwise."""
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(
            f"{path}: expected (list of bytes, list of bool), got "
            f"({type(bins).__name__}, {type(issame).__name__})"
        )
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(b).__name__}, expected encoded bytes")
    for i, s in enumerate(issame):
        if type(s) not in (bool, int) or s not in (0, 1):  # bool is an int; 1/0 from some writers
            raise ValueError(f"{path}: issame[{i}] is {s!r} ({type(s).__name__}), expected a bool or 0/1")
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images but {len(issame)} pairs (a .bin needs exactly 2 images per pair)"
        )
    return [bytes(b) for b in bins], np.asarray(issame, dtype=bool).reshape(-1)


def read_bin_raw(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Reads a ``.bin`` without decoding its images, through :class:`SafeUnpickler`.

    Args:
      path: the ``.bin`` file.

    Returns:
      (list of 2N encoded image byte strings, issame bool (N,)).

    Raises:
      FileNotFoundError: no such file.
      UnsafePickleError: the pickle names a global outside :data:`SAFE_GLOBALS`
        or a persistent id (nothing it names is called).
      ValueError: not a pickle, or not (list of bytes, list of bool) with 2 images per pair.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin file not found: {path}")
    with open(path, "rb") as f:
        try:
            obj = SafeUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(f"{path}: not a verification .bin pickle: {type(e).__name__}: {e}") from e
    return _check_structure(path, obj)


def load_bin(
    path: str | os.PathLike, image_size: tuple[int, int] | None = (112, 112)
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a ``.bin`` and decodes its images.

    Args:
      path: the ``.bin`` file.
      image_size: (H, W); images of another size are resized (bilinear, as
        insightface does). ``None`` keeps the stored size (all must agree).

    Returns:
      (images uint8 (2N, H, W, 3) RGB, issame bool (N,)).

    Raises:
      ValueError: an undecodable image (naming the file and image index), or
        differing sizes with ``image_size=None``; see :func:`read_bin_raw` for the rest.
    """
    bins, issame = read_bin_raw(path)
    return decode_pairs(bins, image_size, where=os.fspath(path)), issame


def decode_pairs(bins: Sequence[bytes], image_size: tuple[int, int] | None, *, where: str) -> np.ndarray:
    """Encoded images of a verification set -> uint8 (2N, H, W, 3) RGB, resized to ``image_size``.

    Args:
      bins: the 2N encoded images (pair i is images 2i and 2i + 1).
      image_size: (H, W) to resize to (bilinear); None keeps the stored size.
      where: the file or dataset, for error messages.

    Raises:
      ValueError: an undecodable image (naming ``where`` and the image index), or
        differing sizes with ``image_size=None``.
    """
    images = []
    for i, b in enumerate(bins):
        try:
            images.append(decode_image(b, image_size))
        except ValueError as e:
            raise ValueError(f"{where}: image {i} (pair {i // 2}): {e}") from e
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images have different sizes {sorted(shapes)}; pass image_size=(H, W) to resize")
    if not images:
        return np.zeros((0, *(image_size or (112, 112)), 3), np.uint8)
    return np.stack(images)


def write_bin(
    path: str | os.PathLike,
    images: np.ndarray | Sequence[bytes],
    issame,
    *,
    fmt: str = "JPEG",
    quality: int = 95,
    protocol: int = 4,
) -> None:
    """Writes a ``.bin`` as insightface does: ``pickle.dump((bins, issame_list))``.

    Args:
      path: output file (its folder is created).
      images: uint8 (2N, H, W, 3) (encoded here as ``fmt``; other dtypes are
        cast to uint8) or 2N byte strings (stored as given).
      issame: N booleans, one per pair.
      fmt: ``JPEG`` or ``PNG``.
      quality: JPEG quality.
      protocol: pickle protocol.

    Raises:
      ValueError: not exactly 2 images per pair.
    """
    issame = [bool(s) for s in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(issame):
        raise ValueError(
            f"write_bin: {len(images)} images but {len(issame)} pairs (need exactly 2 images per pair)"
        )
    bins = [
        img
        if isinstance(img, (bytes, bytearray))
        else encode_image(np.asarray(img, np.uint8), fmt, quality=quality)
        for img in images
    ]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=protocol)
