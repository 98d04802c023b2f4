"""insightface verification .bin files: round trip, both pickle encodings, errors."""

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from x2jax.data import verification_bin
from x2jax.data.verification_bin import load_bin, write_bin


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def py2_pickle(bins, issame):
    """What Python 2's pickle.dump((bins, issame), protocol=2) writes for str bins.

    Byte strings are BINSTRING opcodes ('T'), which Python 3 decodes as ASCII by
    default (fails on JPEG/PNG bytes) unless encoding='bytes'.
    """
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for b in bins:
        out.append(b"T" + struct.pack("<i", len(b)) + b)
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 12, 12, 3)).astype(np.uint8)
    issame = np.array([True, False, True, True, False])
    return images, issame


def test_roundtrip_png_exact(tmp_path, pairs):
    images, issame = pairs
    write_bin(tmp_path / "x.bin", images, issame, fmt="PNG")
    # The file is exactly pickle((list of bytes, list of bool)) as insightface writes it.
    bins, iss = pickle.loads((tmp_path / "x.bin").read_bytes())
    assert isinstance(bins, list) and all(isinstance(b, bytes) for b in bins)
    assert iss == issame.tolist()
    got, got_issame = load_bin(tmp_path / "x.bin", image_size=(12, 12))
    assert got.dtype == np.uint8 and got.shape == images.shape
    assert np.array_equal(got, images) and np.array_equal(got_issame, issame)
    assert got_issame.dtype == bool


def test_python2_pickle_needs_bytes_encoding(tmp_path, pairs):
    images, issame = pairs
    raw = py2_pickle([png(im) for im in images], issame)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # what a plain loader would hit
    (tmp_path / "py2.bin").write_bytes(raw)
    got, got_issame = load_bin(tmp_path / "py2.bin", image_size=None)
    assert np.array_equal(got, images) and np.array_equal(got_issame, issame)


def test_jpeg_and_resize(tmp_path, pairs):
    images, issame = pairs
    smooth = np.repeat(np.repeat(images[:, :3, :3], 4, 1), 4, 2)  # 12x12 blocks
    write_bin(tmp_path / "j.bin", smooth, issame)  # JPEG like the real sets
    got, _ = load_bin(tmp_path / "j.bin", image_size=(12, 12))
    bins, _ = verification_bin.read_bin_raw(tmp_path / "j.bin")
    assert bins[0][:2] == b"\xff\xd8"  # JPEG start-of-image marker
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    assert np.array_equal(got, decoded)
    assert np.abs(got.astype(int) - smooth).mean() < 20  # lossy, but the same picture
    got24, _ = load_bin(tmp_path / "j.bin", image_size=(24, 20))
    assert got24.shape == (10, 24, 20, 3)
    expected = np.asarray(Image.fromarray(got[3]).resize((20, 24), Image.BILINEAR))
    assert np.abs(got24[3].astype(int) - expected).max() <= 1


def test_mismatched_pair_counts(tmp_path, pairs):
    images, issame = pairs
    with pytest.raises(ValueError, match="10 images but 4 pairs"):
        write_bin(tmp_path / "bad.bin", images, issame[:4])
    with open(tmp_path / "bad.bin", "wb") as f:
        pickle.dump(([png(im) for im in images[:9]], issame.tolist()), f)
    with pytest.raises(ValueError, match=r"bad\.bin: 9 images but 5 pairs"):
        load_bin(tmp_path / "bad.bin")


def test_errors_name_the_file(tmp_path, pairs):
    images, issame = pairs
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        load_bin(tmp_path / "missing.bin")
    bins = [png(im) for im in images]
    bins[3] = b"not an image"
    with open(tmp_path / "corrupt.bin", "wb") as f:
        pickle.dump((bins, issame.tolist()), f)
    with pytest.raises(ValueError, match=r"corrupt\.bin: image 3 \(pair 1\)"):
        load_bin(tmp_path / "corrupt.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match=r"junk\.bin"):
        verification_bin.read_bin_raw(tmp_path / "junk.bin")
