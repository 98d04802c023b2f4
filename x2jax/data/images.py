"""The image codec of x2jax.data: encode, decode, resize, normalise.

Every module that turns pixels into bytes or back uses these functions
(RecordIO ``pack_img`` / ``unpack_img``, the insightface writer, ``.bin``
files, TFDS builders, the training loader), so they all agree:

- :func:`encode_image`: RGB (or grey) uint8 -> JPEG or PNG bytes (PIL);
- :func:`decode_image`: encoded bytes -> RGB uint8 (H, W, 3), optionally resized;
- :func:`resize_image`: to (H, W) with :data:`RESAMPLE` (bilinear, as insightface);
- :func:`normalize`: uint8 -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1].

Arrays are RGB; MXNet / OpenCV code uses BGR arrays, but the encoded files
are the same either way.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

RESAMPLE = Image.Resampling.BILINEAR
"""The one resampling filter for resizing face images."""

_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}


def image_format(fmt: str) -> str:
    """PIL's format name for ``fmt``.

    Args:
      fmt: ``jpeg`` / ``jpg`` / ``png``, in any case, with or without a leading dot.

    Returns:
      ``'JPEG'`` or ``'PNG'``.

    Raises:
      ValueError: another format.
    """
    name = _FORMATS.get(str(fmt).lower().lstrip("."))
    if name is None:
        raise ValueError(f"image format must be JPEG (.jpg) or PNG (.png), got {fmt!r}")
    return name


def encode_image(
    img: np.ndarray, fmt: str = "jpeg", *, quality: int = 95, compress_level: int | None = None
) -> bytes:
    """Encodes an image with PIL.

    Args:
      img: uint8 (H, W, 3) RGB or (H, W) grey.
      fmt: ``jpeg`` or ``png`` (see :func:`image_format`).
      quality: JPEG quality (ignored for PNG).
      compress_level: PNG zlib level 0-9; ``None`` keeps PIL's default (ignored for JPEG).

    Returns:
      The encoded file's bytes.

    Raises:
      ValueError: ``img`` is not uint8 (H, W[, 3]), or ``fmt`` is neither JPEG nor PNG.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"cannot encode image: expected uint8 (H, W[, 3]), got {img.dtype} {img.shape}")
    name = image_format(fmt)
    if name == "JPEG":
        kwargs = {"quality": quality}
    else:
        kwargs = {} if compress_level is None else {"compress_level": compress_level}
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=name, **kwargs)
    return buf.getvalue()


def resize_image(img: np.ndarray, image_size: tuple[int, int] | None) -> np.ndarray:
    """``img`` resized to ``image_size`` with :data:`RESAMPLE`.

    Args:
      img: uint8 (H, W, 3).
      image_size: (H, W); ``None`` or the current size returns ``img`` itself.

    Returns:
      uint8 (image_size[0], image_size[1], 3).
    """
    if image_size is None or img.shape[:2] == tuple(image_size):
        return img
    return np.asarray(Image.fromarray(img).resize((image_size[1], image_size[0]), RESAMPLE))


def decode_image(data: bytes, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decodes JPEG / PNG / any format PIL reads to RGB.

    Args:
      data: the encoded bytes.
      image_size: (H, W) to resize to (:func:`resize_image`); ``None`` keeps the stored size.

    Returns:
      uint8 (H, W, 3) RGB.

    Raises:
      ValueError: undecodable; the message gives the byte count and, for data
        PIL does not recognise, the first 8 bytes in hex.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            img = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ...)
        detail = str(e)
        if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO address
            detail = f"not an image format PIL knows (first bytes {bytes(data[:8]).hex()})"
        raise ValueError(f"cannot decode image ({len(data)} bytes): {detail}") from e
    return resize_image(img, image_size)


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """Maps pixels to the network's input range.

    Computed as ``x * (2 / 255) - 1`` in float32; also works on jax arrays
    (inside ``jit`` too).

    Args:
      images_uint8: uint8 (..., 3).

    Returns:
      float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1], same shape.
    """
    out = images_uint8.astype(np.float32)
    out *= np.float32(2.0 / 255.0)
    out -= np.float32(1.0)
    return out
