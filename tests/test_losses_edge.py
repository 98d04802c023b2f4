"""Margin losses at the ends of [-1, 1] in float32/bfloat16/float16, and empty batches."""

import inspect
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import losses as L
from x2jax.parallel import make_mesh, sharded_margin_loss

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Largest value below 1 of each dtype, from its bit pattern (not from finfo).
BELOW_ONE = {
    "float32": float(np.array([0x3F7FFFFF], np.uint32).view(np.float32)[0]),
    "bfloat16": float(np.array([0x3F7F], np.uint16).view(jnp.bfloat16)[0]),
    "float16": float(np.array([0x3BFF], np.uint16).view(np.float16)[0]),
}
C = 8


def _functions():
    """(name, gradient option or None) for every registered function (aliases once)."""
    seen, out = set(), []
    for name in L.NAMES:
        fn = L.get(name)
        if fn in seen:
            continue
        seen.add(fn)
        if "gradient" in inspect.signature(fn).parameters:
            options = typing.get_args(typing.get_type_hints(fn)["gradient"])
            out += [(name, g) for g in options]
        else:
            out.append((name, None))
    return out


FUNCTIONS = _functions()


def _extra(name, batch):
    """Inputs the stateful/stochastic losses need, as the training step passes them."""
    kw = dict(L.initial_state(name))
    if name == "curricularface":
        kw["t"] = jnp.float32(0.3)  # non-zero: the hard-negative branch changes values
    if name == "adaface":
        kw["norms"] = jnp.linspace(0.5, 50.0, batch)
    if name == "elasticface":
        kw["rng"] = jax.random.key(3)
    return kw


def _grid(dtype_name):
    """Cosines (B, C) float32 whose target column runs over both ends, their
    neighbours in the given dtype and in float32, and interior points."""
    e = BELOW_ONE[dtype_name]
    ends = [-1.0, -e, -BELOW_ONE["float32"], -(1 - 1e-4), -0.5, 0.0, 0.5, 1 - 1e-4, BELOW_ONE["float32"], e, 1.0]
    rng = np.random.default_rng(0)
    cos = rng.choice(np.array(ends), size=(len(ends), C)).astype(np.float32)
    labels = np.arange(len(ends)) % C
    cos[np.arange(len(ends)), labels] = ends
    return cos, labels.astype(np.int32)


_JIT = {}


def _value_and_grads(name, gradient):
    """jit fn: (cos, labels, weights, kw) -> (logits, d sum(logits * weights)/d cos, d CE/d cos)."""
    key = (name, gradient)
    if key not in _JIT:
        fn = L.get(name)
        static = {} if gradient is None else {"gradient": gradient}

        @jax.jit
        def run(cos, labels, weights, kw):
            def weighted(c):
                logits = fn(c, labels, **kw, **static)
                return jnp.sum(logits * weights), logits

            def ce(c):
                return jnp.mean(L.cross_entropy(fn(c, labels, **kw, **static), labels))

            (_, logits), g = jax.value_and_grad(weighted, has_aux=True)(cos)
            return logits, g, jax.grad(ce)(cos)

        _JIT[key] = run
    return _JIT[key]


def test_sin_floor_is_sin_theta_at_the_neighbour_of_one():
    assert L.sin_floor(jnp.float32) == L.SIN_FLOOR  # float32's neighbour: sin ~ 3.5e-4 < 1e-3
    for name in ("bfloat16", "float16"):
        c = BELOW_ONE[name]
        np.testing.assert_allclose(L.sin_floor(DTYPES[name]), np.sin(np.arccos(c)), rtol=1e-12)
    # float16 at cos = -1: 2 * 0.9 * pi / SIN_FLOOR * 64 overflows float16; with its floor it does not.
    assert 2 * 0.9 * np.pi / L.SIN_FLOOR * 64 > float(jnp.finfo(jnp.float16).max)
    assert 2 * 0.9 * np.pi / L.sin_floor(jnp.float16) * 64 < float(jnp.finfo(jnp.float16).max)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name,gradient", FUNCTIONS, ids=[f"{n}-{g}" for n, g in FUNCTIONS])
def test_values_and_gradients_finite_over_the_whole_range(name, gradient, dtype_name):
    dtype = DTYPES[dtype_name]
    cos32, labels = _grid(dtype_name)
    weights = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, cos32.shape), jnp.float32)
    kw = _extra(name, len(labels))
    run = _value_and_grads(name, gradient)
    cos = jnp.asarray(cos32, dtype)
    logits, g, g_ce = run(cos, jnp.asarray(labels), weights, kw)
    assert logits.dtype == jnp.float32  # the contract: float32 logits for any input dtype
    assert g.dtype == dtype and g_ce.dtype == dtype
    assert np.all(np.isfinite(np.asarray(logits))), (name, gradient, dtype_name)
    bad = ~np.isfinite(np.asarray(g, np.float32))
    assert not bad.any(), (name, gradient, dtype_name, np.asarray(cos, np.float32)[bad])
    assert np.all(np.isfinite(np.asarray(g_ce, np.float32))), (name, gradient, dtype_name)
    if dtype_name == "float32":
        return
    # Against float32 at the same (rounded) cosines: inside (-1, 1) every low-precision
    # cosine has sin theta above its floor, so the gradients agree to the cotangent's rounding.
    _, g_ref, g_ce_ref = run(cos.astype(jnp.float32), jnp.asarray(labels), weights, kw)
    inner = np.abs(np.asarray(cos, np.float32)) < 1
    rtol = 2.0 ** -(jnp.finfo(dtype).nmant - 1)
    for low, ref in ((g, g_ref), (g_ce, g_ce_ref)):
        low, ref = np.asarray(low, np.float32), np.asarray(ref)
        np.testing.assert_allclose(low[inner], ref[inner], rtol=rtol, atol=rtol * np.abs(ref).max() * 1e-2)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_exact_x2_gradient_at_minus_one_is_that_of_the_neighbour(dtype_name):
    dtype = DTYPES[dtype_name]
    e = BELOW_ONE[dtype_name]
    cos = jnp.asarray([[-1.0, 0.0], [-e, 0.0], [1.0, 0.0]], dtype)
    labels = jnp.zeros(3, jnp.int32)
    g = jax.grad(lambda c: jnp.sum(L.x2_softmax(c, labels, gradient="exact")))(cos)
    g = np.asarray(g, np.float64)[:, 0]
    # d f / d cos = 2a theta / sin theta (h = 0), sin floored at sin(arccos(e)); times scale 64.
    a, s, fl = -0.9, 64.0, np.sin(np.arccos(e))
    np.testing.assert_allclose(g[0], s * -2 * a * np.pi / fl, rtol=1e-2)
    np.testing.assert_allclose(g[1], s * -2 * a * np.arccos(-e) / fl, rtol=1e-2)
    np.testing.assert_allclose(g[2], s * -2 * a, rtol=1e-2)  # theta / sin theta -> 1 at theta = 0
    # float32 keeps SIN_FLOOR (its neighbour of -1 is far closer).
    g32 = jax.grad(lambda c: jnp.sum(L.x2_softmax(c, labels, gradient="exact")))(cos.astype(jnp.float32))
    np.testing.assert_allclose(float(g32[0, 0]), s * -2 * a * np.pi / L.SIN_FLOOR, rtol=1e-5)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_margin_loss_gradients_finite_at_the_ends_in_low_precision(dtype_name):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(2)
    w = rng.normal(size=(C, 16)).astype(np.float32)
    labels = np.arange(6, dtype=np.int32) % C
    sign = np.array([1, -1, 1, -1, 1, -1], np.float32)[:, None]
    emb = sign * w[labels] * 3.0  # cos_y = +-1 (to rounding)
    emb[4:] += 1e-3 * rng.normal(size=(2, 16))  # just inside the ends
    for name, gradient in FUNCTIONS:
        kw = _extra(name, len(labels))
        kw.pop("norms", None)  # margin_loss passes the embedding norms
        kw |= {} if gradient is None else {"gradient": gradient}
        loss, (ge, gw) = jax.value_and_grad(L.margin_loss, argnums=(0, 1))(
            jnp.asarray(emb, dtype), jnp.asarray(w, dtype), jnp.asarray(labels), name, **kw
        )
        assert loss.dtype == jnp.float32 and np.isfinite(float(loss)), (name, gradient)
        assert ge.dtype == dtype and gw.dtype == dtype
        assert np.all(np.isfinite(np.asarray(ge, np.float32))), (name, gradient)
        assert np.all(np.isfinite(np.asarray(gw, np.float32))), (name, gradient)


# ---------------------------------------------------------------------------
# Empty batch
# ---------------------------------------------------------------------------


def test_mean_over_an_empty_batch_would_be_nan():
    # Why B = 0 must raise: the generic path's batch mean is NaN.
    cos, labels = jnp.zeros((0, C)), jnp.zeros((0,), jnp.int32)
    assert np.isnan(float(jnp.mean(L.cross_entropy(L.x2_softmax(cos, labels), labels))))


@pytest.mark.parametrize("name", ["x2_softmax", "arcface", "curricularface", "adaface"])
def test_margin_loss_rejects_an_empty_batch_eagerly_and_under_jit(name):
    emb, w, labels = jnp.zeros((0, 16)), jnp.ones((C, 16)), jnp.zeros((0,), jnp.int32)
    match = r"margin_loss: empty batch, embeddings shape \(0, 16\) \(B = 0\)"
    with pytest.raises(ValueError, match=match):
        L.margin_loss(emb, w, labels, name)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda e, ww, y: L.margin_loss(e, ww, y, name))(emb, w, labels)


def test_margin_loss_batch_of_one_matches_the_generic_path():
    rng = np.random.default_rng(4)
    e, w = jnp.asarray(rng.normal(size=(1, 16)), jnp.float32), jnp.asarray(rng.normal(size=(C, 16)), jnp.float32)
    y = jnp.asarray([3], jnp.int32)
    cos = L.l2_normalize(e) @ L.l2_normalize(w).T
    ref = jnp.mean(L.cross_entropy(L.x2_softmax(cos, y), y))  # generic path, not the fused one
    np.testing.assert_allclose(float(L.margin_loss(e, w, y, "x2_softmax")), float(ref), rtol=1e-5)


def test_sharded_margin_loss_rejects_an_empty_batch():
    mesh = make_mesh()
    emb, w, labels = jnp.zeros((0, 16)), jnp.ones((C, 16)), jnp.zeros((0,), jnp.int32)
    with pytest.raises(ValueError, match=r"sharded_margin_loss: empty batch, embeddings shape \(0, 16\)"):
        sharded_margin_loss(emb, w, labels, margin_fn="x2_softmax", mesh=mesh)
