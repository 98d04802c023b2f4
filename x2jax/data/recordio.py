"""MXNet (dmlc) RecordIO in pure Python/numpy: read and write, no MXNet.

Names follow ``mxnet.recordio`` so insightface users recognise them:
``MXRecordIO``, ``MXIndexedRecordIO`` (``.keys``, ``.read_idx(key)``,
``.write_idx(key, buf)``), ``IRHeader``, ``pack`` / ``unpack`` and
``pack_img`` / ``unpack_img`` (the image codec is :mod:`x2jax.data.images`).

Framing (dmlc-core ``recordio.h``), little endian::

    uint32 magic 0xced7230a | uint32 lrecord | data | zero pad to 4 bytes
    lrecord = (cflag << 29) | length

``cflag`` 0 is a whole record; a payload that contains the magic word at a
4-byte aligned position is split there into parts with cflag 1 (first),
2 (middle), 3 (last); the reader re-joins them, putting the magic word back.
The ``.idx`` file holds text lines ``key<TAB>byte_offset``.

Payload header ``IRHeader`` (struct ``'IfQQ'``, 24 bytes): flag, label, id,
id2. If ``flag > 0``, ``flag`` float32 labels follow the header (and the
header's own label field is 0).

The insightface dataset layout on top of this is :mod:`x2jax.data.insightface_rec`.

Reads use ``os.pread`` on a file descriptor opened per process, so one reader
object can be shared by threads and pickled to worker processes.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections import namedtuple
from typing import Any, Hashable, Sequence

import numpy as np

from x2jax.data import images

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "IfQQ"
_IR_STRUCT = struct.Struct("<" + _IR_FORMAT)
_IR_SIZE = _IR_STRUCT.size  # 24

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """MXNet image-record header: flag (uint32), label (float or float32
array), id, id2 (uint64)."""


class RecordIOError(ValueError):
    """A RecordIO / .idx file is malformed (the message names file and byte offset).

    ``reason`` is the message without the file name; ``offset`` the byte offset
    of the bad frame and ``record_key`` the record's name, where known.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        offset: int | None = None,
        record_key: str | None = None,
    ):
        super().__init__(message)
        self.reason = message if reason is None else reason
        self.offset = offset
        self.record_key = record_key


def _encode_lrecord(cflag: int, length: int) -> int:
    return (cflag << 29) | length


def _upper_align(length: int) -> int:
    return (length + 3) & ~3


class MXRecordIO:
    """Sequential RecordIO reader / writer, ``flag`` is ``'r'`` or ``'w'``.

    ``read()`` returns the next record's bytes (continuation parts re-joined) or
    ``None`` at the end of the file; ``write(buf)`` appends one record.
    """

    def __init__(self, uri: str | os.PathLike, flag: str):
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = os.fspath(uri)
        self.flag = flag
        self._fd: int | None = None
        self._pid: int | None = None
        self._writer = None
        self._pos = 0  # sequential read position
        self.open()

    # -- lifecycle -------------------------------------------------------------
    def open(self) -> None:
        if self.flag == "w":
            self._writer = open(self.uri, "wb")
        else:
            if not os.path.isfile(self.uri):
                raise FileNotFoundError(f"RecordIO file not found: {self.uri}")
            self._fd = os.open(self.uri, os.O_RDONLY)
            self._pid = os.getpid()
            self._size = os.fstat(self._fd).st_size
        self._pos = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def reset(self) -> None:
        """Back to the start (reader) / truncate and restart (writer)."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass

    def __getstate__(self) -> dict[str, Any]:
        if self.flag == "w":
            raise TypeError(f"cannot pickle a RecordIO writer ({self.uri})")
        state = dict(self.__dict__)
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _reader_fd(self) -> int:
        if self.flag != "r":
            raise ValueError(f"{self.uri} is open for writing, not reading")
        if self._fd is None or self._pid != os.getpid():
            # First use after unpickling or fork: one descriptor per process.
            self._fd = os.open(self.uri, os.O_RDONLY)
            self._pid = os.getpid()
            self._size = os.fstat(self._fd).st_size
        return self._fd

    # -- writing ---------------------------------------------------------------
    def tell(self) -> int:
        if self._writer is not None:
            return self._writer.tell()
        return self._pos

    def write(self, buf: bytes) -> None:
        """Appends one record, splitting at aligned magic words as dmlc does."""
        if self._writer is None:
            raise ValueError(f"{self.uri} is not open for writing")
        data = bytes(buf)
        length = len(data)
        if length >= (1 << 29):
            raise ValueError(f"record of {length} bytes is too long for RecordIO (< 2**29)")
        out = self._writer
        start = 0
        for i in range(0, length - length % 4, 4):
            if data[i : i + 4] == _MAGIC_BYTES:
                cflag = 1 if start == 0 else 2
                out.write(_FRAME.pack(MAGIC, _encode_lrecord(cflag, i - start)))
                out.write(data[start:i])
                start = i + 4
        cflag = 3 if start != 0 else 0
        out.write(_FRAME.pack(MAGIC, _encode_lrecord(cflag, length - start)))
        out.write(data[start:])
        pad = _upper_align(length) - length
        if pad:
            out.write(b"\0" * pad)

    # -- reading ---------------------------------------------------------------
    def _error(self, reason: str, offset: int) -> RecordIOError:
        return RecordIOError(f"{self.uri}: {reason}", reason=reason, offset=offset)

    def _pread_exact(self, count: int, offset: int, what: str) -> bytes:
        fd = self._reader_fd()
        if offset + count > self._size:
            self._size = os.fstat(fd).st_size  # the file may have grown since it was opened
        if offset + count > self._size:
            # Checked before reading: a garbage length must not allocate up to 512 MiB.
            have = max(0, self._size - offset)
            raise self._error(
                f"truncated {what} at byte offset {offset}: needed {count} bytes, the file "
                f"ends after {have} (file size {self._size})",
                offset,
            )
        data = os.pread(fd, count, offset)
        if len(data) != count:
            raise self._error(
                f"truncated {what} at byte offset {offset}: needed {count} bytes, the file "
                f"ends after {len(data)} (file size {self._size})",
                offset,
            )
        return data

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """Reads the record starting at byte ``offset``; returns (bytes, next offset).

        Raises :class:`RecordIOError` (file, byte offset) on a bad magic word, an
        unaligned offset, a cflag sequence that is not 0 or 1, 2..., 3, or a
        length past the end of the file; never reads more than the file holds.
        """
        if offset % 4:
            raise self._error(
                f"byte offset {offset} is not 4-byte aligned, so not the start of a record "
                "(a wrong .idx offset)",
                offset,
            )
        parts = []
        pos = offset
        while True:
            frame = self._pread_exact(8, pos, "record header")
            magic, lrecord = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise self._error(
                    f"bad magic word 0x{magic:08x} at byte offset {pos} "
                    f"(expected 0x{MAGIC:08x}); not a RecordIO file, or a wrong .idx offset",
                    pos,
                )
            cflag = lrecord >> 29
            length = lrecord & _LENGTH_MASK
            if parts and cflag not in (2, 3):
                raise self._error(
                    f"continuation part with cflag {cflag} at byte offset {pos} "
                    f"(expected 2 or 3 after a cflag 1 part)",
                    pos,
                )
            if not parts and cflag in (2, 3):
                raise self._error(
                    f"record at byte offset {pos} starts with cflag {cflag} "
                    "(a middle/last part); the offset is not the start of a record",
                    pos,
                )
            payload = self._pread_exact(_upper_align(length), pos + 8, "record payload")
            parts.append(payload[:length])
            pos += 8 + _upper_align(length)
            if cflag in (0, 3):
                break
        return _MAGIC_BYTES.join(parts), pos

    def read(self) -> bytes | None:
        """Next record, or ``None`` at the end of the file."""
        self._reader_fd()
        if self._pos >= self._size:
            return None
        data, self._pos = self.read_at(self._pos)
        return data

    def seek_offset(self, offset: int) -> None:
        self._pos = int(offset)


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a ``.idx`` file for random access (``key<TAB>offset`` lines).

    ``MXIndexedRecordIO(idx_path, rec_path, 'r')``: ``.keys`` (in file order),
    ``.idx`` (key -> byte offset), ``read_idx(key) -> bytes``.
    ``MXIndexedRecordIO(idx_path, rec_path, 'w')``: ``write_idx(key, buf)``.
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx: dict[Hashable, int] = {}
        self.keys: list[Hashable] = []
        self._fidx = None
        super().__init__(uri, flag)

    def open(self) -> None:
        super().open()
        self.idx = {}
        self.keys = []
        if self.flag == "w":
            self._fidx = open(self.idx_path, "w")
            return
        if not os.path.isfile(self.idx_path):
            raise FileNotFoundError(f"RecordIO index file not found: {self.idx_path}")
        with open(self.idx_path) as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                fields = line.split("\t")
                try:
                    key, offset = self.key_type(fields[0]), int(fields[1])
                except (IndexError, ValueError) as e:
                    raise RecordIOError(
                        f"{self.idx_path}:{line_no}: expected 'key<TAB>offset', got {line!r}"
                    ) from e
                if not 0 <= offset < self._size:
                    raise RecordIOError(
                        f"{self.idx_path}:{line_no}: offset {offset} of key {key!r} is outside "
                        f"{self.uri} (size {self._size})"
                    )
                self.idx[key] = offset
                self.keys.append(key)

    def close(self) -> None:
        if self._fidx is not None:
            self._fidx.close()
            self._fidx = None
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fidx"] = None
        return state

    def seek(self, key: Hashable) -> None:
        self.seek_offset(self._offset(key))

    def _offset(self, key: Hashable) -> int:
        try:
            return self.idx[key]
        except KeyError:
            raise KeyError(f"key {key!r} not in {self.idx_path}") from None

    def read_idx(self, key: Hashable) -> bytes:
        """The record stored under ``key``."""
        data, _ = self.read_at(self._offset(key))
        return data

    def read_header_idx(self, key: Hashable, max_labels: int = 2) -> IRHeader:
        """Only the IRHeader of record ``key`` (reads a few dozen bytes, not the image).

        Labels beyond ``max_labels`` are not read; falls back to a full read when
        the header itself is split by a continuation record.
        """
        return self._header_and_payload_len(key, max_labels)[0]

    def _header_and_payload_len(self, key: Hashable, max_labels: int = 2) -> tuple[IRHeader, int]:
        """(IRHeader, bytes of payload after the header and its labels) of record ``key``."""
        offset = self._offset(key)
        want = _IR_SIZE + 4 * max_labels
        frame = self._pread_exact(8, offset, "record header")
        magic, lrecord = _FRAME.unpack(frame)
        if magic != MAGIC or (lrecord >> 29) != 0:
            header, payload = unpack(self.read_idx(key))
            return header, len(payload)
        length = lrecord & _LENGTH_MASK
        data = self._pread_exact(min(want, length), offset + 8, "record payload")
        if len(data) < _IR_SIZE:
            raise RecordIOError(
                f"{self.uri}: record at byte offset {offset} has {length} bytes, "
                f"shorter than an IRHeader ({_IR_SIZE})"
            )
        header = IRHeader(*_IR_STRUCT.unpack_from(data))
        if header.flag > 0:
            n = min(header.flag, (len(data) - _IR_SIZE) // 4)
            header = header._replace(label=np.frombuffer(data, np.float32, n, _IR_SIZE))
        return header, length - _IR_SIZE - 4 * header.flag

    def write_idx(self, key: Hashable, buf: bytes) -> None:
        """Appends record ``buf`` under ``key`` (and its offset to the .idx file)."""
        pos = self.tell()
        self.write(buf)
        self._fidx.write(f"{key}\t{pos}\n")
        self.idx[key] = pos
        self.keys.append(key)


# -- payload header ----------------------------------------------------------
def pack(header: IRHeader | Sequence[Any], s: bytes) -> bytes:
    """IRHeader + (flag float32 labels when the label is a sequence) + payload ``s``."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
        extra = b""
    else:
        label = np.asarray(header.label, dtype=np.float32).ravel()
        header = header._replace(flag=label.size, label=0)
        extra = label.astype("<f4").tobytes()
    return (
        _IR_STRUCT.pack(int(header.flag), float(header.label), int(header.id), int(header.id2))
        + extra
        + bytes(s)
    )


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack`: (IRHeader with label float or float32 array (flag,), payload)."""
    if len(s) < _IR_SIZE:
        raise RecordIOError(f"record of {len(s)} bytes is shorter than an IRHeader ({_IR_SIZE})")
    header = IRHeader(*_IR_STRUCT.unpack_from(s))
    s = s[_IR_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(
                f"record header says {header.flag} float labels but only {len(s)} bytes follow"
            )
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag).copy())
        s = s[4 * header.flag :]
    return header, s


def pack_img(
    header: IRHeader | Sequence[Any], img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg"
) -> bytes:
    """Encodes an image (:func:`x2jax.data.images.encode_image`) and packs it.

    Args:
      header: the IRHeader (or its 4 fields).
      img: RGB uint8 (H, W, 3) or grey (H, W); MXNet's takes OpenCV BGR, the file is the same.
      quality: JPEG quality.
      img_fmt: ``.jpg`` or ``.png``.

    Returns:
      The record payload: header, labels, encoded image.

    Raises:
      ValueError: not a uint8 image, or another format.
    """
    return pack(header, images.encode_image(img, img_fmt, quality=quality))


def unpack_img(s: bytes) -> tuple[IRHeader, np.ndarray]:
    """(IRHeader, RGB uint8 (H, W, 3) image). MXNet's version returns BGR."""
    header, payload = unpack(s)
    return header, images.decode_image(payload)
