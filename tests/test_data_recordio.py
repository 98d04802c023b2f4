"""RecordIO framing / IRHeader / insightface layout, checked against the dmlc spec."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from x2jax.data import insightface_rec, recordio
from x2jax.data.images import decode_image
from x2jax.data.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, RecordIOError, pack, unpack

MAGIC = struct.pack("<I", 0xCED7230A)


def frame(cflag, length):
    return MAGIC + struct.pack("<I", (cflag << 29) | length)


def write_records(tmp_path, payloads, name="a"):
    idx, rec = tmp_path / f"{name}.idx", tmp_path / f"{name}.rec"
    w = MXIndexedRecordIO(idx, rec, "w")
    for i, p in enumerate(payloads):
        w.write_idx(i, p)
    w.close()
    return idx, rec


def smooth_images(n, size, seed=0):
    """Low-frequency RGB images (JPEG keeps them close)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BILINEAR)) for s in small])


def jpeg(img, quality=95):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_framing_matches_dmlc_spec_byte_for_byte(tmp_path):
    # b"hello": one part (cflag 0), zero-padded to 8 bytes.
    # MAGIC + b"xyz": split at offset 0 -> cflag 1 (length 0), cflag 3 "xyz" + 1 pad byte.
    # b"abcd" MAGIC b"efgh" MAGIC: cflag 1 "abcd", cflag 2 "efgh", cflag 3 "" (empty).
    # A magic word at an unaligned offset (1) is not split (dmlc checks 4-byte steps).
    p1 = b"hello"
    p2 = MAGIC + b"xyz"
    p3 = b"abcd" + MAGIC + b"efgh" + MAGIC
    p4 = b"a" + MAGIC + b"bcd"
    _, rec = write_records(tmp_path, [p1, p2, p3, p4])
    expected = (
        frame(0, 5)
        + b"hello\0\0\0"
        + frame(1, 0)
        + frame(3, 3)
        + b"xyz\0"
        + frame(1, 4)
        + b"abcd"
        + frame(2, 4)
        + b"efgh"
        + frame(3, 0)
        + frame(0, 8)
        + p4
    )
    assert rec.read_bytes() == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_roundtrip_random_payloads_with_magic_words(tmp_path, seed):
    rng = np.random.default_rng(seed)
    payloads = [b"", MAGIC, MAGIC * 3, b"12" + MAGIC, MAGIC + b"1"]
    for _ in range(40):
        parts = [
            rng.bytes(int(rng.integers(0, 9)) * 4 + int(rng.integers(0, 4)))
            for _ in range(int(rng.integers(1, 4)))
        ]
        payloads.append(MAGIC.join(parts) if rng.random() < 0.7 else b"".join(parts))
    idx, rec = write_records(tmp_path, payloads)
    r = MXIndexedRecordIO(idx, rec, "r")
    assert r.keys == list(range(len(payloads)))
    for i in rng.permutation(len(payloads)):  # random access
        assert r.read_idx(int(i)) == payloads[i]
    seq = MXRecordIO(rec, "r")  # sequential
    got = []
    while (x := seq.read()) is not None:
        got.append(x)
    assert got == payloads
    # .idx is 'key<TAB>offset' lines with the offsets of record starts.
    lines = idx.read_text().splitlines()
    assert lines[0] == "0\t0" and all("\t" in line for line in lines)


def test_irheader_pack_layout_scalar_and_multi_label():
    s = pack(IRHeader(0, 7.0, 3, 4), b"payload")
    assert struct.unpack("<IfQQ", s[:24]) == (0, 7.0, 3, 4) and s[24:] == b"payload"
    h, p = unpack(s)
    assert h == IRHeader(0, 7.0, 3, 4) and p == b"payload"

    labels = [1.5, -2.0, 3.25]
    s = pack(IRHeader(99, labels, 5, 0), b"xy")  # flag is set from the label count
    assert struct.unpack("<IfQQ", s[:24]) == (3, 0.0, 5, 0)
    assert np.frombuffer(s[24:36], "<f4").tolist() == labels and s[36:] == b"xy"
    h, p = unpack(s)
    assert h.flag == 3 and h.label.dtype == np.float32 and h.label.tolist() == labels
    assert p == b"xy"


def test_unpack_rejects_short_records():
    with pytest.raises(RecordIOError, match="shorter than an IRHeader"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="4 float labels"):
        unpack(struct.pack("<IfQQ", 4, 0, 0, 0) + b"\0" * 8)


def test_insightface_record0_layout(tmp_path):
    labels = np.array([2, 0, 1, 0, 2, 2, 4])  # identity 3 has no images
    imgs = [b"img%d" % i for i in range(len(labels))]
    insightface_rec.write_insightface_rec(tmp_path, imgs, labels, num_classes=5, image_size=(8, 8))
    r = MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    h0, _ = unpack(r.read_idx(0))
    n = len(labels)
    assert h0.flag == 2 and h0.label.tolist() == [n + 1, n + 6]
    # Images sorted by label, keys 1..n, header label = identity.
    order = np.argsort(labels, kind="stable")
    for key, i in enumerate(order, 1):
        h, payload = unpack(r.read_idx(key))
        assert (h.flag, h.label, payload) == (0, float(labels[i]), imgs[i])
    # Identity records: (start, end) image key ranges.
    ranges = [unpack(r.read_idx(n + 1 + c))[0].label.tolist() for c in range(5)]
    assert ranges == [[1, 3], [3, 4], [4, 7], [7, 7], [7, 8]]
    assert (tmp_path / "property").read_text().strip() == "5,8,8"

    info = insightface_rec.read_insightface_rec(tmp_path)
    assert info.num_classes == 5 and info.image_size == (8, 8)
    assert info.image_keys.tolist() == list(range(1, n + 1))
    assert info.labels.tolist() == sorted(labels.tolist())


def test_insightface_dataset_of_jpegs_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 300, 37
    images = smooth_images(n, 24)
    labels = rng.integers(0, c, n)
    labels[:c] = np.arange(c)  # every identity present
    jpegs = [jpeg(im) for im in images]
    insightface_rec.write_insightface_rec(tmp_path, jpegs, labels, image_size=(24, 24))
    info = insightface_rec.read_insightface_rec(tmp_path)
    assert info.num_classes == c and len(info.labels) == n
    reader = info.reader()
    order = np.argsort(labels, kind="stable")
    for pos in range(n):
        header, img = recordio.unpack_img(reader.read_idx(int(info.image_keys[pos])))
        src = order[pos]
        assert info.labels[pos] == labels[src] == int(header.label)
        assert img.shape == (24, 24, 3) and img.dtype == np.uint8
        # Exactly PIL's decode of the bytes we stored for that image; close to its pixels.
        assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(jpegs[src])).convert("RGB")))
        assert np.abs(img.astype(int) - images[src]).mean() < 6.0


def test_pack_img_unpack_img_png_exact():
    img = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    h, out = recordio.unpack_img(recordio.pack_img(IRHeader(0, 3, 1, 0), img, img_fmt=".png"))
    assert h.label == 3.0 and np.array_equal(out, img)


def test_labels_from_headers_without_record0(tmp_path):
    # A plain indexed .rec (no record 0 layout): labels come from every header.
    idx, rec = tmp_path / "train.idx", tmp_path / "train.rec"
    w = MXIndexedRecordIO(idx, rec, "w")
    for key, lab in [(1, 2.0), (2, [1.0, 9.0]), (3, 0.0)]:
        w.write_idx(key, pack(IRHeader(0, lab, key, 0), b"x"))
    w.close()
    info = insightface_rec.read_insightface_rec(tmp_path)
    assert info.labels.tolist() == [2, 1, 0] and info.num_classes == 3


def test_labels_from_headers_agrees_and_catches_misordered_identity_records(tmp_path):
    labels = np.array([1, 0, 2, 1, 0, 0])
    insightface_rec.write_insightface_rec(tmp_path, [b"i%d" % i for i in range(6)], labels, image_size=(8, 8))
    auto = insightface_rec.read_insightface_rec(tmp_path)
    scan = insightface_rec.read_insightface_rec(tmp_path, labels_from="headers")
    assert scan.image_keys.tolist() == auto.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert scan.labels.tolist() == auto.labels.tolist() == [0, 0, 0, 1, 1, 2]
    # Swap identity records 0 and 1: their ranges no longer match the image headers.
    idx = tmp_path / "train.idx"
    lines = dict(line.split("\t") for line in idx.read_text().splitlines())
    lines["7"], lines["8"] = lines["8"], lines["7"]
    idx.write_text("".join(f"{k}\t{v}\n" for k, v in lines.items()))
    with pytest.raises(RecordIOError, match="labels_from='headers'"):
        insightface_rec.read_insightface_rec(tmp_path)
    assert insightface_rec.read_insightface_rec(tmp_path, labels_from="headers").labels.tolist() == [
        0,
        0,
        0,
        1,
        1,
        2,
    ]


def test_record_keys_past_float32_exact_integers_scan_headers(tmp_path):
    """Record 0 labels above 2**24 are rounded in float32: image labels come from headers."""
    w = MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "w")
    w.write_idx(0, pack(IRHeader(0, [2**25 + 1, 2**25 + 3], 0, 0), b""))
    w.write_idx(1, pack(IRHeader(0, 1.0, 1, 0), b"x"))
    w.write_idx(2, pack(IRHeader(0, 0.0, 2, 0), b"y"))
    w.write_idx(3, pack(IRHeader(0, [2, 3], 0, 0), b""))  # identity records: empty payload
    w.write_idx(4, pack(IRHeader(0, [1, 2], 0, 0), b""))
    w.close()
    info = insightface_rec.read_insightface_rec(tmp_path)
    assert info.image_keys.tolist() == [1, 2] and info.labels.tolist() == [1, 0]


def test_labels_outside_property_num_classes_raise(tmp_path):
    insightface_rec.write_insightface_rec(tmp_path, [b"a", b"b"], [0, 3], image_size=(112, 112))
    (tmp_path / "property").write_text("2,112,112\n")
    with pytest.raises(RecordIOError, match=r"outside \[0, 2\)"):
        insightface_rec.read_insightface_rec(tmp_path)


def test_truncated_file_names_file_and_offset(tmp_path):
    payloads = [b"a" * 40, b"b" * 40, b"c" * 40]
    idx, rec = write_records(tmp_path, payloads)
    data = rec.read_bytes()
    rec.write_bytes(data[:-10])  # cut into the last payload
    r = MXIndexedRecordIO(idx, rec, "r")
    assert r.read_idx(1) == payloads[1]
    with pytest.raises(RecordIOError) as e:
        r.read_idx(2)
    msg = str(e.value)
    assert str(rec) in msg and "truncated" in msg and f"byte offset {2 * 48 + 8}" in msg
    rec.write_bytes(data[: 2 * 48 + 4])  # cut inside the last header
    r = MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(RecordIOError, match=f"truncated record header at byte offset {2 * 48}"):
        r.read_idx(2)


def test_wrong_magic_names_file_and_offset(tmp_path):
    idx, rec = write_records(tmp_path, [b"a" * 8, b"b" * 8])
    data = bytearray(rec.read_bytes())
    data[16:20] = b"\xde\xad\xbe\xef"  # second record's magic (records are 16 bytes)
    rec.write_bytes(bytes(data))
    r = MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(RecordIOError) as e:
        r.read_idx(1)
    assert str(rec) in str(e.value) and "byte offset 16" in str(e.value)
    assert "0xefbeadde" in str(e.value)


def test_bad_index_files(tmp_path):
    idx, rec = write_records(tmp_path, [b"a" * 8])
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match=r"a\.idx:2: offset 4096"):
        MXIndexedRecordIO(idx, rec, "r")
    idx.write_text("0 0\n")
    with pytest.raises(RecordIOError, match=r"a\.idx:1: expected 'key<TAB>offset'"):
        MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        MXIndexedRecordIO(idx, tmp_path / "nope.rec", "r")
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        insightface_rec.read_insightface_rec(tmp_path / "empty_dir")


def test_reader_pickles_and_reopens(tmp_path):
    import pickle

    idx, rec = write_records(tmp_path, [b"x" * 5, MAGIC + b"y"])
    r = MXIndexedRecordIO(idx, rec, "r")
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.read_idx(1) == MAGIC + b"y" and r2.read_idx(0) == b"x" * 5


def test_garbage_length_is_bounded_by_the_file_size(tmp_path):
    """A length field of 2**29 - 1 fails as past the end of the file, without a 512 MiB read."""
    import tracemalloc

    idx, rec = write_records(tmp_path, [b"a" * 40, b"b" * 40])
    data = bytearray(rec.read_bytes())
    data[52:56] = struct.pack("<I", (1 << 29) - 1)  # the second record's lrecord (records are 48 bytes)
    rec.write_bytes(bytes(data))
    r = MXIndexedRecordIO(idx, rec, "r")
    tracemalloc.start()
    try:
        with pytest.raises(RecordIOError) as e:
            r.read_idx(1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert str(rec) in str(e.value) and "truncated record payload at byte offset 56" in str(e.value)
    assert f"needed {(1 << 29)} bytes, the file ends after 40 (file size 96)" in str(e.value)
    assert e.value.offset == 56 and e.value.reason.startswith("truncated record payload")


def test_unaligned_offset_and_errors_pickle_with_their_fields(tmp_path):
    import pickle

    idx, rec = write_records(tmp_path, [b"a" * 8, b"b" * 8])
    idx.write_text("0\t0\n1\t18\n")  # inside record 1 (which starts at 16)
    r = MXIndexedRecordIO(idx, rec, "r")
    with pytest.raises(RecordIOError, match="byte offset 18 is not 4-byte aligned") as e:
        r.read_idx(1)
    # Worker processes send errors pickled: reason and offset survive.
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is RecordIOError and str(back) == str(e.value)
    assert (back.reason, back.offset) == (e.value.reason, 18) and str(rec) not in back.reason


def test_undecodable_bytes_message_shows_the_first_bytes():
    with pytest.raises(ValueError, match=r"cannot decode image \(7 bytes\): .*first bytes 67617262616765\)"):
        decode_image(b"garbage")
