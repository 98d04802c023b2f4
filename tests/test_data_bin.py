"""insightface verification .bin files: round trip, both pickle encodings, errors."""

import io
import os
import pathlib
import pickle
import pickletools
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

    Byte strings are SHORT_BINSTRING ('U', under 256 bytes) or BINSTRING ('T')
    opcodes, each memoised with BINPUT as Python 2 does; Python 3 decodes them
    as ASCII by default (fails on JPEG/PNG bytes) unless encoding='bytes'.
    """
    memo = iter(range(256))
    put = lambda: b"q" + bytes([next(memo)])  # BINPUT i
    out = [b"\x80\x02", b"]", put(), b"("]  # PROTO 2, EMPTY_LIST, BINPUT, MARK
    for b in bins:
        if len(b) < 256:
            out.append(b"U" + bytes([len(b)]) + b + put())
        else:
            out.append(b"T" + struct.pack("<i", len(b)) + b + put())
    out += [b"e", b"]", put(), b"("]  # APPENDS, EMPTY_LIST, BINPUT, MARK
    out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", put(), b"."]  # APPENDS, TUPLE2, BINPUT, STOP
    return b"".join(out)


def opcodes(raw):
    return [op.name for op, _, _ in pickletools.genops(raw)]


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


# ---------------------------------------------------------------------------
# Safe loading: only what a pickled (list of bytes, list of bool) needs
# ---------------------------------------------------------------------------


class Touch:
    """Unpickling this calls ``pathlib.Path.touch(marker)``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class System:
    """Unpickling this runs ``touch marker`` in a shell."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# First global each payload's pickle names, by protocol (pickletools.dis of each).
TOUCH_GLOBAL = {2: "__builtin__.getattr", 3: "builtins.getattr", 4: "pathlib.Path.touch", 5: "pathlib.Path.touch"}
SYSTEM_GLOBAL = f"{os.system.__module__}.system"  # posix.system on Linux


@pytest.fixture
def small_pairs():
    """Pairs whose PNGs straddle 256 bytes: flat images (short) and noise (long)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 12, 12, 3)).astype(np.uint8)
    images[::2] = images[::2, :1, :1]  # flat colour: a PNG well under 256 bytes
    return images, np.array([True, False, True])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["touch", "system"])
@pytest.mark.parametrize("where", ["top", "in_bins", "in_issame"])
def test_code_execution_payloads_are_refused_and_never_run(tmp_path, pairs, protocol, kind, where):
    images, issame = pairs
    bins = [png(im) for im in images]

    def evil(marker):
        payload = Touch(marker) if kind == "touch" else System(marker)
        if where == "top":
            return payload
        if where == "in_bins":
            return (bins[:-1] + [payload], issame.tolist())
        return (bins, issame.tolist()[:-1] + [payload])

    # The payload is live: a plain pickle.loads of the same construction runs it.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(evil(live), protocol=protocol))
    assert live.exists(), "the payload should run under plain pickle"
    marker = tmp_path / "pwned"
    raw = pickle.dumps(evil(marker), protocol=protocol)
    (tmp_path / "evil.bin").write_bytes(raw)
    expected = TOUCH_GLOBAL[protocol] if kind == "touch" else SYSTEM_GLOBAL
    for reader in (verification_bin.read_bin_raw, load_bin):
        with pytest.raises(verification_bin.UnsafePickleError) as err:
            reader(tmp_path / "evil.bin")
        assert isinstance(err.value, ValueError)
        assert str(err.value).startswith(str(tmp_path / "evil.bin") + ": refused to unpickle global ")
        assert f"global {expected}:" in str(err.value)
    assert not marker.exists()


def test_numpy_issame_persistent_ids_and_misused_allowed_globals_are_refused(tmp_path, pairs):
    images, issame = pairs
    bins = [png(im) for im in images]
    cases = {
        # numpy bools need numpy's reconstructors: refused (a .bin writer emits Python bools).
        "np_bool.bin": (
            pickle.dumps((bins, [np.bool_(s) for s in issame]), protocol=4),
            r"refused to unpickle global numpy\.\S*multiarray\.scalar:",
        ),
        "np_array.bin": (
            pickle.dumps((bins, issame), protocol=2),
            r"refused to unpickle global numpy\.\S*multiarray\._reconstruct:",
        ),
        # BINPERSID of the string 'id'.
        "persid.bin": (b"\x80\x02X\x02\x00\x00\x00idQ.", r"refused persistent id 'id'"),
        # _codecs.encode('abc', 'rot13'): allowed global, wrong codec.
        "rot13.bin": (
            b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",
            r"_codecs\.encode called with \(str, 'rot13'\)",
        ),
        # bytes(10**9): allowed global, with an argument (a pickled b'' has none).
        "bytes_arg.bin": (b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R.", r"bytes called with 1 argument"),
    }
    for name, (raw, match) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(verification_bin.UnsafePickleError, match=rf"{name}: {match}"):
            verification_bin.read_bin_raw(tmp_path / name)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_honest_python3_pickles_load_under_every_protocol(tmp_path, small_pairs, protocol):
    images, issame = small_pairs
    bins = [png(im) for im in images]
    with open(tmp_path / "p.bin", "wb") as f:
        pickle.dump((bins, issame.tolist()), f, protocol=protocol)
    raw = (tmp_path / "p.bin").read_bytes()
    assert ("GLOBAL" in opcodes(raw)) == (protocol < 3)  # protocols 0-2: _codecs.encode per bytes
    got_bins, got_issame = verification_bin.read_bin_raw(tmp_path / "p.bin")
    assert got_bins == bins and all(type(b) is bytes for b in got_bins)
    assert got_issame.dtype == bool and got_issame.tolist() == issame.tolist()
    got, _ = load_bin(tmp_path / "p.bin", image_size=None)
    assert np.array_equal(got, images)


def test_python2_pickle_with_short_and_long_binstrings_loads(tmp_path, small_pairs):
    images, issame = small_pairs
    bins = [png(im) for im in images]
    assert min(map(len, bins)) < 256 <= max(map(len, bins))
    raw = py2_pickle(bins, issame)
    ops = opcodes(raw)  # genops parses it as a whole pickle: well formed
    assert ops.count("SHORT_BINSTRING") + ops.count("BINSTRING") == len(bins)
    assert ops.count("SHORT_BINSTRING") >= 1 and ops.count("BINSTRING") >= 1
    assert not any("GLOBAL" in op or "REDUCE" in op for op in ops)
    assert pickle.loads(raw, encoding="bytes") == (bins, issame.tolist())  # reference loader
    (tmp_path / "py2.bin").write_bytes(raw)
    got_bins, got_issame = verification_bin.read_bin_raw(tmp_path / "py2.bin")
    assert got_bins == bins and got_issame.tolist() == issame.tolist()
    got, _ = load_bin(tmp_path / "py2.bin", image_size=None)
    assert np.array_equal(got, images)
    # Python 2 str that happen to be ASCII still come back as bytes (the default
    # encoding would make them str).
    (tmp_path / "ascii.bin").write_bytes(py2_pickle([b"abc", b"de"], [False]))
    assert verification_bin.read_bin_raw(tmp_path / "ascii.bin")[0] == [b"abc", b"de"]


def test_structure_is_validated(tmp_path, pairs):
    images, issame = pairs
    bins = [png(im) for im in images]
    cases = {
        "str_image.bin": ((bins[:3] + ["text"] + bins[4:], issame.tolist()), r"image 3 is str, expected encoded bytes"),
        "int_issame.bin": ((bins, [1, 0, 2, 1, 0]), r"issame\[2\] is 2 \(int\), expected a bool or 0/1"),
        "float_issame.bin": ((bins, [1.0] * 5), r"issame\[0\] is 1\.0 \(float\)"),
        "dict.bin": ({"bins": bins}, r"expected a pickled \(bins, issame_list\) pair, got dict"),
        "bytes_bins.bin": ((b"".join(bins), issame.tolist()), r"expected \(list of bytes, list of bool\), got \(bytes, list\)"),
    }
    for name, (obj, match) in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=rf"{name}: {match}"):
            verification_bin.read_bin_raw(tmp_path / name)
    # 0/1 ints (some writers) are accepted as bools.
    (tmp_path / "ints.bin").write_bytes(pickle.dumps((bins, [int(s) for s in issame]), protocol=2))
    assert verification_bin.read_bin_raw(tmp_path / "ints.bin")[1].tolist() == issame.tolist()
