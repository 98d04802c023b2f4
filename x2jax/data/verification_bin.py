"""insightface verification ``.bin`` files (lfw, cfp_fp, agedb_30, calfw, cplfw, ...).

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``2N`` encoded images
(JPEG bytes), pair ``i`` is images ``2i`` and ``2i+1``; ``issame_list`` has
``N`` booleans. Files written by Python 2 need ``encoding='bytes'`` to
unpickle; :func:`load_bin` tries the default first and falls back to it.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Sequence

import numpy as np

from x2jax.data.recordio import decode_image

VERIFICATION_NAMES = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")


def read_bin_raw(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(list of 2N encoded image byte strings, issame bool (N,)) without decoding."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = pickle.loads(raw)
    except UnicodeDecodeError:
        obj = pickle.loads(raw, encoding="bytes")  # Python-2 pickles of str
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{path}: not a verification .bin pickle: {e}") from e
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj)}")
    bins, issame = obj
    bins = [bytes(b) if not isinstance(b, bytes) else b for b in bins]
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(bins)} images but {len(issame)} pairs (a .bin needs exactly 2 images per pair)"
        )
    return bins, issame


def decode_and_resize(data: bytes, image_size: tuple[int, int] | None) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3), resized (bilinear) when the size differs."""
    img = decode_image(data)
    if image_size is not None and img.shape[:2] != tuple(image_size):
        from PIL import Image  # pylint: disable=import-outside-toplevel

        img = np.asarray(Image.fromarray(img).resize((image_size[1], image_size[0]), Image.BILINEAR))
    return img


def load_bin(
    path: str | os.PathLike, image_size: tuple[int, int] | None = (112, 112)
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a ``.bin``: (images uint8 (2N, H, W, 3) RGB, issame bool (N,)).

    Images of another size are resized to ``image_size`` (insightface does the
    same); ``image_size=None`` keeps the stored size (all must agree).
    Undecodable images raise ``ValueError`` naming the file and image index.
    """
    bins, issame = read_bin_raw(path)
    images = []
    for i, b in enumerate(bins):
        try:
            images.append(decode_and_resize(b, image_size))
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: image {i} (pair {i // 2}): {e}") from e
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{os.fspath(path)}: images have different sizes {sorted(shapes)}; "
            "pass image_size=(H, W) to resize"
        )
    if not images:
        return np.zeros((0, *(image_size or (112, 112)), 3), np.uint8), issame
    return np.stack(images), issame


def encode_image(img: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """RGB uint8 (H, W, 3) -> encoded bytes (JPEG or PNG)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(
        buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {})
    )
    return buf.getvalue()


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

    ``images`` is uint8 (2N, H, W, 3) (encoded here as ``fmt``) or 2N byte strings.
    """
    issame = [bool(s) for s in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(issame):
        raise ValueError(
            f"write_bin: {len(images)} images but {len(issame)} pairs (need exactly 2 images per pair)"
        )
    bins = [img if isinstance(img, (bytes, bytearray)) else encode_image(img, fmt, quality) for img in images]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=protocol)
