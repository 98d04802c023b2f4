"""``model.batch_norm="local"``: BatchNorm statistics per batch shard (torch DDP without SyncBN).

On the 8 simulated CPU devices of tests/conftest.py: the layer against a per-shard
numpy float64 reference (output, running statistics, gradients by finite
differences), a whole backbone against the global path run on each shard alone,
"global" unchanged, and the compiled HLO: no all-reduce on the forward path of
local BN, the backbone's gradient all-reduces fused into a few collectives.
"""

from __future__ import annotations

import collections
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax import tpu
from x2jax.models import get_model, init_variables, layers
from x2jax.models.spec import ModelSpec
from x2jax.parallel.mesh import make_mesh
from x2jax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 8
TINY = dict(embedding_size=16, image_size=16, layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), conv_impl="xla")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()  # ("data", "model") = (8, 1)


def _sharded(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def _np_bn(x, scale, bias, eps=1e-5):
    """float64 BatchNorm over all axes but the last: output, batch mean, biased variance."""
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    mu, var = x2.mean(0), x2.var(0)
    return ((x2 - mu) / np.sqrt(var + eps) * scale + bias).reshape(x.shape), mu, var


def _np_local_bn(x, scale, bias, groups):
    """Per-shard reference: each contiguous slice of the batch normalised alone."""
    outs, mus, vars_ = zip(*(_np_bn(s, scale, bias) for s in np.split(x, groups)))
    return np.concatenate(outs), np.stack(mus), np.stack(vars_)


def test_local_layer_matches_per_shard_float64_reference(mesh):
    rng = np.random.default_rng(0)
    shape, c = (16, 2, 2, 3), 3  # 2 examples per device
    # Each shard gets its own offset and spread, so per-shard and global statistics differ.
    x = (rng.standard_normal(shape) * np.repeat(rng.uniform(0.5, 3, SHARDS), 2)[:, None, None, None]
         + np.repeat(rng.standard_normal(SHARDS) * 2, 2)[:, None, None, None]).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    mean0, var0 = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean0, "var": var0}}
    bn = layers.BatchNorm(use_running_average=False, groups=SHARDS)

    @jax.jit
    def forward(variables, x):
        return bn.apply(variables, x, mutable=["batch_stats"])

    y, updates = forward(variables, _sharded(mesh, x))
    x64 = x.astype(np.float64)
    want_y, mus, vars_ = _np_local_bn(x64, scale.astype(np.float64), bias.astype(np.float64), SHARDS)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-5, atol=1e-5)
    n = x.size // (c * SHARDS)  # values per channel of one shard
    # Running statistics: the mean over shards of each shard's torch update.
    want_mean = np.mean([0.9 * mean0 + 0.1 * mu for mu in mus], axis=0)
    want_var = np.mean([0.9 * var0 + 0.1 * v * n / (n - 1) for v in vars_], axis=0)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-5, atol=1e-6)
    # ... which is not what global statistics give (the test can fail).
    _, mu_all, _ = _np_bn(x64, scale, bias)
    assert not np.allclose(want_var, 0.9 * var0 + 0.1 * x64.reshape(-1, c).var(0) * 32 / 31, rtol=1e-3)
    assert np.allclose(want_mean, 0.9 * mean0 + 0.1 * mu_all)  # equal groups: mean of means = mean

    # Gradients of sum(y * g) against float64 central differences of the per-shard reference.
    def loss64(x, scale, bias):
        return float(np.sum(_np_local_bn(x, scale, bias, SHARDS)[0] * g))

    def numeric(i, eps=1e-6):
        args = [a.astype(np.float64) for a in (x, scale, bias)]
        grad = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            hi, lo = [a.copy() for a in args], [a.copy() for a in args]
            hi[i][idx] += eps
            lo[i][idx] -= eps
            grad[idx] = (loss64(*hi) - loss64(*lo)) / (2 * eps)
        return grad

    @jax.jit
    def grads(x, scale, bias):
        def loss(x, scale, bias):
            v = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
            return jnp.sum(bn.apply(v, x, mutable=["batch_stats"])[0] * g)
        return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    for i, got in enumerate(grads(_sharded(mesh, x), jnp.asarray(scale), jnp.asarray(bias))):
        np.testing.assert_allclose(np.asarray(got), numeric(i), rtol=2e-3, atol=2e-4)


def test_groups_must_divide_the_batch():
    bn = layers.BatchNorm(use_running_average=False, groups=3)
    variables = {"params": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
                 "batch_stats": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}
    with pytest.raises(ValueError, match="groups=3"):
        bn.apply(variables, jnp.ones((8, 2)), mutable=["batch_stats"])
    with pytest.raises(ValueError, match="more than one value per channel and group"):
        layers.BatchNorm(use_running_average=False, groups=8).apply(
            variables, jnp.ones((8, 2)), mutable=["batch_stats"])


def _tiny(batch_norm, batch_shards=SHARDS, arch="r18_tiny", **kw):
    return get_model(arch, batch_norm=batch_norm, batch_shards=batch_shards, **{**TINY, **kw})


def _init(model, seed):
    return jax.jit(functools.partial(init_variables, model))(jax.random.key(seed))


@pytest.fixture(scope="module")
def tiny_variables():
    """Variables of the tiny IResNet (the same for either batch_norm)."""
    return _init(_tiny("global"), 1)


def _forward(model):
    """Training-mode forward: (embeddings, new batch_stats)."""
    def f(variables, x):
        y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return y, upd["batch_stats"]
    return jax.jit(f)


def _loss_and_stats(model):
    """Gradient of sum(sin(embeddings)) and (embeddings, new batch_stats)."""
    def f(variables, x):
        y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd["batch_stats"])
    return jax.jit(jax.grad(f, has_aux=True))


def _all_reduces(compiled) -> int:
    return collections.Counter(c.kind for c in tpu.hlo_collectives(compiled.as_text()))["all-reduce"]


def _num_bn(variables) -> int:
    return sum(jax.tree_util.keystr(k).endswith("['mean']")
               for k, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"]))


def test_local_backbone_equals_global_path_on_each_shard(mesh, tiny_variables):
    """IResNet with local BN on 8 devices == the global-BN model run on each device's slice
    alone: embeddings, running statistics (their mean over shards), parameter gradients (sum).
    Its compiled HLO (gradient and new statistics) has one or two all-reduces in all."""
    local, single = _tiny("local"), _tiny("global", batch_shards=1)
    variables = tiny_variables
    x = np.random.default_rng(1).standard_normal((32, 16, 16, 3)).astype(np.float32)
    xs = _sharded(mesh, x)
    compiled = _loss_and_stats(local).lower(variables, xs).compile()
    # the gradients of all 57 backbone params and the 19 layers' (2, C) statistics means: fused
    assert _all_reduces(compiled) <= 2, _all_reduces(compiled)
    grads, (y, stats) = compiled(variables, xs)
    per_shard = [_loss_and_stats(single)(variables, s) for s in np.split(x, SHARDS)]
    np.testing.assert_allclose(np.asarray(y), np.concatenate([p[1][0] for p in per_shard]),
                               rtol=1e-4, atol=1e-4)
    want_stats = jax.tree.map(lambda *s: np.mean(s, axis=0), *[p[1][1] for p in per_shard])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, want_stats)
    want_grads = jax.tree.map(lambda *g: np.sum(g, axis=0), *[p[0] for p in per_shard])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4), grads, want_grads)


def test_local_mobilefacenet_equals_global_path_on_each_shard(mesh):
    local = get_model("mobilefacenet", embedding_size=16, image_size=16, blocks=(1, 1, 1, 1), scale=1,
                      conv_impl="xla", batch_norm="local", batch_shards=SHARDS)
    single = local.clone(batch_norm="global", batch_shards=1)
    variables = _init(local, 2)
    x = np.random.default_rng(2).standard_normal((32, 16, 16, 3)).astype(np.float32)
    y, stats = _forward(local)(variables, _sharded(mesh, x))
    per_shard = [_forward(single)(variables, s) for s in np.split(x, SHARDS)]
    np.testing.assert_allclose(np.asarray(y), np.concatenate([p[0] for p in per_shard]), rtol=1e-4, atol=1e-4)
    want_stats = jax.tree.map(lambda *s: np.mean(s, axis=0), *[p[1] for p in per_shard])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, want_stats)


def test_hlo_local_forward_has_no_all_reduce_global_one_or_two_per_layer(mesh):
    """The normalisation path (embeddings only; the new running statistics are dead code here):
    no collective with local BN; with global BN the statistics are all-reduced layer by layer."""
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((32, 16, 16, 3), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    counts = {}
    for bn in ("global", "local"):
        model = _tiny(bn)
        variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                 jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0)))
        forward = jax.jit(lambda v, x, m=model: m.apply(v, x, train=True, mutable=["batch_stats"])[0])
        counts[bn] = _all_reduces(forward.lower(variables, x).compile())
    assert _num_bn(variables) == 19  # stem, 4 blocks x (3 + downsample), bn2, features
    assert counts["local"] == 0, counts
    # global: a mean, then a variance all-reduce per BatchNorm (XLA combines a downsample
    # branch's with the main branch's)
    assert counts["global"] >= 1.5 * 19, counts


def test_global_is_unchanged(mesh, tiny_variables):
    """"global" ignores batch_shards and, sharded over 8 devices, equals one device; the layer's
    statistics are those of the whole batch (numpy float64)."""
    variables = tiny_variables
    x = np.random.default_rng(3).standard_normal((32, 16, 16, 3)).astype(np.float32)
    sharded = _forward(_tiny("global"))(variables, _sharded(mesh, x))
    one = _forward(_tiny("global", batch_shards=1))(variables, x)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-4, atol=2e-5),
                 sharded, one)
    bn = layers.BatchNorm(use_running_average=False)
    v = {"params": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
         "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(v, _sharded(mesh, x[..., :3]))
    want_y, mu, var = _np_bn(x[..., :3].astype(np.float64), 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)
    n = x.size // 3
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)


def test_config_and_spec():
    c = config_lib.base_config()
    c.model.batch_norm = "sync"
    with pytest.raises(config_lib.ConfigError, match="model.batch_norm"):
        config_lib.validate(c)
    spec = ModelSpec(arch="r18_tiny", embedding_size=16, image_size=16, batch_norm="local")
    assert spec.build(batch_shards=4).batch_shards == 4
    assert spec.build().batch_shards == 1
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        _tiny("sync").init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)))


@pytest.mark.tpu
def test_tpu_train_step_all_reduces_global_vs_local():
    """The full train step of the tiny model compiled for v5e:2x2 (4 chips): local BN removes
    the per-layer statistics all-reduces; the rest are the head's and a few fused gradient ones."""
    pytest.importorskip("libtpu")
    counts = {}
    for bn in ("global", "local"):
        c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
        c.data.batch_size, c.data.image_size = 32, 16
        c.model.layers, c.model.widths, c.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 32
        c.model.batch_norm = bn
        compiled = tpu.compile_train_step(c, "v5e:2x2", num_classes=1000, image_size=16)
        counts[bn] = tpu.summarize_compiled(compiled).counts()["all-reduce"]
    # 19 BatchNorms: global needs >= 1.5 all-reduces each in the forward pass alone
    assert counts["global"] >= 1.5 * 19 + counts["local"], counts
    assert counts["local"] <= 16, counts
