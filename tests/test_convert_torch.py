"""insightface PyTorch backbones -> Flax: the converted Flax network reproduces the
PyTorch reference (tests/reference/torch_iresnet.py) on the same images, which proves the
topology and the converter at once; and the converter rejects mangled checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from reference import torch_iresnet as T  # noqa: E402  (needs torch)

from x2jax import models  # noqa: E402
from x2jax.models import convert  # noqa: E402

pytestmark = pytest.mark.torch


def _images_nchw(batch, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def _torch_embed(model, images_nchw):
    with torch.no_grad():
        return model(torch.from_numpy(images_nchw)).numpy()


def _flax_embed(module, variables, images_nchw):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x))(
        variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def _assert_same_embeddings(got, want):
    """Equal to 1e-4 (absolute; the references are calibrated so embeddings are O(1))."""
    assert 0.1 < float(np.abs(want).mean()) < 10
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 1 - 1e-6


@functools.lru_cache(maxsize=None)
def _torch_model(name, image_size=112, embedding_size=512, seed=0):
    if name == "mobilefacenet":
        model = T.MobileFaceNet(num_features=embedding_size, image_size=image_size)
    elif name == "r18_tiny":
        model = T.IResNet((2, 2, 2, 2), (16, 32, 64, 128), num_features=embedding_size,
                          image_size=image_size)
    else:
        model = T.iresnet(name, num_features=embedding_size, image_size=image_size)
    T.randomize_(model, seed)
    # Running statistics from 4 other images (after random ones): O(1) activations.
    return T.calibrate_bn_(model, torch.from_numpy(_images_nchw(4, image_size, seed=100)))


@pytest.mark.parametrize("name,count", [("r18", 24_025_600), ("r50", 43_590_848),
                                        ("mobilefacenet", 2_059_520)])
def test_param_count_equals_torch_reference(name, count):
    assert T.num_params(_torch_model(name)) == count == models.num_params(name)


def test_r18_cli_conversion_matches_torch_eval(tmp_path, capsys):
    model = _torch_model("r18")
    pth = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), pth)
    assert convert.main([str(pth), str(tmp_path / "out"), "--arch", "r18"]) == 0
    assert "24,025,600 parameters" in capsys.readouterr().out
    module, variables, info = models.load_model(tmp_path / "out")
    assert info["arch"] == "r18" and info["embedding_size"] == 512 and info["image_size"] == 112
    images = _images_nchw(2, 112)
    _assert_same_embeddings(_flax_embed(module, variables, images), _torch_embed(model, images))


def test_r50_conversion_matches_torch_eval():
    model = _torch_model("r50")
    variables = convert.convert_state_dict(model.state_dict(), "r50")
    module = models.get_model("r50")
    images = _images_nchw(2, 112, seed=1)
    _assert_same_embeddings(_flax_embed(module, variables, images), _torch_embed(model, images))


def test_mobilefacenet_conversion_matches_torch_eval():
    model = _torch_model("mobilefacenet", embedding_size=128)
    variables = convert.convert_state_dict(model.state_dict(), "mobilefacenet")
    module = models.get_model("mobilefacenet", embedding_size=128)
    images = _images_nchw(2, 112, seed=2)
    _assert_same_embeddings(_flax_embed(module, variables, images), _torch_embed(model, images))


def test_train_mode_matches_torch_outputs_and_running_stats():
    """One training-mode forward: same embeddings (batch statistics) and the same running
    statistics afterwards (torch's unbiased-variance update), fc permutation at 2x2."""
    model = T.randomize_(T.IResNet((2, 2, 2, 2), (16, 32, 64, 128), num_features=32,
                                   image_size=32), seed=4)
    variables = convert.convert_state_dict(model.state_dict(), "r18_tiny", image_size=32)
    module = models.get_model("r18_tiny", embedding_size=32, image_size=32)
    images = _images_nchw(4, 32, seed=3)
    model.train()
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    got, updates = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    _assert_same_embeddings(np.asarray(got), want)
    after = convert.convert_state_dict(model.state_dict(), "r18_tiny", image_size=32)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(updates["batch_stats"])[0],
                            jax.tree.leaves(after["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))


# ---------------------------------------------------------------- converter errors
@functools.lru_cache(maxsize=None)
def _tiny_state_dict():
    model = _torch_model("r18_tiny", image_size=16, embedding_size=8)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _convert_tiny(state_dict, **kw):
    return convert.convert_state_dict(state_dict, kw.pop("arch", "r18_tiny"),
                                      image_size=kw.pop("image_size", 16), **kw)


def test_converter_layout_and_prefix():
    sd = _tiny_state_dict()
    variables = _convert_tiny(sd)
    params = variables["params"]
    np.testing.assert_array_equal(params["layer2_0"]["conv2"]["kernel"],
                                  sd["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layer1_1"]["prelu"]["negative_slope"],
                                  sd["layer1.1.prelu.weight"])
    np.testing.assert_array_equal(variables["batch_stats"]["bn2"]["var"], sd["bn2.running_var"])
    # Embedding size read from the checkpoint; a DDP "module." prefix is accepted.
    prefixed = _convert_tiny({"module." + k: v for k, v in sd.items()})
    jax.tree.map(np.testing.assert_array_equal, prefixed, variables)
    assert params["fc"]["kernel"].shape == (128, 8)


@pytest.mark.parametrize("mangle,match", [
    (lambda sd: sd.pop("layer2.0.bn1.running_var"),
     r"1 missing key\(s\) \['layer2.0.bn1.running_var'\]"),
    (lambda sd: sd.update({"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}),
     r"1 unexpected key\(s\) \['layer5.0.conv1.weight'\]"),
    (lambda sd: sd.update({"layer1.0.conv1.weight": np.zeros((16, 16, 1, 3), np.float32)}),
     r"state_dict\['layer1.0.conv1.weight'\] has shape \(16, 16, 1, 3\), "
     r"expected \(16, 16, 3, 3\)"),
    (lambda sd: sd.update({"features.weight": np.full(8, 2.0, np.float32)}),
     r"state_dict\['features.weight'\] must be ones"),
    (lambda sd: sd.update({"prelu.weight": np.zeros(16, np.int64)}), r"prelu.weight.*dtype int64"),
])
def test_converter_rejects_mangled_state_dict(mangle, match):
    sd = dict(_tiny_state_dict())
    mangle(sd)
    with pytest.raises(ValueError, match=match):
        _convert_tiny(sd)


def test_converter_wrong_arch_or_image_size():
    sd = _tiny_state_dict()
    with pytest.raises(ValueError, match=r"fc.weight'\] has shape \(8, 128\).*check --image-size"):
        _convert_tiny(sd, image_size=32)
    with pytest.raises(ValueError, match="unknown arch 'r51'"):
        _convert_tiny(sd, arch="r51")
    # An r18-shaped checkpoint (2 blocks per stage) converted as r34: the keys say r18.
    r18_keys = {k: np.zeros(1, np.float32) for k in _torch_model("r18").state_dict()}
    with pytest.raises(ValueError, match=r"blocks per stage \(2, 2, 2, 2\), i.e. --arch r18"):
        convert.convert_state_dict(r18_keys, "r34", embedding_size=512)


def test_cli_errors(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert convert.main([str(missing), str(tmp_path / "o1"), "--arch", "r18"]) == 2
    assert "missing.pth not found" in capsys.readouterr().err
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    assert convert.main([str(not_a_state_dict), str(tmp_path / "o2"), "--arch", "r18"]) == 2
    assert "holds a list, expected a state_dict" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([str(missing), str(tmp_path / "o3"), "--arch", "resnet50"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
