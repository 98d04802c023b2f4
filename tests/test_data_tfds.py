"""TFDS builders (ArrayRecord, no TensorFlow) and the get_* entry points."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import x2jax.data as xd
from x2jax.evaluation.sets import SyntheticSetRef, open_verification_sets
from x2jax.data import insightface_rec, recordio, sources, synthetic, tfds_builders, verification_bin
from x2jax.data.images import decode_image

TINY = synthetic.SyntheticConfig(
    num_identities=12,
    images_per_identity=5,
    num_verification_identities=8,
    verification_images_per_identity=4,
    num_verification_pairs=20,
    seed=11,
)


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_faces_build_matches_numpy_generator(tmp_path):
    config = tfds_builders.SyntheticFacesConfig(name="tiny", synthetic=TINY)
    builder = tfds.builder("synthetic_faces", config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    assert builder.info.file_format.value == "array_record"
    src = tfds_builders.TfdsSource("synthetic_faces", data_dir=tmp_path, builder_kwargs={"config": config})
    assert (src.num_classes, src.image_size, len(src)) == (12, (32, 32), 60)
    images, labels = synthetic.generate_train(TINY)
    seen = set()
    for i in range(len(src)):
        raw = src._source[i]  # noqa: SLF001 (the index feature maps back to the generator)
        j = int(raw["index"])
        seen.add(j)
        assert np.array_equal(decode_image(raw["image"]), images[j])  # PNG: lossless
        assert src[i]["label"] == labels[j]
    assert seen == set(range(60))
    # Plain tfds.data_source decodes the image itself (PIL), no TensorFlow.
    ds = tfds.data_source(
        "synthetic_faces", data_dir=tmp_path, split="train", builder_kwargs={"config": config}
    )
    ex = ds[0]
    assert np.array_equal(ex["image"], images[ex["index"]])


def test_synthetic_verification_config_matches_numpy(tmp_path):
    config = tfds_builders.FaceVerificationConfig(name="syn_tiny", synthetic=TINY)
    builder = tfds.builder("face_verification", config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    ds = builder.as_data_source(split="test", decoders={"image": tfds.decode.SkipDecoding()})
    bins, issame = tfds_builders.read_verification_source(ds)
    images, issame_np = synthetic.generate_verification(TINY)
    assert np.array_equal(np.stack([decode_image(b) for b in bins]), images)
    assert np.array_equal(issame, issame_np)


def test_face_verification_from_manual_bin(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    issame = np.array([True, False, False, True])
    manual = tmp_path / "manual"
    verification_bin.write_bin(manual / "lfw.bin", images, issame, fmt="PNG")
    builder = tfds.builder("face_verification/lfw", data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    # the one opener reads the prepared TFDS copy when no .bin is in data_dir ...
    sets = open_verification_sets(["lfw"], data_dir=tmp_path / "tfds", image_size=16)
    got, got_issame = sets["lfw"]
    assert np.array_equal(got, images) and np.array_equal(got_issame, issame)
    # ... and the .bin itself when it is there.
    sets = open_verification_sets(["lfw"], data_dir=manual, image_size=16)
    assert np.array_equal(sets["lfw"][0], images)
    with pytest.raises(FileNotFoundError, match=r"agedb_30\.bin"):
        open_verification_sets(["agedb_30"], data_dir=manual, image_size=16)


def test_insightface_rec_builder_keeps_bytes_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, 30)
    blobs = [png(im) for im in images]
    rec_dir = tmp_path / "manual" / "custom"
    insightface_rec.write_insightface_rec(rec_dir, blobs, labels, image_size=(16, 16))
    train = xd.get_train_source(
        "tfds:insightface_rec/custom", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual"
    )
    assert (train.num_classes, train.image_size, len(train.source)) == (4, (16, 16), 30)
    info = insightface_rec.read_insightface_rec(rec_dir)
    order = np.argsort(labels, kind="stable")  # record key k holds image order[k - 1]
    for i in range(30):
        ex = train.source._source[i]  # noqa: SLF001
        src_i = order[int(ex["key"]) - 1]
        assert ex["image"] == blobs[src_i] and int(ex["label"]) == labels[src_i]
    assert sorted(int(train.source[i]["label"]) for i in range(30)) == sorted(info.labels)


def test_insightface_rec_builder_refuses_an_empty_rec(tmp_path):
    rec_dir = tmp_path / "manual" / "custom"
    rec_dir.mkdir(parents=True)
    w = recordio.MXIndexedRecordIO(rec_dir / "train.idx", rec_dir / "train.rec", "w")
    w.write_idx(0, recordio.pack(recordio.IRHeader(0, [1, 1], 0, 0), b""))  # record 0 only
    w.close()
    (rec_dir / "property").write_text("0,16,16\n")
    with pytest.raises(sources.EmptyDatasetError, match=r"custom/train\.rec: the dataset is empty"):
        xd.get_train_source(
            "tfds:insightface_rec/custom", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual"
        )


def test_face_image_folder_builder(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("b", "a"):
        (tmp_path / "root" / name).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(
                tmp_path / "root" / name / f"{j}.png"
            )
    train = xd.get_train_source(
        "tfds:face_image_folder",
        data_dir=tmp_path / "tfds",
        builder_kwargs={"root": str(tmp_path / "root"), "image_size": (8, 8)},
    )
    assert train.num_classes == 2 and len(train.source) == 4
    it = xd.make_train_loader(train.source, batch_size=4, seed=0, shard_index=0, shard_count=1)
    assert sorted(next(it)["label"].tolist()) == [0, 0, 1, 1]


def test_get_train_source_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        xd.get_train_source("insightface_rec", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        xd.get_train_source("insightface_rec", data_dir=tmp_path)  # exists, but no train.rec
    with pytest.raises(ValueError, match="needs data_dir"):
        xd.get_train_source("folder")
    with pytest.raises(ValueError, match="unknown train source"):
        xd.get_train_source("ms1mv3")
    with pytest.raises(FileNotFoundError, match="manual_dir not found"):
        xd.get_train_source("tfds:insightface_rec/ms1mv3", data_dir=tmp_path, manual_dir=tmp_path / "missing")


def test_synthetic_entry_points_agree_with_generator():
    train = xd.get_train_source("synthetic_small", num_identities=6, images_per_identity=3)
    cfg = synthetic.get_config("small", num_identities=6, images_per_identity=3)
    images, labels = synthetic.generate_train(cfg)
    assert train.num_classes == 6 and train.image_size == (32, 32)
    assert np.array_equal(train.source.images, images)
    ref = SyntheticSetRef("small", {"num_identities": 6, "num_verification_identities": 10,
                                    "num_verification_pairs": 10})
    v, issame = open_verification_sets(["synthetic"], data_dir=None, image_size=32, synthetic=ref)["synthetic"]
    ref = synthetic.generate_verification(
        synthetic.get_config(
            "small", num_identities=6, num_verification_identities=10, num_verification_pairs=10
        )
    )
    assert np.array_equal(v, ref[0]) and np.array_equal(issame, ref[1])
