"""Backbones without torch: parameter counts, conv/BN/PReLU against numpy float64,
shapes and dtypes, bfloat16, input validation, save/load. (torch equality: test_convert_torch.py)"""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import models
from x2jax.models import layers

# insightface parameter counts (sum of torch parameters of arcface_torch backbones/iresnet.py), 512-d
# embedding, 112x112, frozen BN1d scale included.
INSIGHTFACE_PARAMS = {
    "r18": 24_025_600,
    "r34": 34_139_328,
    "r50": 43_590_848,
    "r100": 65_156_160,
    "r200": 118_833_920,
    # Counted on the torch reference (tests/reference/torch_iresnet.py), cross-checked in test_convert_torch.
    "mobilefacenet": 2_059_520,
    "mobilefacenet_large": 6_314_880,
}


@pytest.mark.parametrize("name", list(INSIGHTFACE_PARAMS))
def test_param_count_equals_insightface(name):
    assert models.num_params(name) == INSIGHTFACE_PARAMS[name]


def test_param_count_closed_form_in_embedding_size():
    # fc (25088 * E + E) + BN1d (fixed weight E + bias E): E * 25091 on top of the trunk.
    assert models.num_params("r50", 512) - models.num_params("r50", 256) == 256 * (512 * 49 + 3)
    # Image size changes only the fc: 512 * (S/16)^2 inputs.
    assert (models.num_params("r50", image_size=128) - models.num_params("r50")
            == 512 * 512 * (64 - 49))


def test_variables_layout():
    module = models.get_model("r50")
    abstract = models.abstract_variables(module)
    assert set(abstract) == {"params", "batch_stats"}
    params = abstract["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert params["layer3_13"]["conv2"]["kernel"].shape == (3, 3, 256, 256)
    assert params["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
    assert params["fc"]["kernel"].shape == (512 * 7 * 7, 512)
    assert set(params["features"]) == {"bias"}  # the BN1d scale is fixed at 1
    assert "layer3_14" not in params
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))


# ---------------------------------------------------------------- layers vs numpy float64
def _conv_reference(x, k, stride, pad, groups):
    """Direct float64 cross-correlation, NHWC / HWIO, torch semantics."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cg, cout = k.shape
    og = cout // groups
    b, h, w, _ = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((b, ho, wo, cout))
    for o in range(cout):
        g = o // og
        for i in range(ho):
            for j in range(wo):
                patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw,
                          g * cg:(g + 1) * cg]
                out[:, i, j, o] = np.einsum("bhwc,hwc->b", patch, k[..., o])
    return out


@pytest.mark.parametrize("stride,pad,groups,ksize", [(1, 1, 1, 3), (2, 1, 1, 3), (2, 0, 1, 1),
                                                     (2, 1, 4, 3), (1, 0, 8, 4)])
def test_conv2d_matches_direct_float64(stride, pad, groups, ksize):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    k = rng.standard_normal((ksize, ksize, 8 // groups, 8)).astype(np.float32)
    got = layers.conv2d(jnp.asarray(x), jnp.asarray(k), strides=stride, padding=pad,
                        groups=groups)
    np.testing.assert_allclose(np.asarray(got), _conv_reference(x, k, stride, pad, groups),
                               rtol=1e-5, atol=1e-5)


def test_conv2d_errors():
    x = jnp.zeros((1, 8, 8, 4))
    with pytest.raises(ValueError, match="unknown conv impl 'nope'"):
        layers.conv2d(x, jnp.zeros((3, 3, 4, 4)), impl="nope")
    with pytest.raises(ValueError, match="4 channels.*expects 6"):
        layers.conv2d(x, jnp.zeros((3, 3, 3, 4)), groups=2)
    with pytest.raises(ValueError, match=r"x \(B, H, W, C\)"):
        layers.conv2d(jnp.zeros((8, 8, 4)), jnp.zeros((3, 3, 4, 4)))


def test_every_conv_goes_through_the_conv_impl():
    calls = []

    def counting(x, kernel, **kw):
        calls.append(kernel.shape)
        return layers.CONV_IMPLS["xla"](x, kernel, **kw)

    layers.register_conv_impl("counting_test", counting)
    try:
        # r18_tiny: stem + 8 blocks x 2 + 4 downsamples; mobilefacenet: 2 stem convs,
        # 15 DepthWise x 3, conv_sep, GDC.
        for name, expected in [("r18_tiny", 1 + 8 * 2 + 4), ("mobilefacenet", 2 + 15 * 3 + 2)]:
            module = models.get_model(name, image_size=16, conv_impl="counting_test",
                                      embedding_size=8)
            abstract = models.abstract_variables(module)
            n_kernels = sum(1 for x in jax.tree.leaves(abstract["params"]) if x.ndim == 4)
            calls.clear()
            jax.eval_shape(module.apply, abstract, jnp.zeros((2, 16, 16, 3)))  # traces only
            assert len(calls) == n_kernels == expected
    finally:
        del layers.CONV_IMPLS["counting_test"]


def test_batchnorm_matches_torch_rule_float64():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 3, 5)).astype(np.float32) * 3 + 1
    bn = layers.BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.asarray(x), use_running_average=False)
    scale = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    mean0 = rng.standard_normal(5).astype(np.float32)
    var0 = rng.uniform(0.5, 2, 5).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": mean0, "var": var0}}
    y, updates = bn.apply(variables, jnp.asarray(x), use_running_average=False,
                          mutable=["batch_stats"])
    x64 = x.astype(np.float64).reshape(-1, 5)
    mu, var = x64.mean(0), x64.var(0)
    want = (x64 - mu) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), want, rtol=1e-5, atol=1e-5)
    n = x64.shape[0]
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * mean0 + 0.1 * mu, rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               0.9 * var0 + 0.1 * var * n / (n - 1), rtol=1e-6)
    y_eval = bn.apply(variables, jnp.asarray(x), use_running_average=True)
    want_eval = (x64 - mean0) / np.sqrt(var0 + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 5), want_eval, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.apply(variables, jnp.ones((1, 5)), use_running_average=False, mutable=["batch_stats"])


@pytest.mark.parametrize("shape", [(4, 3, 3, 5), (6, 7)])
def test_batchnorm_train_gradients_match_float64(shape):
    """The hand-written backward of ``batch_norm_train`` against float64 autodiff-free
    finite differences of the numpy forward (and, for the module, without a scale)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    c = shape[-1]
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)

    def loss64(x, scale, bias):
        x2 = x.reshape(-1, c)
        mu, var = x2.mean(0), x2.var(0)
        return float(np.sum(((x2 - mu) / np.sqrt(var + 1e-5) * scale + bias) * g.reshape(-1, c)))

    def numeric(i, eps=1e-6):
        args = [a.astype(np.float64) for a in (x, scale, bias)]
        grad = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            hi = [a.copy() for a in args]; lo = [a.copy() for a in args]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            grad[idx] = (loss64(*hi) - loss64(*lo)) / (2 * eps)
        return grad

    def loss(x, scale, bias):
        y, _, _ = layers.batch_norm_train(x, scale, bias, 1e-5)
        return jnp.sum(y * g)

    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    for i, got in enumerate(grads):
        np.testing.assert_allclose(np.asarray(got), numeric(i), rtol=2e-3, atol=2e-4)
    # Statistics outputs: batch mean and biased variance.
    _, mean, var = layers.batch_norm_train(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-5)
    np.testing.assert_allclose(mean, x.reshape(-1, c).astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x.reshape(-1, c).astype(np.float64).var(0), rtol=1e-5)
    # Module without scale (use_scale=False): gradient of the input equals scale = 1.
    bn = layers.BatchNorm(use_scale=False)
    variables = {"params": {"bias": bias}, "batch_stats": {"mean": np.zeros(c, np.float32),
                                                         "var": np.ones(c, np.float32)}}
    dx = jax.grad(lambda x: jnp.sum(bn.apply(variables, x, use_running_average=False,
                                             mutable=["batch_stats"])[0] * g))(jnp.asarray(x))
    want = jax.grad(loss)(jnp.asarray(x), jnp.ones(c), jnp.asarray(bias))
    np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-6)


def test_prelu_per_channel():
    x = jnp.array([[-2.0, -1.0, 0.0, 3.0]])
    module = layers.PReLU()
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["params"]["negative_slope"], np.full(4, 0.25))
    slopes = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    y = module.apply({"params": {"negative_slope": slopes}}, x)
    np.testing.assert_allclose(y, [[-0.2, -0.2, 0.0, 3.0]], rtol=1e-6)


# ---------------------------------------------------------------- model behaviour
SIZE, EMBED, BATCH = 16, 32, 4


@functools.lru_cache(maxsize=None)
def _tiny(name="r18_tiny"):
    module = models.get_model(name, image_size=SIZE, embedding_size=EMBED)
    variables = jax.jit(functools.partial(models.init_variables, module))(jax.random.key(3))
    return module, variables


@functools.lru_cache(maxsize=None)
def _eval_fn(module):
    return jax.jit(lambda v, x: module.apply(v, x))


@functools.lru_cache(maxsize=None)
def _train_fn(module):
    return jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))


def _images(seed=0, batch=BATCH):
    return jax.random.uniform(jax.random.key(seed), (batch, SIZE, SIZE, 3), minval=-1, maxval=1)


@pytest.mark.parametrize("name", ["r18_tiny", "mobilefacenet"])
def test_shapes_dtypes_and_batch_statistics(name):
    module, variables = _tiny(name)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    images = _images()
    emb = _eval_fn(module)(variables, images)
    chex.assert_shape(emb, (BATCH, EMBED))
    chex.assert_type(emb, jnp.float32)
    chex.assert_tree_all_finite(emb)
    # Evaluation is per example: permuting the batch permutes the embeddings.
    np.testing.assert_allclose(_eval_fn(module)(variables, images[::-1]), emb[::-1],
                               rtol=1e-4, atol=1e-4)
    emb_train, updates = _train_fn(module)(variables, images)
    chex.assert_shape(emb_train, (BATCH, EMBED))
    # Training updates every running statistic ...
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # ... and normalises with batch statistics: changing one example moves the others.
    other = images.at[-1].set(_images(seed=9)[-1])
    emb_train2, _ = _train_fn(module)(variables, other)
    assert not np.allclose(emb_train[:-1], emb_train2[:-1], atol=1e-3)
    assert not np.allclose(emb, emb_train, atol=1e-3)


@pytest.mark.parametrize("name", ["r18_tiny", "mobilefacenet"])
def test_bfloat16_forward_finite_and_close_to_float32(name):
    module32, variables = _tiny(name)
    module16 = models.get_model(name, image_size=SIZE, embedding_size=EMBED, dtype="bfloat16")
    images = _images(seed=2)
    e32 = _eval_fn(module32)(variables, images)
    e16 = _eval_fn(module16)(variables, images)
    chex.assert_type(e16, jnp.float32)  # embeddings are float32 whatever the compute dtype
    chex.assert_tree_all_finite(e16)
    cos = jnp.sum(e16 * e32, 1) / jnp.linalg.norm(e16, axis=1) / jnp.linalg.norm(e32, axis=1)
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8); ~20 layers accumulate a few %.
    assert float(cos.min()) > 0.999, cos
    rel = jnp.linalg.norm(e16 - e32, axis=1) / jnp.linalg.norm(e32, axis=1)
    assert float(rel.max()) < 0.05, rel
    assert float(rel.max()) > 0  # it really ran in bfloat16


def test_dropout_needs_rng_only_in_training():
    module = models.get_model("r18_tiny", image_size=SIZE, embedding_size=EMBED, dropout=0.5)
    _, variables = _tiny()
    images = _images()
    jax.eval_shape(module.apply, variables, images)  # evaluation: no dropout rng needed
    with pytest.raises(Exception, match="dropout"):  # training: it is
        jax.eval_shape(functools.partial(module.apply, train=True, mutable=["batch_stats"]),
                       variables, images)
    train = jax.jit(lambda v, x, key: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                    rngs={"dropout": key})[0])
    a = train(variables, images, jax.random.key(1))
    b = train(variables, images, jax.random.key(2))
    assert not np.allclose(a, b)
    # Without dropout the same training forward is deterministic and rng-free.
    np.testing.assert_allclose(_train_fn(_tiny()[0])(variables, images)[0],
                               _train_fn(_tiny()[0])(variables, images)[0])


@pytest.mark.parametrize("shape,match", [
    ((2, 32, 32, 3), r"expects images \(B, 16, 16, 3\) NHWC; got shape \(2, 32, 32, 3\)"),
    ((2, 16, 16, 1), r"got shape \(2, 16, 16, 1\)"),
    ((2, 3, 16, 16), r"NCHW\? transpose to NHWC"),
    ((16, 16, 3), r"got shape \(16, 16, 3\)"),
])
def test_wrong_input_shape_raises(shape, match):
    module, variables = _tiny()
    with pytest.raises(ValueError, match=match):
        module.apply(variables, jnp.zeros(shape))


def test_wrong_input_dtype_and_config_raise():
    module, variables = _tiny()
    with pytest.raises(ValueError, match="float images normalised.*uint8"):
        module.apply(variables, jnp.zeros((2, SIZE, SIZE, 3), jnp.uint8))
    with pytest.raises(ValueError, match="multiple of 16, got 100"):
        models.get_model("r50", image_size=100)
    with pytest.raises(ValueError, match="unknown model 'r51'.*r50"):
        models.get_model("r51")
    with pytest.raises(ValueError, match=r"unknown keyword\(s\) \['depth'\]"):
        models.get_model("r50", depth=3)
    with pytest.raises(ValueError, match="dtype must be"):
        models.get_model("r50", dtype=jnp.int32)
    with pytest.raises(ValueError, match="'mobilefacenet' has no dropout"):
        models.get_model("mobilefacenet", dropout=0.1)
    assert models.get_model("mobilefacenet", dropout=0.0) == models.get_model("mobilefacenet")


def test_architecture_overrides_survive_json(tmp_path):
    # Lists (as JSON gives them back) become tuples; the override reaches the module.
    module = models.get_model("r18_tiny", image_size=SIZE, embedding_size=EMBED,
                              layers=[1, 1, 1, 1])
    assert module.layers == (1, 1, 1, 1)
    variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                             models.abstract_variables(module))
    assert "layer1_1" not in variables["params"] and "layer4_0" in variables["params"]
    models.save_model(tmp_path / "m", variables, arch="r18_tiny", image_size=SIZE,
                      embedding_size=EMBED, layers=(1, 1, 1, 1))
    loaded, _, info = models.load_model(tmp_path / "m")
    assert info["layers"] == [1, 1, 1, 1] and loaded == module


def test_sharded_creation_with_out_shardings():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    module, reference = _tiny()
    abstract = models.abstract_variables(module)
    # Shard the fc kernel's output axis over 8 devices, replicate the rest.
    spec = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(None, "data") if p[-2].key == "fc"
            and p[-1].key == "kernel" else jax.sharding.PartitionSpec()), abstract)
    variables = jax.jit(functools.partial(models.init_variables, module), out_shardings=spec)(
        jax.random.key(3))
    kernel = variables["params"]["fc"]["kernel"]
    assert kernel.sharding == spec["params"]["fc"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (128, EMBED // 8)
    chex.assert_trees_all_close(variables, reference)  # same values as unsharded init


# ---------------------------------------------------------------- save / load
def test_save_load_roundtrip(tmp_path):
    module, variables = _tiny()
    out = models.save_model(tmp_path / "m", variables, arch="r18_tiny", image_size=SIZE,
                            embedding_size=EMBED)
    info = json.loads((out / "model.json").read_text())
    assert info == {"arch": "r18_tiny", "embedding_size": EMBED, "image_size": SIZE,
                    "dtype": "float32"}
    loaded_module, loaded, info2 = models.load_model(out)
    assert info2 == info
    chex.assert_trees_all_equal(loaded, variables)
    assert loaded_module == module
    images = _images()
    np.testing.assert_array_equal(_eval_fn(loaded_module)(loaded, images),
                                  _eval_fn(module)(variables, images))
    module16, _, _ = models.load_model(out, dtype="bfloat16")
    assert module16.dtype == jnp.bfloat16
    with pytest.raises(FileExistsError, match="already holds a saved model"):
        models.save_model(out, variables, arch="r18_tiny", image_size=SIZE, embedding_size=EMBED)
    with pytest.raises(ValueError, match="can override only"):
        models.load_model(out, embedding_size=3)


def test_save_load_errors(tmp_path):
    _, variables = _tiny()
    with pytest.raises(ValueError, match=r"fc/kernel has shape \(128, 32\), expected \(512, 32\)"):
        models.save_model(tmp_path / "a", variables, arch="r18_tiny", image_size=32,
                          embedding_size=EMBED)
    broken = {"params": dict(variables["params"]), "batch_stats": variables["batch_stats"]}
    del broken["params"]["prelu"]
    with pytest.raises(ValueError, match=r"missing \['params/prelu/negative_slope'\]"):
        models.save_model(tmp_path / "b", broken, arch="r18_tiny", image_size=SIZE,
                          embedding_size=EMBED)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(FileNotFoundError, match="not a saved x2jax model"):
        models.load_model(tmp_path / "nothing")
