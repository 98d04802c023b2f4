"""Training loader: sharding, determinism, flips, normalisation, resume, corrupt records."""

import io

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from x2jax.data import insightface_rec, pipeline, sources
from x2jax.data.image_folder import ImageFolderSource
from x2jax.data.insightface_rec import InsightFaceRecSource
from x2jax.data.pipeline import CorruptImageError, make_train_loader


def indexed_source(n=101, size=4, num_classes=None):
    """Image i has every pixel = i % 256 in channel 0 and i // 256 in channel 1; label = i."""
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    images[:, :, : size // 2, 2] = 255  # left half marked, to see flips
    return sources.ArraySource(images, np.arange(n), num_classes=num_classes or n)


def take(it, k):
    return [next(it) for _ in range(k)]


def labels_of(batches):
    return np.concatenate([b["label"] for b in batches])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])


def test_two_shards_disjoint_and_cover_each_epoch():
    src = indexed_source(101)
    per_shard = 101 // 2
    epochs = []
    for epoch in range(2):
        seen = []
        for shard in range(2):
            it = make_train_loader(
                src, batch_size=per_shard, seed=7, shard_index=shard, shard_count=2, flip=False, num_epochs=2
            )
            seen.append(labels_of(take(it, 2))[epoch * per_shard : (epoch + 1) * per_shard])
        assert len(set(seen[0]) & set(seen[1])) == 0
        union = set(seen[0]) | set(seen[1])
        assert len(union) == 2 * per_shard and union <= set(range(101))
        # The helper that audits shards agrees with the loader.
        for shard in range(2):
            expected = pipeline.shard_positions(101, seed=7, shard_index=shard, shard_count=2, epoch=epoch)
            assert seen[shard].tolist() == expected.tolist()
        epochs.append(seen[0])
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled every epoch


def test_same_seed_same_batches_other_seed_other_order():
    src = indexed_source(64)
    mk = lambda seed: make_train_loader(
        src,
        batch_size=8,
        seed=seed,
        shard_index=0,  # noqa: E731
        shard_count=1,
        num_epochs=1,
    )
    a, b, c = list(mk(1)), list(mk(1)), list(mk(2))
    assert len(a) == 8
    assert_same_batches(a, b)
    assert sorted(labels_of(a)) == sorted(labels_of(c)) == list(range(64))
    assert labels_of(a).tolist() != labels_of(c).tolist()


def test_images_normalised_and_flipped_about_half_the_time():
    src = indexed_source(400, size=6)
    it = make_train_loader(src, batch_size=50, seed=0, shard_index=0, shard_count=1, num_epochs=1, flip=True)
    flips = 0
    for batch in it:
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        for img, lab in zip(batch["image"], batch["label"]):
            raw = src.images[lab].astype(np.float64)
            ref = (raw / 255.0 - 0.5) / 0.5
            if np.allclose(img, ref, atol=1e-6):
                continue
            assert np.allclose(img, ref[:, ::-1], atol=1e-6)
            flips += 1
    # Binomial(400, 0.5): 4.5 standard deviations is +-45.
    assert 155 < flips < 245, flips


def test_restore_with_orbax_continues_exactly(tmp_path):
    src = indexed_source(97)
    kw = dict(batch_size=6, seed=5, shard_index=1, shard_count=2, flip=True)
    it = make_train_loader(src, **kw)
    take(it, 11)  # crosses the first epoch boundary (48 records per shard)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(11, args=ocp.args.Composite(data=pipeline.checkpoint_save_args(it)))
    mngr.wait_until_finished()
    expected = take(it, 9)

    not_restored = make_train_loader(src, **kw)
    assert not np.array_equal(next(not_restored)["label"], expected[0]["label"])
    fresh = make_train_loader(src, **kw)
    restored = ocp.CheckpointManager(tmp_path / "ckpt").restore(
        11, args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(fresh))
    )
    assert restored["data"] is fresh
    assert_same_batches(take(fresh, 9), expected)


def test_worker_process_gives_the_same_batches():
    """worker_count=1 runs the pipeline in a spawned process; one worker = same stream."""
    src = indexed_source(40)
    kw = dict(batch_size=5, seed=2, shard_index=0, shard_count=1, num_epochs=1)
    local = list(make_train_loader(src, **kw))
    it = make_train_loader(src, worker_count=1, **kw)
    try:
        assert_same_batches(list(it), local)
    finally:
        it.close()


def encoded(img, fmt="JPEG"):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


class BytesSource:
    def __init__(self, blobs, labels, image_size):
        self.blobs, self.labels, self.image_size = blobs, labels, image_size
        self.num_classes = max(labels) + 1

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return {"image": self.blobs[i], "label": self.labels[i], "key": f"blob{i}"}


def test_corrupt_images_skipped_with_count_or_raise():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8, 3)).astype(np.uint8)
    blobs = [encoded(im, "PNG") for im in images]
    bad = {
        3: b"garbage",
        11: blobs[11][: len(blobs[11]) // 2],  # truncated PNG
        17: encoded(np.zeros((9, 8, 3), np.uint8), "PNG"),
    }  # wrong size
    for i, b in bad.items():
        blobs[i] = b
    src = BytesSource(blobs, list(range(30)), (8, 8))
    it = make_train_loader(src, batch_size=9, seed=0, shard_index=0, shard_count=1, flip=False, num_epochs=1)
    batches = list(it)
    got = labels_of(batches)
    assert len(batches) == 3 and it.num_skipped == 3  # 27 good records -> 3 full batches
    assert sorted(got) == sorted(set(range(30)) - set(bad))
    for b in batches:  # surviving images decode exactly (PNG)
        ref = images[b["label"]].astype(np.float32) / 127.5 - 1
        assert np.allclose(b["image"], ref, atol=1e-6)
    assert it.get_state()["num_skipped"] == 3

    it = make_train_loader(
        src, batch_size=9, seed=0, shard_index=0, shard_count=1, num_epochs=1, on_corrupt="raise"
    )
    with pytest.raises(CorruptImageError, match=r"blob(3|11|17): "):
        list(it)


def test_recordio_source_through_loader(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 5, 40)
    insightface_rec.write_insightface_rec(
        tmp_path, [encoded(im, "PNG") for im in images], labels, image_size=(16, 16)
    )
    src = InsightFaceRecSource(tmp_path)
    assert (src.num_classes, src.image_size, len(src)) == (5, (16, 16), 40)
    order = np.argsort(labels, kind="stable")
    batches = list(
        make_train_loader(src, batch_size=8, seed=0, shard_index=0, shard_count=1, flip=False, num_epochs=1)
    )
    seen = 0
    for b in batches:
        for img, lab in zip(b["image"], b["label"]):
            # Find the source image: unique pixels, so exactly one matches.
            match = [i for i in order if np.allclose(img, images[i] / 127.5 - 1, atol=1e-6)]
            assert len(match) == 1 and labels[match[0]] == lab
            seen += 1
    assert seen == 40


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(2)
    for name, count in [("bob", 2), ("alice", 3)]:
        (tmp_path / name).mkdir()
        for j in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(
                tmp_path / name / f"{j}.png"
            )
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path, image_size=(8, 8))
    assert src.class_names == ["alice", "bob"] and src.labels.tolist() == [0, 0, 0, 1, 1]
    assert src[3]["key"].endswith("bob/0.png")
    batch = next(make_train_loader(src, batch_size=5, seed=0, shard_index=0, shard_count=1))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        ImageFolderSource(tmp_path / "no_such_root")


def test_argument_errors():
    src = indexed_source(10)
    with pytest.raises(ValueError, match="shard_index"):
        make_train_loader(src, batch_size=2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="smaller than shard_count"):
        make_train_loader(src, batch_size=2, seed=0, shard_index=0, shard_count=11)
    with pytest.raises(ValueError, match="on_corrupt"):
        make_train_loader(src, batch_size=2, seed=0, shard_index=0, shard_count=1, on_corrupt="ignore")
    assert pipeline.steps_per_epoch(src, batch_size=2, shard_count=2) == 2
