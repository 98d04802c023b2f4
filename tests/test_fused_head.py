"""The fused cross-entropy of target-only margins (``margin_loss``'s fast path).

References: the generic path ``mean(cross_entropy(margin_fn(cosine, labels)))``
built from the same cosine, numpy float64 (values, closed-form gradients), the
loss on the in-range rows only (for out-of-range labels), and the float32 head
on upcast inputs (for bfloat16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import losses as L

B, C, D = 8, 11, 16

# Every target-only margin of the registry, both X2 gradient modes, non-default
# parameters. Params are factories (keys are made at test time).
CASES = [
    ("x2_softmax", dict),
    ("x2_softmax", lambda: {"gradient": "exact"}),
    ("x2_softmax", lambda: {"scale": 30.0, "a": -0.5, "h": 0.2, "k": 0.8, "gradient": "exact"}),
    ("x2_softmax", lambda: {"h": 0.2, "k": 0.8}),
    ("normface", dict),
    ("softmax", lambda: {"scale": 10.0}),
    ("arcface", dict),
    ("arcface", lambda: {"scale": 32.0, "margin": 0.3}),
    ("cosface", dict),
    ("combined_margin", lambda: {"m1": 1.2, "m2": 0.3, "m3": 0.1}),
    ("combined_margin", lambda: {"m1": 0.9, "m2": 0.4, "gradient": "exact"}),
    ("sphereface", dict),
    ("sphereface", lambda: {"margin": 3, "lamb": 5.0}),
    ("elasticface", lambda: {"rng": jax.random.key(3)}),
    ("adaface", lambda: {"batch_mean": 2.0, "batch_std": 1.0}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def test_cases_cover_every_target_only_margin():
    assert {name for name, _ in CASES} == set(L.NAMES) - {"curricularface"}


def _with_norms(fn, params, emb):
    if L.spec_of(fn).needs_norms and "norms" not in params:
        params = dict(params, norms=jnp.linalg.norm(emb.astype(jnp.float32), axis=1))
    return params


def _cosine(emb, w):
    return L.l2_normalize(emb) @ L.l2_normalize(w).T


def _generic_loss(emb, w, labels, fn, params):
    """The reference: margin function logits + cross_entropy from the same cosine."""
    params = _with_norms(fn, params, emb)
    return jnp.mean(L.cross_entropy(fn(_cosine(emb, w), labels, **params), labels))


def _head(seed=0):
    """Embeddings, centres, labels with cos_y ~ +1 (row 0), ~ -1 (row 1), a non-target
    cosine ~ 1 (row 2: two equal centres), rows 5 and 6 with labels C and -1."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(C, D)).astype(np.float32)
    emb = rng.normal(size=(B, D)).astype(np.float32) * 3
    labels = np.array([0, 1, 2, 3, 4, C, -1, 9], np.int32)
    w[10] = w[2]
    emb[0] = 2.5 * w[0]
    emb[1] = -w[1]
    emb[2] = 0.7 * w[2]
    good = (labels >= 0) & (labels < C)
    return emb, w, labels, good


def _grad_atol(emb, w, labels, fn, params):
    """Float32 rounding of dE, dW: relative to the largest d loss / d cosine term, since
    the normalisation Jacobians cancel large terms (cos_y = +-1 with floored sin)."""
    params = _with_norms(fn, params, jnp.asarray(emb))
    gcos = jax.jit(jax.grad(lambda c, y: jnp.mean(L.cross_entropy(fn(c, y, **params), y))))(
        _cosine(emb, w), labels)  # traced labels: out-of-range rows allowed
    return 2e-6 * float(jnp.max(jnp.abs(gcos)))


@pytest.mark.parametrize("name,make_params", CASES, ids=IDS)
def test_margin_loss_equals_generic_path_values_and_gradients(name, make_params):
    emb, w, labels, good = _head()
    fn, params = L.get(name), make_params()
    fused = jax.jit(jax.value_and_grad(
        lambda e, w, y: L.margin_loss(e, w, y, name, **params), argnums=(0, 1)))
    generic = jax.jit(jax.value_and_grad(
        lambda e, w, y: _generic_loss(e, w, y, fn, params), argnums=(0, 1)))
    (got, (ge, gw)), (want, (we, ww)) = fused(emb, w, labels), generic(emb, w, labels)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    atol = _grad_atol(emb, w, labels, fn, params)
    np.testing.assert_allclose(np.asarray(ge), np.asarray(we), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(ww), rtol=1e-5, atol=atol)

    # Out-of-range traced labels (rows 5, 6): contribute 0 and get no gradient.
    assert np.all(np.asarray(ge)[~good] == 0.0)
    if name == "elasticface":
        return  # its random margins are drawn per row position: no sub-batch reference
    sub, (sub_e, sub_w) = jax.value_and_grad(
        lambda e, w: _generic_loss(e, w, jnp.asarray(labels[good]), fn, params),
        argnums=(0, 1))(jnp.asarray(emb[good]), jnp.asarray(w))
    frac = good.sum() / B
    np.testing.assert_allclose(float(got), frac * float(sub), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ge)[good], frac * np.asarray(sub_e), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(np.asarray(gw), frac * np.asarray(sub_w), rtol=1e-5, atol=atol)


def _edge_cosines():
    """(B, C) cosines with exact and rounded-beyond ends, AdaFace's clip edges exactly."""
    rng = np.random.default_rng(4)
    cos = rng.uniform(-0.95, 0.95, (B, C)).astype(np.float32)
    labels = np.array([0, 3, 5, 7, C, -1, 2, 9], np.int32)
    above, below = np.nextafter(np.float32(1), np.float32(2)), np.nextafter(np.float32(-1), np.float32(-2))
    cos[0, 0], cos[1, 3], cos[2, 5], cos[3, 7] = 1.0, -1.0, above, below
    cos[6, [0, 1, 3, 4]] = [above, 1.0, np.float32(1 - 1e-3), np.float32(-1 + 1e-3)]
    cos[7, [0, 1, 2]] = [below, -1.0, np.float32(0.9995)]
    return cos, labels


@pytest.mark.parametrize("name,make_params", CASES, ids=IDS)
def test_fused_cross_entropy_equals_generic_at_the_ends_of_the_cosine_range(name, make_params):
    cos, labels = _edge_cosines()
    fn, params = L.get(name), make_params()
    if name == "adaface":
        params["norms"] = jnp.linspace(0.5, 4.0, B)

    @jax.jit
    def both(c, y):
        margin = L.spec_of(fn).target_only(params)
        fused = jax.value_and_grad(lambda c: jnp.sum(L.target_margin_cross_entropy(c, y, margin)))
        generic = jax.value_and_grad(lambda c: jnp.sum(L.cross_entropy(fn(c, y, **params), y)))
        rows = (L.target_margin_cross_entropy(c, y, margin), L.cross_entropy(fn(c, y, **params), y))
        return fused(c), generic(c), rows

    (got, g_got), (want, g_want), (rows_got, rows_want) = both(jnp.asarray(cos), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(rows_got), np.asarray(rows_want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-5,
                               atol=1e-6 * float(jnp.max(jnp.abs(g_want))))
    assert np.all(np.asarray(rows_got)[4:6] == 0.0) and np.all(np.asarray(g_got)[4:6] == 0.0)


# ---------------------------------------------------------------------------
# numpy float64 references
# ---------------------------------------------------------------------------


def _np_ce(logits, labels):
    mx = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
    return lse - logits[np.arange(len(labels)), labels]


def _np_x2_logits(cos, labels, s, a, h, k):
    cos = np.clip(cos.astype(np.float64), -1, 1)
    rows = np.arange(len(labels))
    out = cos.copy()
    out[rows, labels] = a * (np.arccos(cos[rows, labels]) - h) ** 2 + k
    return s * out


@pytest.mark.parametrize("gradient", ["straight_through", "exact"])
def test_x2_fused_value_and_gradient_match_numpy_float64(gradient):
    s, a, h, k = 64.0, -0.9, 0.1, 0.65
    cos, labels = _edge_cosines()
    good = (labels >= 0) & (labels < C)
    margin = L.spec("x2_softmax").target_only(dict(scale=s, a=a, h=h, k=k, gradient=gradient))
    rows, g = jax.jit(lambda c, y: (
        L.target_margin_cross_entropy(c, y, margin),
        jax.grad(lambda c: jnp.mean(L.target_margin_cross_entropy(c, y, margin)))(c),
    ))(jnp.asarray(cos), jnp.asarray(labels))
    logits = _np_x2_logits(cos[good], labels[good], s, a, h, k)
    np.testing.assert_allclose(np.asarray(rows)[good], _np_ce(logits, labels[good]), rtol=1e-6)
    # d/dcos: s (p - onehot) / B off target; on target s (p_y - 1) f'(cos_y) / B, with
    # f' = 1 (straight-through) or 2a (theta - h) (-1 / max(sin theta, SIN_FLOOR)) (exact).
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows_idx = np.arange(good.sum())
    theta = np.arccos(np.clip(cos[good, labels[good]].astype(np.float64), -1, 1))
    # exact: 2a (theta - h) (-1 / sin theta) = -2a theta / sin + 2a h / sin, sin floored
    # at SIN_FLOOR except in theta / sin theta for theta < pi/2 (limit 1 at theta = 0).
    sin = np.maximum(np.sin(theta), L.SIN_FLOOR)
    theta_over_sin = np.where(theta < np.pi / 2, 1 / np.sinc(theta / np.pi), theta / sin)
    fprime = np.ones_like(theta) if gradient == "straight_through" else (
        -2 * a * theta_over_sin + 2 * a * h / sin)
    want = s * p / B
    want[rows_idx, labels[good]] = s * (p[rows_idx, labels[good]] - 1) * fprime / B
    np.testing.assert_allclose(np.asarray(g)[good], want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(g)[~good], 0.0)


def test_x2_margin_loss_matches_numpy_float64_head():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(B, D))
    w = rng.normal(size=(C, D)) * 0.01
    labels = np.array([0, 3, 5, 7, C + 4, 2, 9, 1], np.int32)
    good = labels < C
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    for gradient in ("straight_through", "exact"):
        got = jax.jit(lambda e, w, y: L.margin_loss(e, w, y, "x2_softmax", gradient=gradient, scale=48.0))(
            jnp.asarray(emb, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(labels))
        ref = _np_ce(_np_x2_logits(cos[good], labels[good], 48.0, -0.9, 0.0, 0.65), labels[good]).sum() / B
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)


# ---------------------------------------------------------------------------
# dtypes, parameters, the generic path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,make_params", CASES, ids=IDS)
def test_bfloat16_inputs_are_finite_and_computed_in_float32(name, make_params):
    emb, w, labels, _ = _head(1)
    params = make_params()
    emb16, w16 = jnp.asarray(emb, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    vg = jax.jit(jax.value_and_grad(lambda e, w, y: L.margin_loss(e, w, y, name, **params), argnums=(0, 1)))
    loss, (ge, gw) = vg(emb16, w16, labels)
    assert loss.dtype == jnp.float32 and ge.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(ge, np.float32))) and np.all(np.isfinite(np.asarray(gw, np.float32)))
    # Same as the float32 head on the upcast inputs (the loss upcasts first).
    ref, (re, rw) = vg(emb16.astype(jnp.float32), w16.astype(jnp.float32), labels)
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    for g, r in ((ge, re), (gw, rw)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r.astype(jnp.bfloat16), np.float32),
                                   rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(r))))


def test_gradients_of_traced_parameters_equal_generic_path():
    emb, w, labels, _ = _head(2)
    exact = {"gradient": "exact", "m1": 1.2}
    for name, key, v, fixed in (("x2_softmax", "scale", 40.0, {}), ("arcface", "scale", 40.0, {}),
                                ("combined_margin", "m2", 0.3, exact),
                                ("combined_margin", "m3", 0.2, exact),
                                ("sphereface", "lamb", 2.0, {})):
        fn = L.get(name)
        fused = jax.jit(jax.grad(lambda v, y: L.margin_loss(emb, w, y, name, **fixed, **{key: v})))
        generic = jax.jit(jax.grad(lambda v, y: _generic_loss(emb, w, y, fn, {**fixed, key: v})))
        v = jnp.float32(v)
        want = float(generic(v, labels))
        np.testing.assert_allclose(float(fused(v, labels)), want, rtol=1e-5)
        assert want != 0.0


def _has_custom_vjp(fn, *args):
    return "custom_vjp" in str(jax.make_jaxpr(fn)(*args))


def test_fused_path_only_for_target_only_registry_margins():
    emb, w, labels, _ = _head(3)
    args = (jnp.asarray(emb), jnp.asarray(w), jnp.asarray(labels))
    key = jax.random.key(0)
    for name in set(L.NAMES) - {"curricularface"}:
        params = {"rng": key} if name == "elasticface" else {}
        assert _has_custom_vjp(lambda e, w, y: L.margin_loss(e, w, y, name, **params), *args), name
    for margin_fn, params in ((L.curricularface, {"t": 0.2}),
                              (L.combined_margin, {"interclass_filtering_threshold": 0.3}),
                              (lambda c, y, **kw: L.x2_softmax(c, y, **kw), {"scale": 30.0})):
        assert not _has_custom_vjp(lambda e, w, y: L.margin_loss(e, w, y, margin_fn, **params), *args)


def test_user_margin_functions_take_the_generic_path():
    rng = np.random.default_rng(6)
    emb, w = rng.normal(size=(B, D)), rng.normal(size=(C, D))
    labels = rng.integers(0, C, B).astype(np.int32)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T

    def squared(cosine, labels, *, scale=8.0):  # changes every logit: not target-only
        return scale * jnp.sign(cosine) * cosine**2

    got = L.margin_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(labels), squared)
    np.testing.assert_allclose(float(got), _np_ce(8.0 * np.sign(cos) * cos**2, labels).mean(), rtol=1e-5)

    # A wrapper of a registry margin: generic path, same value and gradients as the fused one.
    wrapped = lambda c, y, **kw: L.arcface(c, y, **kw)  # noqa: E731
    e, ww, y = jnp.asarray(emb, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(labels)
    a, ga = jax.value_and_grad(L.margin_loss, argnums=(0, 1))(e, ww, y, wrapped, margin=0.4)
    b, gb = jax.value_and_grad(L.margin_loss, argnums=(0, 1))(e, ww, y, "arcface", margin=0.4)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for x, z in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(z))))


def test_margin_loss_rejects_bad_margin_parameters():
    emb, w, labels, good = _head(7)
    e, ww, y = jnp.asarray(emb[good]), jnp.asarray(w), jnp.asarray(labels[good])
    with pytest.raises(ValueError, match="gradient must be"):
        L.margin_loss(e, ww, y, "x2_softmax", gradient="bogus")
    with pytest.raises(ValueError, match="gradient must be"):
        L.margin_loss(e, ww, y, "combined_margin", gradient="bogus")
    with pytest.raises(ValueError, match="positive integer"):
        L.margin_loss(e, ww, y, "sphereface", margin=2.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        L.margin_loss(e, ww, y, "arcface", m2=0.3)
    with pytest.raises(TypeError):
        L.margin_loss(e, ww, y, "elasticface")  # rng is required, as in a direct call
