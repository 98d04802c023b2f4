"""Row-sparse Partial FC: only the sampled rows of W are gathered, differentiated and updated.

References: the dense path (``sharded_margin_loss(..., sample_rate=...)``, W's dense
gradient, ``masked_row_updates`` of optax's SGD: itself tested against
``losses.margin_loss`` in tests/test_parallel_head.py), over a few steps on 1 and 8
simulated devices, with and without overflowing positives; bfloat16 storage against
the float32 update rounded; the compiled memory (no W-sized temporary); the full
train step against the dense one; checkpoints restored on 8, 4 and 1 devices.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from x2jax.parallel import (
    batch_sharding,
    class_centers_sharding,
    gather_rows,
    init_class_centers,
    make_mesh,
    masked_row_updates,
    opt_state_shardings,
    replicated,
    row_sparse_sgd,
    select_rows,
    sharded_margin_loss,
)
from x2jax.parallel.sharding import ShardingRules
from x2jax.train import config as config_lib
from x2jax.train.optimizer import make_optimizer, make_schedule
from x2jax.train.setup import build_step
from x2jax.train.state import make_state_factory

ROOT = Path(__file__).resolve().parents[1]
C, ROWS, D = 200, 256, 16
LR, MOMENTUM, WD = 0.5, 0.9, 5e-4


def _txs(momentum_dtype=None, nesterov=False):
    lr = optax.constant_schedule(LR)
    dense = masked_row_updates(optax.chain(optax.add_decayed_weights(WD),
                                           optax.sgd(lr, momentum=MOMENTUM, nesterov=nesterov)))
    sparse = row_sparse_sgd(lr, momentum=MOMENTUM, weight_decay=WD, nesterov=nesterov,
                            momentum_dtype=momentum_dtype)
    return dense, sparse


def _steps(mesh, sample_rate, rules=ShardingRules()):
    dense_tx, sparse_tx = _txs()

    @jax.jit
    def dense(p, s, e, y, key):
        def loss(p):
            return sharded_margin_loss(e, p["weight"], y, margin_fn="x2_softmax", mesh=mesh, num_classes=C,
                                       sample_rate=sample_rate, rng=key, return_aux=True, rules=rules)
        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = dense_tx.update(g, s, p, row_mask=aux.row_mask)
        return optax.apply_updates(p, u), s, value, aux

    @jax.jit
    def sparse(p, s, e, y, key, apply=True):
        rows = select_rows(y, key, mesh=mesh, num_rows=ROWS, num_classes=C, sample_rate=sample_rate, rules=rules)
        values = gather_rows(p["weight"], rows)

        def loss(values):
            return sharded_margin_loss(e, values, y, margin_fn="x2_softmax", mesh=mesh, num_classes=C, rng=key,
                                       rows=rows, return_aux=True, rules=rules)
        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(values)
        new_w, s = sparse_tx.update({"weight": g}, s, p, rows=rows, row_values=values, apply=apply)
        return new_w, s, value, aux

    return dense_tx, sparse_tx, dense, sparse


def _momentum(state):
    return next(x for x in jax.tree.leaves(state) if x.ndim == 2)


def _count(state):
    return int(next(x for x in jax.tree.leaves(state) if x.ndim == 0))


@pytest.mark.parametrize("num_devices,sample_rate,batch,overflows", [(8, 0.25, 64, True), (1, 0.1, 64, True),
                                                                   (8, 0.5, 8, False), ("2x4", 0.25, 64, True)])
def test_row_sparse_steps_equal_the_dense_path(num_devices, sample_rate, batch, overflows):
    if num_devices == "2x4":  # data=2 x model=4, classes on model only: W replicated over data
        mesh, rules, num_devices = make_mesh(data=2, model=4), ShardingRules(classes="model"), 8
    else:
        mesh, rules = make_mesh(devices=jax.devices()[:num_devices]), ShardingRules()
    dense_tx, sparse_tx, dense, sparse = _steps(mesh, sample_rate, rules)
    params = {"weight": init_class_centers(jax.random.key(0), C, D, mesh, num_rows=ROWS, rules=rules)}
    w0 = np.asarray(params["weight"])
    pd, sd, ps, ss = params, dense_tx.init(params), params, sparse_tx.init(params)
    rng = np.random.default_rng(num_devices)
    touched = np.zeros(ROWS, bool)
    overflow = 0
    for i in range(3):
        e = jnp.asarray(rng.standard_normal((batch, D)), jnp.float32)
        y = jnp.asarray(rng.integers(0, C, batch), jnp.int32)
        pd, sd, ld, aux_d = dense(pd, sd, e, y, jax.random.key(10 + i))
        ps, ss, ls, aux_s = sparse(ps, ss, e, y, jax.random.key(10 + i))
        np.testing.assert_allclose(float(ls), float(ld), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(aux_s.row_mask), np.asarray(aux_d.row_mask))
        assert int(aux_s.num_overflow) == int(aux_d.num_overflow)
        overflow += int(aux_s.num_overflow)
        touched |= np.asarray(aux_s.row_mask)
        # float32 sums of the same terms in another order
        np.testing.assert_allclose(np.asarray(ps["weight"]), np.asarray(pd["weight"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(_momentum(ss)), np.asarray(_momentum(sd)), rtol=1e-4, atol=1e-5)
    assert (overflow > 0) == overflows  # positives beyond the sample: gathered as extra rows, updated
    # rows never in a mask: W and momentum exactly as initialised; the others moved
    np.testing.assert_array_equal(np.asarray(ps["weight"])[~touched], w0[~touched])
    np.testing.assert_array_equal(np.asarray(_momentum(ss))[~touched], 0)
    assert np.all(np.any(np.asarray(ps["weight"])[touched] != w0[touched], axis=1))
    assert _count(ss) == _count(sd) == 3


def test_apply_false_changes_nothing_and_nesterov_follows_the_formula():
    mesh = make_mesh()
    params = {"weight": init_class_centers(jax.random.key(1), C, D, mesh, num_rows=ROWS)}
    _, _, _, sparse = _steps(mesh, 0.25)
    _, sparse_tx = _txs()
    e = jnp.asarray(np.random.default_rng(0).standard_normal((16, D)), jnp.float32)
    y = jnp.arange(16, dtype=jnp.int32) * 7
    p1, s1, _, _ = sparse(params, sparse_tx.init(params), e, y, jax.random.key(0))
    p2, s2, _, _ = sparse(p1, s1, e, y, jax.random.key(1), apply=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), (p1, s1), (p2, s2))
    # Nesterov momentum (optax.trace(nesterov=True)), two steps from the same values, in float64
    dense_tx, nesterov_tx = _txs(nesterov=True)

    @jax.jit
    def two_updates(params):
        rows = select_rows(y, jax.random.key(2), mesh=mesh, num_rows=ROWS, num_classes=C, sample_rate=0.25)
        values = gather_rows(params["weight"], rows)
        g = jax.random.normal(jax.random.key(3), values.shape)
        state = nesterov_tx.init(params)
        for _ in range(2):
            new, state = nesterov_tx.update({"weight": g}, state, params, rows=rows, row_values=values)
        return rows, values, g, new, state

    rows, values, g, new, state = two_updates(params)
    m = np.asarray(_momentum(state))
    upd = np.asarray(rows.update)
    r = np.asarray(rows.rows).reshape(8, -1) + np.arange(8)[:, None] * (ROWS // 8)
    r = r.reshape(-1)[upd]
    v, gg = np.asarray(values, np.float64)[upd], np.asarray(g, np.float64)[upd]
    # second step from the stored (unchanged) values: m1 = g1, m2 = g2 + mu m1 with g = grad + wd v
    g1 = gg + WD * v
    np.testing.assert_allclose(m[r], g1 + MOMENTUM * g1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new["weight"])[r], v - LR * (g1 + MOMENTUM * (g1 + MOMENTUM * g1)),
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_store_is_the_float32_update_rounded():
    mesh = make_mesh()
    w32 = init_class_centers(jax.random.key(2), C, D, mesh, num_rows=ROWS)
    w16 = init_class_centers(jax.random.key(2), C, D, mesh, num_rows=ROWS, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(w16), np.asarray(w32.astype(jnp.bfloat16)))  # drawn in fp32, rounded
    w32 = w16.astype(jnp.float32)  # the reference starts from the rounded values
    dense_tx, _, dense, _ = _steps(mesh, 0.25)
    _, sparse_tx = _txs(momentum_dtype=jnp.bfloat16)

    @jax.jit
    def sparse(p, s, e, y, key):
        rows = select_rows(y, key, mesh=mesh, num_rows=ROWS, num_classes=C, sample_rate=0.25)
        values = gather_rows(p["weight"], rows)
        (value, aux), g = jax.value_and_grad(lambda v: sharded_margin_loss(
            e, v, y, margin_fn="x2_softmax", mesh=mesh, num_classes=C, rng=key, rows=rows, return_aux=True),
            has_aux=True)(values)
        return (*sparse_tx.update({"weight": g}, s, p, rows=rows, row_values=values), value, aux)

    p16, p32 = {"weight": w16}, {"weight": w32}
    s16 = sparse_tx.init(p16)
    assert _momentum(s16).dtype == jnp.bfloat16 and p16["weight"].dtype == jnp.bfloat16
    e = jnp.asarray(np.random.default_rng(1).standard_normal((32, D)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(2).integers(0, C, 32), jnp.int32)
    n16, ns16, l16, aux = sparse(p16, s16, e, y, jax.random.key(5))
    n32, ns32, l32, _ = dense(p32, dense_tx.init(p32), e, y, jax.random.key(5))
    np.testing.assert_allclose(float(l16), float(l32), rtol=1e-6)
    assert n16["weight"].dtype == jnp.bfloat16 and _momentum(ns16).dtype == jnp.bfloat16
    ulp = lambda x: np.spacing(np.abs(np.asarray(x, np.float32))) * 2**16  # bfloat16 keeps 8 of 24 bits  # noqa: E731
    for got, want in ((n16["weight"], n32["weight"]), (_momentum(ns16), _momentum(ns32))):
        got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want)
        rounded = np.asarray(jnp.asarray(want).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.all(np.abs(got - rounded) <= ulp(want)), np.max(np.abs(got - rounded))
    mask = np.asarray(aux.row_mask)
    np.testing.assert_array_equal(np.asarray(n16["weight"])[~mask], np.asarray(w16)[~mask])


def _head_step_memory(mesh, mode, num_rows, dim, batch):
    """Per-device temporaries and aliased bytes of a compiled head step (W and its state donated)."""
    lr = optax.constant_schedule(0.1)
    if mode == "dense":
        tx = masked_row_updates(optax.chain(optax.add_decayed_weights(WD), optax.sgd(lr, momentum=MOMENTUM)))
    else:
        tx = row_sparse_sgd(lr, momentum=MOMENTUM, weight_decay=WD)
    wsh = class_centers_sharding(mesh)
    w = {"weight": jax.ShapeDtypeStruct((num_rows, dim), jnp.float32, sharding=wsh)}
    state_sh = opt_state_shardings(tx, jax.eval_shape(tx.init, w), {"weight": wsh}, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(tx.init, w), state_sh)

    def step(p, s, e, y, key):
        if mode == "dense":
            (value, aux), g = jax.value_and_grad(lambda p: sharded_margin_loss(
                e, p["weight"], y, margin_fn="x2_softmax", mesh=mesh, num_classes=num_rows, sample_rate=0.1,
                rng=key, return_aux=True), has_aux=True)(p)
            u, s = tx.update(g, s, p, row_mask=aux.row_mask)
            return optax.apply_updates(p, u), s, value
        rows = select_rows(y, key, mesh=mesh, num_rows=num_rows, num_classes=num_rows, sample_rate=0.1)
        values = gather_rows(p["weight"], rows)
        value, g = jax.value_and_grad(lambda v: sharded_margin_loss(
            e, v, y, margin_fn="x2_softmax", mesh=mesh, num_classes=num_rows, rng=key, rows=rows))(values)
        new, s = tx.update({"weight": g}, s, p, rows=rows, row_values=values)
        return new, s, value

    bsh, rep = batch_sharding(mesh), replicated(mesh)
    jitted = jax.jit(step, in_shardings=({"weight": wsh}, state_sh, bsh, bsh, rep),
                     out_shardings=({"weight": wsh}, state_sh, rep), donate_argnums=(0, 1))
    compiled = jitted.lower(w, state, jax.ShapeDtypeStruct((batch, dim), jnp.float32),
                            jax.ShapeDtypeStruct((batch,), jnp.int32),
                            jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes, m.alias_size_in_bytes


def test_row_sparse_step_has_no_w_sized_temporary_and_updates_in_place():
    """65,536 x 64 W over 8 devices (2 MiB a shard), 10 % sampled: the dense path's temporaries
    exceed a W shard (its gradient); the row-sparse step's stay below it, and W and the
    momentum are aliased to the donated inputs (the scatter is in place)."""
    mesh = make_mesh()
    rows, dim = 65536, 64
    shard_bytes = rows // 8 * dim * 4
    dense_temp, _ = _head_step_memory(mesh, "dense", rows, dim, 64)
    sparse_temp, sparse_alias = _head_step_memory(mesh, "sparse", rows, dim, 64)
    assert dense_temp > shard_bytes, (dense_temp, shard_bytes)
    assert sparse_temp < shard_bytes * 0.75, (sparse_temp, shard_bytes)
    assert sparse_alias >= 2 * shard_bytes, sparse_alias


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    c.data.batch_size, c.data.image_size = 16, 16
    c.model.layers, c.model.widths, c.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 16
    c.model.conv_impl = "xla"
    c.loss.sample_rate = 0.25
    c.num_steps, c.schedule.warmup_steps = 10, 0
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def _run(config, mesh, num_steps, num_classes=300):
    step = build_step(config, mesh, ShardingRules(), num_classes=num_classes, image_size=16, total_steps=10)
    state = step.create_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(num_steps):
        batch = {"image": jnp.asarray(rng.standard_normal((16, 16, 16, 3)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, num_classes, 16), jnp.int32)}
        state, metrics = step.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return step, state, losses


@pytest.mark.slow
def test_train_step_row_sparse_equals_dense():
    mesh = make_mesh()
    _, dense_state, dense_losses = _run(_tiny_config(**{"loss.head_update": "dense"}), mesh, 2)
    _, sparse_state, sparse_losses = _run(_tiny_config(), mesh, 2)  # "auto": row-sparse
    np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 (sparse_state.params, sparse_state.opt_state), (dense_state.params, dense_state.opt_state))
    assert jax.tree.structure(sparse_state.opt_state) == jax.tree.structure(dense_state.opt_state)


@pytest.mark.slow
def test_bfloat16_row_sparse_checkpoint_restores_on_8_4_and_1(tmp_path):
    cfg = _tiny_config(**{"loss.head_store_dtype": "bfloat16", "optimizer.head_momentum_dtype": "bfloat16"})
    step, state, losses = _run(cfg, make_mesh(), 2)
    assert np.all(np.isfinite(losses))
    assert state.params["head"]["weight"].dtype == jnp.bfloat16
    assert _momentum(state.opt_state.inner_states["head"]).dtype == jnp.bfloat16
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
    saved = jax.tree.map(np.asarray, state)
    tx = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule, 10), row_sparse_head=True)
    for n in (8, 4, 1):
        mesh = make_mesh(devices=jax.devices()[:n])
        _, shardings, abstract = make_state_factory(model=step.model, tx=tx, mesh=mesh, num_classes=300,
                                                    loss_name=cfg.loss.name, head_dtype="bfloat16")
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(tmp_path / "state", abstract)
        w = restored.params["head"]["weight"]
        assert w.dtype == jnp.bfloat16 and len(w.sharding.device_set) == n
        assert w.sharding.is_equivalent_to(shardings.params["head"]["weight"], 2)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, saved)


def test_config_keys_and_errors():
    c = _tiny_config()
    config_lib.validate(c)
    assert config_lib.row_sparse_head(c)
    assert not config_lib.row_sparse_head(_tiny_config(**{"loss.head_update": "dense"}))
    assert not config_lib.row_sparse_head(_tiny_config(**{"optimizer.name": "adamw"}))
    bad = [({"loss.head_store_dtype": "float16"}, "loss.head_store_dtype"),
           ({"optimizer.head_momentum_dtype": "int8"}, "optimizer.head_momentum_dtype"),
           ({"loss.head_update": "lazy"}, "loss.head_update"),
           ({"loss.head_update": "sparse", "loss.sample_rate": 1.0}, "loss.head_update='sparse'"),
           ({"loss.head_store_dtype": "bfloat16", "loss.head_update": "dense"}, "row-sparse"),
           ({"optimizer.head_momentum_dtype": "bfloat16", "optimizer.name": "adamw"}, "row-sparse")]
    for overrides, message in bad:
        with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
            config_lib.validate(_tiny_config(**overrides))
    with pytest.raises(ValueError, match="optimizer.name='sgd'"):
        make_optimizer(_tiny_config(**{"optimizer.name": "adamw"}).optimizer, optax.constant_schedule(0.1),
                       row_sparse_head=True)
    with pytest.raises(ValueError, match="row_values"):
        _, tx = _txs()
        p = {"weight": jnp.zeros((ROWS, D))}
        tx.update({"weight": jnp.zeros((8, D))}, tx.init(p), p)
