"""eval.py end to end on a tiny saved model, and its error paths."""

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax.data.synthetic import generate_verification, get_config
from x2jax.data.verification_bin import write_bin
from x2jax.evaluation import main as eval_cli
from x2jax.evaluation import verification_accuracy
from x2jax.evaluation.sets import SetSource, SyntheticSetRef, open_verification_set
from x2jax.models import get_model, init_variables, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    module = get_model("r18_tiny", embedding_size=8, image_size=16)
    variables = jax.jit(init_variables, static_argnums=0)(module, jax.random.key(0))
    save_model(d / "model", variables, arch="r18_tiny", embedding_size=8, image_size=16)
    cfg = get_config("small", image_size=16, num_verification_identities=10, num_verification_pairs=30)
    images, issame = generate_verification(cfg)
    write_bin(d / "data" / "tiny.bin", images, issame, fmt="PNG")
    big, _ = generate_verification(get_config("small", image_size=32, num_verification_identities=10,
                                              num_verification_pairs=30))
    write_bin(d / "data" / "big.bin", big, issame, fmt="PNG")
    return d, module, variables, images, issame


def manual_flip_sum(module, variables, images):
    x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    f = jax.jit(functools.partial(module.apply, train=False))
    return np.asarray(f(variables, jnp.asarray(x))) + np.asarray(f(variables, jnp.asarray(x[:, :, ::-1])))


def test_eval_end_to_end(workdir):
    d, module, variables, images, issame = workdir
    out, roc, emb = d / "res.json", d / "roc", d / "emb.npy"
    results = eval_cli.run([
        "--checkpoint", str(d / "model"), "--sets", "tiny", "--data-dir", str(d / "data"),
        "--out", str(out), "--roc-dir", str(roc), "--export", str(emb), "--batch-size", "12",
    ])
    exported = np.load(emb)
    np.testing.assert_allclose(exported, manual_flip_sum(module, variables, images), rtol=1e-4, atol=1e-4)
    want = verification_accuracy(exported, issame)
    saved = json.loads(out.read_text())
    got = saved["sets"]["tiny"]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert got["val"] == pytest.approx(want["val"], abs=1e-12)
    assert got["num_pairs"] == 30 and len(got["tpr"]) == 400
    assert saved["model"]["arch"] == "r18_tiny"
    assert results["sets"]["tiny"]["threshold"] == pytest.approx(np.mean(want["best_thresholds"]))
    assert os.path.getsize(roc / "verification_roc.png") > 1000


def test_missing_set_file_cli_exit_code(workdir, tmp_path):
    d = workdir[0]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", str(d / "model"), "--sets", "lfw",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert f"verification set 'lfw' not found: {tmp_path / 'lfw.bin'}" in proc.stderr


def test_module_entry_point_matches_eval_py(workdir, tmp_path):
    d = workdir[0]
    for cmd in ([sys.executable, os.path.join(ROOT, "eval.py")], [sys.executable, "-m", "x2jax.evaluation"]):
        proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--resize" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "x2jax.evaluation", "--checkpoint", str(d / "model"), "--sets", "lfw",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert f"verification set 'lfw' not found: {tmp_path / 'lfw.bin'}" in proc.stderr


def test_image_size_mismatch_and_resize(workdir):
    """One policy with training: images of another size are resized; --no-resize refuses them."""
    d = workdir[0]
    args = ["--checkpoint", str(d / "model"), "--sets", "big", "--data-dir", str(d / "data")]
    with pytest.raises(ValueError, match=r"set 'big' has 32x32 images but the checkpoint's model is for 16x16.*"
                                         r"without --no-resize"):
        eval_cli.run(args + ["--no-resize"])
    assert eval_cli.run(args)["sets"]["big"]["num_pairs"] == 30
    explicit, default = eval_cli.run(args + ["--resize"])["sets"]["big"], eval_cli.run(args)["sets"]["big"]
    assert explicit["accuracy"] == default["accuracy"] and explicit["num_pairs"] == default["num_pairs"]


def test_pair_count_mismatch(workdir, tmp_path):
    d = workdir[0]
    with open(d / "data" / "tiny.bin", "rb") as f:
        bins, issame = pickle.load(f)
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump((bins[:-2], issame), f)
    with pytest.raises(ValueError, match=r"odd.bin: 58 images but 30 pairs"):
        eval_cli.run(["--checkpoint", str(d / "model"), "--sets", "odd", "--data-dir", str(tmp_path)])


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"embedding_size": 16}, r"does not fit arch 'r18_tiny' \(embedding_size 16.*features.*shape \(8,\).*\(16,\)"),
        ({"image_size": 32}, r"does not fit arch 'r18_tiny' .*image_size 32.*fc/kernel is saved with shape"),
        ({"arch": "mobilefacenet"}, r"does not fit arch 'mobilefacenet'.*missing.*another architecture"),
    ],
)
def test_checkpoint_of_another_architecture(workdir, tmp_path, edit, message):
    d = workdir[0]
    model = tmp_path / "model"
    shutil.copytree(d / "model", model)
    info = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**info, **edit}))
    with pytest.raises(ValueError, match=message):
        eval_cli.run(["--checkpoint", str(model)])


def test_missing_ijb_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"IJB meta directory not found: .*nowhere[/\\]meta"):
        eval_cli.run(["--checkpoint", str(tmp_path), "--sets", "", "--ijb", str(tmp_path / "nowhere")])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        eval_cli.run(["--checkpoint", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="neither a saved model .* nor a train.py run directory"):
        eval_cli.run(["--checkpoint", str(tmp_path)])


def test_eval_ijb_option(workdir, tmp_path):
    from test_evaluation_ijb import write_ijb_fixture

    from x2jax.evaluation import ijb

    d, module, variables = workdir[:3]
    root = write_ijb_fixture(str(tmp_path / "ijb"))
    results = eval_cli.run([
        "--checkpoint", str(d / "model"), "--sets", "", "--ijb", root, "--roc-dir", str(tmp_path / "roc"),
        "--out", str(tmp_path / "r.json"),
    ])
    direct = ijb.evaluate_ijb(functools.partial(module.apply, train=False), variables, root, image_size=16)
    assert results["ijb"]["tar_at_far"] == pytest.approx(direct["tar_at_far"], abs=1e-6)
    assert results["ijb"]["num_pairs"] == 17
    assert json.loads((tmp_path / "r.json").read_text())["ijb"]["num_templates"] == 16
    assert os.path.getsize(tmp_path / "roc" / "ijbc_roc.png") > 1000


def test_synthetic_set_follows_checkpoint_and_flags(workdir, tmp_path):
    d, module, variables = workdir[:3]
    args = eval_cli.parse_args(["--checkpoint", "x"])
    info = {"synthetic": {"variant": "large", "num_identities": 50}}
    assert eval_cli.synthetic_set_ref(args, info).settings(16) == ("large", {"num_identities": 50, "image_size": 16})
    args = eval_cli.parse_args(["--checkpoint", "x", "--synthetic-config", "small", "--synthetic-num-identities", "7"])
    assert eval_cli.synthetic_set_ref(args, info).settings(16) == ("small", {"num_identities": 7, "image_size": 16})
    assert eval_cli.synthetic_set_ref(eval_cli.parse_args(["--checkpoint", "x"]), {}).settings(32) == (
        "small", {"image_size": 32})

    # The set is the held-out split of that config, rendered at the model's size.
    settings = ("small", {"num_identities": 20, "num_verification_identities": 12, "num_verification_pairs": 40,
                          "image_size": 16})
    images, issame = open_verification_set(SetSource("synthetic", "synthetic"), image_size=16, resize=False,
                                           synthetic=SyntheticSetRef(*settings))
    want_images, want_issame = generate_verification(get_config(settings[0], **settings[1]))
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(issame, want_issame)
