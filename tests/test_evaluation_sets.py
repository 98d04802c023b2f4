"""Verification sets: training and eval.py open the same arrays for the same names."""

import numpy as np
import pytest
from PIL import Image

from x2jax.data import synthetic
from x2jax.data.verification_bin import load_bin, write_bin
from x2jax.evaluation import main as eval_cli
from x2jax.evaluation import sets
from x2jax.train import config as config_lib
from x2jax.train import inputs


def data_config(**fields):
    cfg = config_lib.base_config().data
    cfg.update(fields)
    return cfg


def checkpoint_info(data):
    """``info["synthetic"]`` as the train checkpoint loader fills it (x2jax/models/io.py)."""
    return {"synthetic": sets.SyntheticSetRef.from_data_config(dict(data)).as_info()}


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    cfg = synthetic.get_config("small", image_size=16, num_verification_identities=6, num_verification_pairs=12)
    small, issame = synthetic.generate_verification(cfg)
    write_bin(d / "tiny.bin", small, issame, fmt="PNG")
    big, _ = synthetic.generate_verification(synthetic.get_config(
        "small", image_size=32, num_verification_identities=6, num_verification_pairs=12))
    write_bin(d / "big.bin", big, issame, fmt="JPEG")
    return d, small, big, issame


def test_synthetic_set_ref_from_data_config_and_info():
    data = data_config(variant="small", num_identities=20, images_per_identity=0, image_size=16)
    ref = sets.SyntheticSetRef.from_data_config(data)
    assert ref == sets.SyntheticSetRef("small", {"num_identities": 20, "image_size": 16})
    assert ref == sets.SyntheticSetRef.from_data_config(dict(data))  # a checkpoint's JSON copy
    # The form the checkpoint loader stored before SyntheticSetRef existed.
    legacy = {"variant": "small"}
    legacy.update({k: data[k] for k in ("num_identities", "images_per_identity", "image_size") if data[k]})
    assert ref.as_info() == legacy
    assert sets.SyntheticSetRef.from_info(legacy) == ref
    assert sets.SyntheticSetRef.from_info(None) == sets.SyntheticSetRef()
    assert ref.replace(num_identities=7).settings(32) == ("small", {"num_identities": 7, "image_size": 32})
    assert inputs.synthetic_overrides(data) == {"num_identities": 20, "image_size": 16}
    hash(ref)  # frozen and hashable
    with pytest.raises(ValueError, match="eval set 'synthetic' needs data.name='synthetic'"):
        sets.SyntheticSetRef.from_data_config(data_config(name="insightface_rec"))


@pytest.mark.parametrize("names", [["synthetic", "tiny"], ["big"]], ids=["same_size", "resize"])
def test_training_and_eval_open_identical_arrays(bins, names):
    d, small, big, issame = bins
    data = data_config(variant="small", num_identities=20, images_per_identity=2, image_size=16)
    trained = inputs.open_verification_sets(names, data_dir=str(d), data_config=data, image_size=16)

    args = eval_cli.parse_args(["--checkpoint", "x", "--sets", ",".join(names), "--data-dir", str(d), "--resize"])
    sources = sets.resolve_verification_sets(names, data_dir=args.data_dir)
    evaluated = {n: (im, s) for n, im, s in eval_cli.iter_verification_sets(args, sources, checkpoint_info(data), 16)}

    assert list(trained) == list(evaluated) == names
    for name in names:
        np.testing.assert_array_equal(trained[name][0], evaluated[name][0])
        np.testing.assert_array_equal(trained[name][1], evaluated[name][1])
        assert trained[name][0].dtype == np.uint8 and trained[name][0].shape[1:] == (16, 16, 3)

    # ... and both are what each path gave before they shared the code.
    if "synthetic" in names:
        want = synthetic.generate_verification(synthetic.get_config("small", num_identities=20, images_per_identity=2,
                                                                    image_size=16))
        np.testing.assert_array_equal(trained["synthetic"][0], want[0])
        np.testing.assert_array_equal(trained["synthetic"][1], want[1])
    if "tiny" in names:
        np.testing.assert_array_equal(trained["tiny"][0], small)
    if "big" in names:  # eval.py resized decoded images with PIL, training decoded at the size: the same
        stored, _ = load_bin(d / "big.bin", image_size=None)
        pil = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BILINEAR)) for im in stored])
        np.testing.assert_array_equal(trained["big"][0], pil)
        np.testing.assert_array_equal(trained["big"][1], issame)


def test_strict_size_and_missing_sets(bins, tmp_path):
    d = bins[0]
    with pytest.raises(ValueError, match=r"set 'big' has 32x32 images but the checkpoint's model is for 16x16 .*big\.bin"):
        sets.open_verification_sets(["big"], data_dir=d, image_size=16, resize=False)
    assert sets.open_verification_sets(["tiny"], data_dir=d, image_size=16, resize=False)["tiny"][0].shape[1:3] == (
        16, 16)
    # Every name is located before any set is read.
    with pytest.raises(FileNotFoundError, match=r"verification set 'lfw' not found: .*lfw\.bin .*face_verification"):
        sets.open_verification_sets(["tiny", "lfw"], data_dir=d, image_size=16)
    with pytest.raises(FileNotFoundError, match="verification set 'lfw' not found"):
        inputs.open_verification_sets(["lfw"], data_dir=str(tmp_path), data_config=data_config(), image_size=16)
    with pytest.raises(ValueError, match="needs data.name='synthetic'"):
        inputs.open_verification_sets(["synthetic"], data_dir="", data_config=data_config(name="image_folder"),
                                      image_size=16)


def test_prepared_tfds_set_opens_the_same_for_training_and_eval(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from x2jax.data import tfds_builders  # noqa: F401  (registers face_verification)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 20, 20, 3)).astype(np.uint8)
    issame = np.array([True, False, False, True])
    manual = tmp_path / "manual"
    write_bin(manual / "lfw.bin", images, issame, fmt="PNG")
    builder = tfds.builder("face_verification/lfw", data_dir=tmp_path / "tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))

    assert sets.resolve_verification_sets(["lfw"], data_dir=tmp_path / "tfds")[0].kind == "tfds"
    trained = inputs.open_verification_sets(["lfw"], data_dir=str(tmp_path / "tfds"), data_config=data_config(),
                                            image_size=16)["lfw"]
    args = eval_cli.parse_args(["--checkpoint", "x", "--sets", "lfw", "--data-dir", str(tmp_path / "tfds"), "--resize"])
    sources = sets.resolve_verification_sets(["lfw"], data_dir=args.data_dir)
    [(_, got, got_issame)] = list(eval_cli.iter_verification_sets(args, sources, {}, 16))
    np.testing.assert_array_equal(trained[0], got)
    np.testing.assert_array_equal(trained[1], got_issame)
    np.testing.assert_array_equal(got, load_bin(manual / "lfw.bin", (16, 16))[0])  # same as the .bin itself
    np.testing.assert_array_equal(got_issame, issame)
    native = sets.open_verification_sets(["lfw"], data_dir=tmp_path / "tfds", image_size=20, resize=False)["lfw"][0]
    np.testing.assert_array_equal(native, images)
    with pytest.raises(ValueError, match=r"set 'lfw' has 20x20 images .*face_verification"):
        sets.open_verification_sets(["lfw"], data_dir=tmp_path / "tfds", image_size=16, resize=False)
