"""Bad training data ends in a clear error, never a hang: junk, wrong sizes, framing, empty sets."""

import io
import logging
import struct
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from x2jax.data import insightface_rec, pipeline, recordio, sources
from x2jax.data.image_folder import ImageFolderSource
from x2jax.data.insightface_rec import InsightFaceRecSource
from x2jax.data.pipeline import CorruptImageError, NoUsableRecordsError, make_train_loader
from x2jax.data.sources import EmptyDatasetError
from x2jax.train import inputs

from test_data_pipeline import BytesSource

LOOSE_SECONDS = 60  # a guard against hangs, not a benchmark


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def random_pngs(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)) for _ in range(n)]


def loader(src, **kw):
    kw = {"batch_size": 8, "seed": 0, "shard_index": 0, "shard_count": 1, "flip": False, **kw}
    return make_train_loader(src, **kw)


def starved_error(it):
    """(message of the NoUsableRecordsError that iterating ``it`` raises, seconds it took)."""
    t0 = time.perf_counter()
    with pytest.raises(NoUsableRecordsError) as e:
        for _ in it:
            pass
    return str(e.value), time.perf_counter() - t0


def junk_rec(directory, n):
    """Valid RecordIO framing and IRHeaders; payloads no image decoder knows."""
    junk = [b"junk%06d" % i * 4 for i in range(n)]
    insightface_rec.write_insightface_rec(directory, junk, np.arange(n) % 10, image_size=(112, 112))
    return InsightFaceRecSource(directory)


# ---------------------------------------------------------------------------
# No hang: a run of corrupt records ends in NoUsableRecordsError.
def test_all_junk_rec_endless_loader_raises_within_seconds(tmp_path):
    src = junk_rec(tmp_path, 1500)
    it = loader(src)  # num_epochs=None: endless, as in training
    outcome = {}

    def consume():
        try:
            next(it)
            outcome["result"] = "a batch"
        except Exception as e:  # noqa: BLE001 (reported below)
            outcome["result"] = e

    t0 = time.perf_counter()
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(LOOSE_SECONDS)
    assert not thread.is_alive(), f"no batch and no error after {LOOSE_SECONDS} s"
    err = outcome["result"]
    assert isinstance(err, NoUsableRecordsError) and isinstance(err, ValueError), err
    msg = str(err)
    # 1,500 records per epoch > 1,000: the default limit applies.
    assert "no usable training record in 1,000 consecutive records" in msg
    assert "max_consecutive_corrupt=1,000" in msg and "1,500 records" in msg
    assert "reasons: 1,000 undecodable image" in msg
    assert "not images PIL can decode" in msg  # the likely cause
    first = msg.split("first skipped:")[1].strip().splitlines()
    assert len(first) == 3
    for line in first:
        assert line.strip().startswith(f"{src.info.rec_path} record ")
        assert "not an image format PIL knows (first bytes 6a756e6b" in line  # b"junk"
    assert time.perf_counter() - t0 < LOOSE_SECONDS


def test_property_112_for_64px_images_names_both_sizes_and_the_property_file(tmp_path):
    insightface_rec.write_insightface_rec(
        tmp_path, random_pngs(300, 64), np.arange(300) % 7, image_size=(112, 112)
    )
    assert (tmp_path / "property").read_text().strip() == "7,112,112"
    src = InsightFaceRecSource(tmp_path)
    # num_epochs=5: before this limit existed, the loader ended silently after 5 epochs.
    msg, seconds = starved_error(loader(src, num_epochs=5))
    # 300 records per epoch < 1,000: one epoch of the shard is the limit.
    assert "no usable training record in 300 consecutive records of shard 0 of 1" in msg
    assert "reasons: 300 wrong size 64x64" in msg
    assert f"the images are 64x64 but 112x112 is expected (from {tmp_path / 'property'})" in msg
    assert "image size 64x64 != expected 112x112" in msg and f"{tmp_path}/train.rec record " in msg
    assert seconds < LOOSE_SECONDS


def test_image_folder_of_another_size_names_the_sizes(tmp_path):
    pngs = iter(random_pngs(12, 64))
    for name in ("ann", "bob", "cy"):
        (tmp_path / name).mkdir()
        for j in range(4):
            (tmp_path / name / f"{j}.png").write_bytes(next(pngs))
    src = ImageFolderSource(tmp_path)  # default 112x112
    msg, seconds = starved_error(loader(src, batch_size=4, num_epochs=5))
    assert "no usable training record in 12 consecutive records" in msg
    assert "the images are 64x64 but 112x112 is expected (from ImageFolderSource's image_size" in msg
    assert f"{tmp_path}/" in msg.split("first skipped:")[1] and ".png: image size 64x64" in msg
    assert seconds < LOOSE_SECONDS


def test_error_raised_in_a_worker_process_reaches_the_caller(tmp_path):
    src = junk_rec(tmp_path, 200)
    it = loader(src, worker_count=1, num_epochs=20)
    try:
        msg, seconds = starved_error(it)
    finally:
        it.close()
    assert "no usable training record in 200 consecutive records" in msg and "undecodable image" in msg
    assert seconds < LOOSE_SECONDS


def mixed_source(n, bad):
    """Record i is junk where bad[i], else one 4x4 PNG."""
    good = random_pngs(1, 4)[0]
    blobs = [b"not an image" if b else good for b in bad]
    return BytesSource(blobs, [0] * n, (4, 4))


def skipped_in_yielded_batches(bad_in_stream, batch_size):
    """Corrupt records before the end of the last full batch (a dropped partial batch's are not counted)."""
    good_seen = np.cumsum(~bad_in_stream)
    full = (good_seen[-1] // batch_size) * batch_size
    end = int(np.searchsorted(good_seen, full)) + 1 if full else 0
    return int(bad_in_stream[:end].sum())


def stream_of(n, epochs):
    return np.concatenate(
        [pipeline.shard_positions(n, seed=0, shard_index=0, shard_count=1, epoch=e) for e in range(epochs)]
    )


def test_a_good_record_resets_the_run_limit_is_the_longest_run():
    """The longest run of corrupt records in the stream (from shard_positions) decides it."""
    n, epochs = 400, 2
    bad = np.random.default_rng(3).random(n) < 0.5
    src = mixed_source(n, bad)
    stream = stream_of(n, epochs)
    runs, run = [], 0
    for i in stream:
        run = run + 1 if bad[i] else 0
        runs.append(run)
    longest = max(runs)
    assert 5 < longest < 30  # far below the 400 corrupt records in all

    it = loader(src, num_epochs=epochs, max_consecutive_corrupt=longest + 1)
    batches = list(it)
    assert it.num_skipped == skipped_in_yielded_batches(bad[stream], 8) > 10 * longest  # never starved
    assert sum(len(b["label"]) for b in batches) == 8 * ((epochs * int((~bad).sum())) // 8)

    msg, _ = starved_error(loader(src, num_epochs=epochs, max_consecutive_corrupt=longest))
    assert f"no usable training record in {longest} consecutive records" in msg
    assert f"max_consecutive_corrupt={longest}" in msg and "blob" in msg


def test_skip_warnings_are_rate_limited(caplog, monkeypatch):
    n = 3000
    bad = np.arange(n) % 3 != 0  # 2,000 corrupt records, runs of at most a few
    src = mixed_source(n, bad)
    with caplog.at_level(logging.WARNING, logger="x2jax.data.pipeline"):
        t0 = time.perf_counter()
        it = loader(src, batch_size=10, num_epochs=1)
        batches = list(it)
        seconds = time.perf_counter() - t0
    assert it.num_skipped == skipped_in_yielded_batches(bad[stream_of(n, 1)], 10) > 1990
    assert len(batches) == 100
    lines = [r.getMessage() for r in caplog.records if r.name == "x2jax.data.pipeline"]
    # The first record in full, then one line per LOG_EVERY_S (was: 2,000 lines).
    assert 1 <= len(lines) <= 2 + seconds / pipeline.LOG_EVERY_S, lines[:5]
    assert lines[0].startswith("skipping corrupt training record blob") and "cannot decode image" in lines[0]

    # With no interval every skip after the first is a summary line with the running count.
    monkeypatch.setattr(pipeline, "LOG_EVERY_S", 0.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="x2jax.data.pipeline"):
        it = loader(src, batch_size=10, num_epochs=1)
        next(it)
    lines = [r.getMessage() for r in caplog.records if r.name == "x2jax.data.pipeline"]
    assert len(lines) == it.num_skipped >= 2
    assert lines[-1].startswith("skipped 1 corrupt training records in the last ")
    assert f"({it.num_skipped:,} in all; last: blob" in lines[-1]


# ---------------------------------------------------------------------------
# RecordIO framing errors are corrupt records: skipped and counted, or raised.
def _offsets(idx_path):
    return {int(k): int(v) for k, v in (line.split("\t") for line in idx_path.read_text().splitlines())}


def _corrupt(tmp_path, how, key):
    """Damages record ``key``; returns the byte offset the reader will complain about."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    offsets = _offsets(idx)
    o = offsets[key]
    data = bytearray(rec.read_bytes())
    (length,) = struct.unpack_from("<I", data, o + 4)
    if how == "bad_magic":
        data[o : o + 4] = b"\xde\xad\xbe\xef"
    elif how == "garbage_length":  # cflag 0, the largest length: far past the end of the file
        struct.pack_into("<I", data, o + 4, (1 << 29) - 1)
    elif how == "bad_cflag":  # a 'last part' frame where a record should start
        struct.pack_into("<I", data, o + 4, (3 << 29) | (length & ((1 << 29) - 1)))
    elif how in ("mid_record_offset", "unaligned_offset"):
        offsets[key] = o + (8 if how == "mid_record_offset" else 2)
        idx.write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
    rec.write_bytes(bytes(data))
    return {"garbage_length": o + 8, "mid_record_offset": o + 8, "unaligned_offset": o + 2}.get(how, o)


FRAMING = ["bad_magic", "mid_record_offset", "unaligned_offset", "garbage_length", "bad_cflag"]


@pytest.mark.parametrize("how", FRAMING)
def test_framing_error_skipped_and_counted(tmp_path, how):
    n = 40
    images = np.random.default_rng(5).integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    insightface_rec.write_insightface_rec(tmp_path, [png(im) for im in images], np.arange(n), image_size=(8, 8))
    _corrupt(tmp_path, how, key=8)  # keys follow the sorted labels: key 8 holds label 7
    src = InsightFaceRecSource(tmp_path)
    it = loader(src, batch_size=13, num_epochs=1)
    batches = list(it)
    assert it.num_skipped == 1 and len(batches) == 3
    got = np.concatenate([b["label"] for b in batches])
    assert sorted(got.tolist()) == [i for i in range(n) if i != 7]
    for b in batches:  # the other records decode exactly (PNG)
        assert np.allclose(b["image"], images[b["label"]] / 127.5 - 1, atol=1e-6)


@pytest.mark.parametrize("how", FRAMING)
def test_framing_error_raised_names_file_key_and_offset(tmp_path, how):
    insightface_rec.write_insightface_rec(tmp_path, random_pngs(20, 8), np.arange(20), image_size=(8, 8))
    offset = _corrupt(tmp_path, how, key=5)
    src = InsightFaceRecSource(tmp_path)
    it = loader(src, batch_size=4, num_epochs=1, on_corrupt="raise")
    with pytest.raises(CorruptImageError) as e:
        list(it)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'train.rec'} record 5: .idx offset ")
    assert f"byte offset {offset}" in msg
    # The source itself raises RecordIOError with the same names.
    with pytest.raises(recordio.RecordIOError, match=f"record 5: .*byte offset {offset}"):
        src[4]


# ---------------------------------------------------------------------------
# Empty datasets say so, naming the path, when opened.
def test_empty_rec_says_empty(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.rec").write_bytes(b"")
    (tmp_path / "b" / "train.idx").write_text("")
    (tmp_path / "b" / "property").write_text("10,112,112\n")
    with pytest.raises(EmptyDatasetError, match=r"b/train\.rec: the dataset is empty: no image records .*0 record"):
        InsightFaceRecSource(tmp_path / "b")
    # Through the trainer's entry point: before any model or head is built.
    cfg = ml_collections.ConfigDict(dict(name="insightface_rec", path=str(tmp_path / "b")))
    with pytest.raises(EmptyDatasetError, match=r"b/train\.rec: the dataset is empty"):
        inputs.open_train_data(cfg, seed=0)
    insightface_rec.write_insightface_rec(tmp_path / "a", [], [], image_size=(112, 112))  # record 0 only
    assert (tmp_path / "a" / "property").read_text().strip() == "0,112,112"
    with pytest.raises(EmptyDatasetError, match=r"a/train\.rec: the dataset is empty: no image records .*1 record"):
        InsightFaceRecSource(tmp_path / "a")


def test_empty_image_folder_and_empty_source_say_empty(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "readme.txt").write_text("no faces here")
    with pytest.raises(EmptyDatasetError, match=f"{tmp_path}: the dataset is empty: no images found"):
        ImageFolderSource(tmp_path)
    with pytest.raises(EmptyDatasetError, match="the dataset is empty"):
        loader(BytesSource([], [0], (4, 4)))
    with pytest.raises(EmptyDatasetError, match="empty_array: the dataset is empty"):
        sources.ArraySource(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0), name="empty_array")
