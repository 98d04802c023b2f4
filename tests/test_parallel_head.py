"""Class-sharded head and Partial FC on 8 simulated CPU devices."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax import losses
from x2jax.parallel import (
    class_centers_sharding,
    init_class_centers,
    make_mesh,
    masked_row_updates,
    num_sampled_per_shard,
    pad_num_classes,
    sharded_margin_loss,
)
from reference.head_step import make_head_step

B, D = 16, 32


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh()


def _data(num_classes, seed=0, batch=B):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(batch, D)).astype(np.float32)
    w = rng.normal(size=(num_classes, D)).astype(np.float32)
    y = rng.integers(0, num_classes, batch).astype(np.int32)
    return e, w, y


def _pad(w, rows):
    return np.pad(w, ((0, rows - w.shape[0]), (0, 0)))


def _np_x2_loss(e, w, y, negatives, scale=64.0, a=-0.9, k=0.65):
    """float64 X2-Softmax CE; row i's softmax runs over its target and negatives[i] (bool (C,))."""
    e = e.astype(np.float64) / np.linalg.norm(e, axis=1, keepdims=True)
    w = w.astype(np.float64) / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1, 1)
    out = []
    for i in range(len(y)):
        tgt = scale * (a * np.arccos(cos[i, y[i]]) ** 2 + k)
        neg = negatives[i].copy()
        neg[y[i]] = False
        z = np.concatenate([[tgt], scale * cos[i, neg]])
        out.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - tgt)
    return float(np.mean(out))


def _shard_shapes(x):
    return {s.data.shape for s in x.addressable_shards}


@pytest.mark.parametrize("loss_name", ["x2_softmax", "arcface"])
@pytest.mark.parametrize("num_classes", [64, 61])
def test_sharded_loss_and_grads_equal_single_device(mesh, loss_name, num_classes):
    e, w, y = _data(num_classes, seed=num_classes)
    fn = losses.get(loss_name)
    ref, (ref_ge, ref_gw) = jax.value_and_grad(losses.margin_loss, argnums=(0, 1))(
        jnp.asarray(e), jnp.asarray(w), jnp.asarray(y), fn)
    rows = pad_num_classes(num_classes, 8)
    w_sharded = jax.device_put(_pad(w, rows), class_centers_sharding(mesh))

    def loss(e, w):
        return sharded_margin_loss(e, w, jnp.asarray(y), margin_fn=fn, mesh=mesh,
                                   num_classes=num_classes)

    out, (ge, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.asarray(e), w_sharded)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ge, ref_ge, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw)[:num_classes], ref_gw, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(gw)[num_classes:], 0.0)  # padding: no gradient
    # The gradient of W is split like W: every device holds rows/8 rows.
    assert gw.sharding.is_equivalent_to(class_centers_sharding(mesh), 2)
    assert _shard_shapes(gw) == {(rows // 8, D)}
    if loss_name == "x2_softmax":  # independent float64 reference
        np.testing.assert_allclose(
            out, _np_x2_loss(e, w, y, np.ones((B, num_classes), bool)), rtol=1e-5)


def test_two_axis_mesh_equals_single_device():
    mesh = make_mesh(data=2, model=4)
    e, w, y = _data(61, seed=3)
    ref, ref_gw = jax.value_and_grad(losses.margin_loss, argnums=1)(e, w, y, losses.x2_softmax)
    out, gw = jax.jit(jax.value_and_grad(lambda w: sharded_margin_loss(
        e, w, y, margin_fn=losses.x2_softmax, mesh=mesh, num_classes=61)))(_pad(w, 64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw)[:61], ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_classes_on_model_only_replicates_w_over_data_and_equals_single_device(sample_rate):
    """rules.classes="model": W split over model, replicated over data (the batch axis)."""
    from x2jax.parallel import ShardingRules

    mesh, rules = make_mesh(data=2, model=4), ShardingRules(classes="model")
    e, w, y = _data(61, seed=5)
    key = jax.random.key(1)
    # the single-device reference with the same sample: a 1-device-per-shard mesh of the same
    # class split (4 shards) takes the same rows as the (2, 4) mesh
    ref_mesh, ref_rules = make_mesh(data=1, model=4, devices=jax.devices()[:4]), ShardingRules(classes="model")

    def run(mesh, rules):
        w_sh = jax.device_put(_pad(w, 64), class_centers_sharding(mesh, rules))
        return jax.jit(jax.value_and_grad(lambda e, w: sharded_margin_loss(
            e, w, y, margin_fn=losses.x2_softmax, mesh=mesh, num_classes=61, rules=rules,
            sample_rate=sample_rate, rng=key), argnums=(0, 1)))(jnp.asarray(e), w_sh)

    out, (ge, gw) = run(mesh, rules)
    assert gw.sharding.is_equivalent_to(class_centers_sharding(mesh, rules), 2)
    assert _shard_shapes(gw) == {(16, D)}
    if sample_rate == 1.0:
        ref, (ref_ge, ref_gw) = jax.value_and_grad(losses.margin_loss, argnums=(0, 1))(
            jnp.asarray(e), jnp.asarray(w), jnp.asarray(y), losses.x2_softmax)
        np.testing.assert_allclose(out, _np_x2_loss(e, w, y, np.ones((B, 61), bool)), rtol=1e-5)
    else:
        ref, (ref_ge, ref_gw) = run(ref_mesh, ref_rules)
        ref_gw = np.asarray(ref_gw)[:61]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ge, ref_ge, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw)[:61], ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_name,params", [
    ("curricularface", {"t": np.float32(0.3)}),  # non-target logits depend on cos_y
    ("adaface", {"batch_mean": np.float32(4.0), "batch_std": np.float32(1.0)}),  # uses norms
    ("elasticface", {"rng": jax.random.key(4)}),  # per-sample random margin
    ("cosface", {}),  # target-only margins: block logits and target logit split
    ("sphereface", {}),
    ("combined_margin", {"m2": 0.3, "m3": 0.1, "interclass_filtering_threshold": 0.2}),  # generic
])
def test_peer_losses_with_state_or_rng_equal_single_device(mesh, loss_name, params):
    e, w, y = _data(61, seed=9)
    e[:4] *= 30.0  # spread the embedding norms (AdaFace)
    fn = losses.get(loss_name)
    ref, ref_gw = jax.value_and_grad(losses.margin_loss, argnums=1)(e, w, y, fn, **params)
    out, gw = jax.jit(jax.value_and_grad(lambda w: sharded_margin_loss(  # params: constants
        e, w, y, margin_fn=fn, mesh=mesh, num_classes=61, **params)))(_pad(w, 64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw)[:61], ref_gw, rtol=1e-5, atol=1e-5)


_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast)(-start)?\(")


def _collective_result_sizes(hlo_text):
    """(op, element count) of every array in the result of every collective."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group("type")):
                out.append((m.group("op"), int(np.prod([int(d) for d in dims.split(",") if d]))))
    return out


def test_train_step_keeps_w_grad_and_momentum_sharded_and_never_gathers_w(mesh):
    num_classes, rows = 200, 200
    e, w, y = _data(num_classes, seed=5)
    tx = optax.sgd(0.1, momentum=0.9)
    step, init_opt = make_head_step(tx, (rows, D), margin_fn="x2_softmax", mesh=mesh,
                                    num_classes=num_classes, donate=False)
    w0 = jax.device_put(w, class_centers_sharding(mesh))
    state = init_opt(w0)
    out = step(w0, state, e, y, jax.random.key(0))
    out = step(out.weight, out.opt_state, e, y, jax.random.key(0))  # momentum now non-zero
    momentum = out.opt_state[0].trace
    for x in (out.weight, momentum):
        assert x.sharding.is_equivalent_to(class_centers_sharding(mesh), 2)
        assert _shard_shapes(x) == {(rows // 8, D)}
    # Same as two unsharded optax steps on margin_loss.
    w_ref, s_ref = jnp.asarray(w), tx.init(jnp.asarray(w))
    for _ in range(2):
        g = jax.grad(losses.margin_loss, argnums=1)(e, w_ref, y, losses.x2_softmax)
        u, s_ref = tx.update(g, s_ref, w_ref)
        w_ref = optax.apply_updates(w_ref, u)
    np.testing.assert_allclose(out.weight, w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(momentum, s_ref[0].trace, rtol=1e-5, atol=1e-6)

    hlo = step.lower(out.weight, out.opt_state, e, y, jax.random.key(0)).compile().as_text()
    sizes = _collective_result_sizes(hlo)
    assert any(op == "all-gather" for op, _ in sizes), "expected the embedding all-gather"
    assert max(n for _, n in sizes) < rows * D // 8 * 2, sizes  # nothing W-sized moves
    # The detector does see a gather of W when one is forced.
    gather_w = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
    forced = _collective_result_sizes(gather_w.lower(w0).compile().as_text())
    assert max(n for _, n in forced) == rows * D


def test_init_class_centers(mesh, monkeypatch):
    from x2jax.parallel import head as head_lib

    monkeypatch.setattr(head_lib, "INIT_CHUNK_ROWS", 100)  # 126 rows/shard: 2 chunks, overlapping
    w = init_class_centers(jax.random.key(0), 1001, 64, mesh)
    assert w.shape == (1008, 64) and _shard_shapes(w) == {(126, 64)}
    w = np.asarray(w)
    np.testing.assert_array_equal(w[1001:], 0.0)
    assert abs(w[:1001].std() - 0.01) < 0.0005 and abs(w[:1001].mean()) < 0.0005
    assert (np.abs(w[:1001]).max(axis=1) > 0).all()  # every real row written
    # Row i depends only on (key, i): the same matrix on one device.
    one = init_class_centers(jax.random.key(0), 1001, 64, make_mesh(devices=jax.devices()[:1]))
    np.testing.assert_array_equal(np.asarray(one), w[:1001])
    # Extra padding rows (e.g. a multiple of 128), also inside an outer jit.
    wide = jax.jit(lambda k: init_class_centers(k, 1001, 64, mesh, num_rows=1024))(jax.random.key(0))
    assert wide.shape == (1024, 64) and _shard_shapes(wide) == {(128, 64)}
    np.testing.assert_array_equal(np.asarray(wide)[:1008], w)
    with pytest.raises(ValueError, match="multiple of the 8 class shards"):
        init_class_centers(jax.random.key(0), 1001, 64, mesh, num_rows=1012)


def test_sample_rate_one_is_the_full_head_and_full_sample_is_identical(mesh):
    e, w, y = _data(64, seed=7)
    def head(rate):
        return jax.jit(lambda e, w, y, key: sharded_margin_loss(
            e, w, y, margin_fn=losses.x2_softmax, mesh=mesh, sample_rate=rate, rng=key,
            return_aux=True))(e, w, y, jax.random.key(1))

    full = jax.jit(lambda e, w, y: sharded_margin_loss(
        e, w, y, margin_fn=losses.x2_softmax, mesh=mesh))(e, w, y)
    rate_one, _ = head(1.0)
    assert float(full) == float(rate_one)
    # The sampling code path with a sample as large as the shard (ceil(0.95 * 8) = 8).
    assert num_sampled_per_shard(8, 0.95) == 8
    sampled, aux = head(0.95)
    assert np.asarray(aux.sampled).all()
    np.testing.assert_allclose(sampled, full, rtol=1e-6)


def _two_masked_steps(mesh, e, w, y, rate, keys, num_classes):
    inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    step, init_opt = make_head_step(inner, w.shape, margin_fn="x2_softmax", mesh=mesh,
                                    num_classes=num_classes, sample_rate=rate, donate=False)
    w_sh = jax.device_put(w, class_centers_sharding(mesh))
    state = init_opt(w_sh)
    outs = []
    for key in keys:
        out = step(w_sh, state, e, y, key)
        outs.append(out)
        w_sh, state = out.weight, out.opt_state
    return outs


def test_partial_fc_keeps_positives_and_leaves_unsampled_rows_untouched(mesh):
    num_classes = 800  # 100 rows per shard, sample of 10
    e, w, y = _data(num_classes, seed=11)
    keys = [jax.random.key(1), jax.random.key(2)]
    first, second = _two_masked_steps(mesh, e, w, y, 0.1, keys, num_classes)
    for out in (first, second):
        sampled = np.asarray(out.aux.sampled)
        assert int(out.aux.num_overflow) == 0
        assert sampled[y].all()  # every positive of the global batch is in the sample
        np.testing.assert_array_equal(sampled.reshape(8, 100).sum(1), 10)
        np.testing.assert_array_equal(np.asarray(out.aux.row_mask), sampled)
    assert not np.array_equal(first.aux.sampled, second.aux.sampled)  # fresh negatives

    # Loss: softmax over the target and the sampled negatives only (float64 reference).
    neg = np.broadcast_to(np.asarray(first.aux.sampled), (B, num_classes))
    np.testing.assert_allclose(first.loss, _np_x2_loss(e, w, y, neg), rtol=1e-5)

    # Step 2: rows outside its sample keep W and momentum from after step 1, although
    # their momentum is non-zero (plain SGD with momentum and weight decay would move them).
    w1, m1 = np.asarray(first.weight), np.asarray(first.opt_state[1][0].trace)
    w2, m2 = np.asarray(second.weight), np.asarray(second.opt_state[1][0].trace)
    mask2 = np.asarray(second.aux.row_mask)
    kept = ~mask2 & np.asarray(first.aux.row_mask)
    assert kept.any() and np.abs(m1[kept]).max() > 0
    np.testing.assert_array_equal(w2[~mask2], w1[~mask2])
    np.testing.assert_array_equal(m2[~mask2], m1[~mask2])
    assert (np.abs(w2[mask2] - w1[mask2]).max(axis=1) > 0).all()
    # Step 1 started from zero momentum: never-sampled rows are exactly the initial W.
    never = ~np.asarray(first.aux.row_mask)
    np.testing.assert_array_equal(w1[never], w[never])
    np.testing.assert_array_equal(m1[never], 0.0)


def test_partial_fc_gradient_only_on_sampled_rows(mesh):
    num_classes = 800
    e, w, y = _data(num_classes, seed=12)
    (_, aux), gw = jax.jit(jax.value_and_grad(
        lambda w: sharded_margin_loss(e, w, y, margin_fn="arcface", mesh=mesh, sample_rate=0.1,
                                      rng=jax.random.key(5), return_aux=True), has_aux=True))(w)
    gw, mask = np.asarray(gw), np.asarray(aux.row_mask)
    np.testing.assert_array_equal(gw[~mask], 0.0)
    assert (np.abs(gw[mask]).max(axis=1) > 0).all()


def test_partial_fc_overflow_keeps_exact_targets(mesh):
    num_classes = 160  # 20 rows per shard, sample of 2
    e, w, _ = _data(num_classes, seed=13)
    y = np.array([4, 1, 3, 2, 4, 1, 3, 2] + [45] * 8, np.int32)  # 4 positives on shard 0
    (loss, aux), gw = jax.jit(jax.value_and_grad(
        lambda w: sharded_margin_loss(e, w, y, margin_fn=losses.x2_softmax, mesh=mesh,
                                      sample_rate=0.1, rng=jax.random.key(0), return_aux=True),
        has_aux=True))(w)
    sampled, mask = np.asarray(aux.sampled), np.asarray(aux.row_mask)
    assert int(aux.num_overflow) == 2
    np.testing.assert_array_equal(sampled.reshape(8, 20).sum(1), 2)
    np.testing.assert_array_equal(sampled[:20].nonzero()[0], [1, 2])  # lowest-indexed positives
    assert sampled[45]
    assert mask[[1, 2, 3, 4, 45]].all() and mask.sum() == 4 + 7 * 2  # overflowed rows included
    assert (np.abs(np.asarray(gw)[[3, 4]]).max(axis=1) > 0).all()  # overflowed rows learn
    np.testing.assert_array_equal(np.asarray(gw)[~mask], 0.0)
    neg = np.broadcast_to(sampled, (len(y), num_classes))
    np.testing.assert_allclose(loss, _np_x2_loss(e, w, y, neg), rtol=1e-5)


def test_masked_row_updates_without_mask_is_inner():
    inner = optax.sgd(0.1, momentum=0.9)
    tx = masked_row_updates(inner)
    w = jnp.ones((6, 3))
    g = jnp.arange(18.0).reshape(6, 3)
    u1, s1 = tx.update(g, tx.init(w), w)
    u2, s2 = inner.update(g, inner.init(w), w)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(s1[0].trace, s2[0].trace)
    with pytest.raises(ValueError, match="rows"):
        tx.update({"w": g, "b": jnp.ones(3)}, tx.init({"w": w, "b": jnp.ones(3)}),
                  row_mask=jnp.ones(6, bool))


def test_errors_name_the_problem(mesh):
    e, w, y = _data(61)
    with pytest.raises(ValueError, match="pad_num_classes"):
        sharded_margin_loss(e, w, y, margin_fn="x2_softmax", mesh=mesh)
    with pytest.raises(ValueError, match="out of range"):
        sharded_margin_loss(e, _pad(w, 64), np.full(B, 61, np.int32), margin_fn="x2_softmax",
                            mesh=mesh, num_classes=61)
    with pytest.raises(ValueError, match="rng"):
        sharded_margin_loss(e, _pad(w, 64), y, margin_fn="x2_softmax", mesh=mesh,
                            num_classes=61, sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        sharded_margin_loss(e, _pad(w, 64), y, margin_fn="x2_softmax", mesh=mesh,
                            num_classes=61, sample_rate=0.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="batch 12"):
        sharded_margin_loss(e[:12], _pad(w, 64), y[:12], margin_fn="x2_softmax", mesh=mesh)
    with pytest.raises(ValueError, match="embedding dim"):
        sharded_margin_loss(e[:, :8], _pad(w, 64), y, margin_fn="x2_softmax", mesh=mesh)
    assert pad_num_classes(93431, 8) == 93432 and pad_num_classes(16, 8) == 16
