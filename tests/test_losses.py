"""Margin losses against numpy float64 references, closed forms and insightface (torch)."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

from x2jax import losses as L
from x2jax.losses import geometry

B, C = 6, 11


def _cosines(seed, b=B, c=C, ends=True):
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-1, 1, (b, c))
    if ends:  # exact ends and near-ends in the target columns
        cos[0, 0], cos[1, 3], cos[2, 5], cos[3, 7] = 1.0, -1.0, 1 - 1e-7, -1 + 1e-7
    labels = np.array([0, 3, 5, 7] + list(rng.integers(0, c, b - 4)), np.int32)
    return cos.astype(np.float32), labels


def _np_replace(cos, labels, target, scale):
    out = cos.astype(np.float64).copy()
    out[np.arange(len(labels)), labels] = target
    return scale * out


# ---------------------------------------------------------------------------
# numpy float64 references, written from the papers / official code
# ---------------------------------------------------------------------------


def ref_x2(cos, labels, s=64.0, a=-0.9, h=0.0, k=0.65):
    cos = np.clip(cos.astype(np.float64), -1, 1)
    theta = np.arccos(cos[np.arange(len(labels)), labels])
    return _np_replace(cos, labels, a * (theta - h) ** 2 + k, s)


def ref_combined(cos, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0):
    cos = np.clip(cos.astype(np.float64), -1, 1)
    theta = np.arccos(cos[np.arange(len(labels)), labels])
    return _np_replace(cos, labels, np.cos(m1 * theta + m2) - m3, s)


def ref_sphereface(cos, labels, s=64.0, m=4, lamb=0.0):
    cos = np.clip(cos.astype(np.float64), -1, 1)
    cy = cos[np.arange(len(labels)), labels]
    theta = np.arccos(cy)
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    psi = (-1.0) ** k * np.cos(m * theta) - 2 * k
    return _np_replace(cos, labels, (lamb * cy + psi) / (1 + lamb), s)


def ref_curricular(cos, labels, s=64.0, m=0.5, t=0.3):
    cos = np.clip(cos.astype(np.float64), -1, 1).copy()
    cy = cos[np.arange(len(labels)), labels].copy()
    cym = cy * np.cos(m) - np.sqrt(1 - cy**2) * np.sin(m)
    final = np.where(cy > np.cos(np.pi - m), cym, cy - np.sin(np.pi - m) * m)
    mask = cos > cym[:, None]
    cos[mask] = cos[mask] * (t + cos[mask])
    return _np_replace(cos, labels, final, s)


def ref_adaface(cos, labels, norms, s=64.0, m=0.4, h=0.333, mean=20.0, std=100.0, eps=1e-3):
    cos = np.clip(cos.astype(np.float64), -1 + eps, 1 - eps)
    z = np.clip((np.clip(norms, 0.001, 100) - mean) / (std + eps) * h, -1, 1)
    theta = np.arccos(cos[np.arange(len(labels)), labels])
    theta_m = np.clip(theta - m * z, eps, np.pi - eps)
    return _np_replace(cos, labels, np.cos(theta_m) - (m + m * z), s)


def ref_ce(logits, labels):
    logits = logits.astype(np.float64)
    mx = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
    return lse - logits[np.arange(len(labels)), labels]


# ---------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,ref",
    [
        ("x2_softmax", {}, lambda c, y: ref_x2(c, y)),
        ("x2_softmax", dict(scale=30.0, a=-0.5, h=0.2, k=0.8), lambda c, y: ref_x2(c, y, 30, -0.5, 0.2, 0.8)),
        ("x2_softmax", dict(gradient="exact"), lambda c, y: ref_x2(c, y)),
        ("arcface", {}, lambda c, y: ref_combined(c, y, m2=0.5)),
        ("cosface", {}, lambda c, y: ref_combined(c, y, m2=0.0, m3=0.35)),
        ("combined_margin", dict(m1=1.2, m2=0.3, m3=0.1), lambda c, y: ref_combined(c, y, 64, 1.2, 0.3, 0.1)),
        ("normface", dict(scale=10.0), lambda c, y: 10.0 * np.clip(c.astype(np.float64), -1, 1)),
        ("sphereface", {}, lambda c, y: ref_sphereface(c, y)),
        ("sphereface", dict(margin=3, lamb=5.0), lambda c, y: ref_sphereface(c, y, m=3, lamb=5.0)),
        ("curricularface", dict(t=0.3), lambda c, y: ref_curricular(c, y, t=0.3)),
    ],
)
def test_value_matches_numpy_float64(name, kwargs, ref):
    cos, labels = _cosines(0)
    got = L.get(name)(jnp.asarray(cos), jnp.asarray(labels), **kwargs)
    assert got.dtype == jnp.float32 and got.shape == (B, C)
    np.testing.assert_allclose(np.asarray(got), ref(cos, labels), rtol=2e-5, atol=2e-4)


def test_adaface_value_and_state_update():
    cos, labels = _cosines(1)
    norms = np.random.default_rng(1).uniform(5, 40, B).astype(np.float32)
    got = L.adaface(jnp.asarray(cos), jnp.asarray(labels), norms=jnp.asarray(norms), batch_mean=18.0, batch_std=6.0)
    np.testing.assert_allclose(np.asarray(got), ref_adaface(cos, labels, norms, mean=18.0, std=6.0), rtol=2e-5, atol=2e-4)
    mean, std = L.adaface_update(jnp.float32(18.0), jnp.float32(6.0), jnp.asarray(norms))
    np.testing.assert_allclose(float(mean), 0.01 * norms.mean() + 0.99 * 18.0, rtol=1e-6)
    np.testing.assert_allclose(float(std), 0.01 * norms.std(ddof=1) + 0.99 * 6.0, rtol=1e-5)


def test_curricularface_state_update():
    cos, labels = _cosines(2)
    cy = cos[np.arange(B), labels].astype(np.float64)
    t = L.curricularface_update(jnp.float32(0.2), jnp.asarray(cy, jnp.float32))
    np.testing.assert_allclose(float(t), 0.01 * cy.mean() + 0.99 * 0.2, rtol=1e-6)
    state = L.update_state(
        "curricularface", L.initial_state("curricularface"), target_cosine=jnp.asarray(cy, jnp.float32), norms=None
    )
    np.testing.assert_allclose(float(state["t"]), 0.01 * cy.mean(), rtol=1e-6)
    assert L.initial_state("x2_softmax") == {}


def test_elasticface_margin_is_gaussian_per_sample():
    cos = jnp.full((4000, 2), 0.5, jnp.float32)
    labels = jnp.zeros((4000,), jnp.int32)
    out = L.elasticface(cos, labels, rng=jax.random.key(0), scale=1.0, margin=0.5, sigma=0.05)
    m = np.arccos(np.asarray(out[:, 0], np.float64)) - np.arccos(0.5)
    assert abs(m.mean() - 0.5) < 0.005 and abs(m.std() - 0.05) < 0.005
    np.testing.assert_array_equal(np.asarray(out[:, 1]), 0.5)


def test_x2_official_constants_closed_form():
    theta = np.array([0.0, np.pi / 2, np.pi])
    f = geometry.target_logit("x2_softmax", theta)
    np.testing.assert_allclose(f, [0.65, 0.65 - 0.9 * (np.pi / 2) ** 2, 0.65 - 0.9 * np.pi**2], atol=2e-6)
    np.testing.assert_allclose(f[1:], [-1.571, -8.233], atol=1e-3)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def _mean_ce_of_logits(fn, **kw):
    def loss(cos, labels):
        return jnp.mean(L.cross_entropy(fn(cos, labels, **kw), labels))

    return loss


def test_straight_through_gradient_is_scaled_cosine_gradient_at_x2_probabilities():
    cos, labels = _cosines(3)
    g = jax.grad(_mean_ce_of_logits(L.x2_softmax))(jnp.asarray(cos), jnp.asarray(labels))
    logits = ref_x2(cos, labels)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(C)[labels]
    np.testing.assert_allclose(np.asarray(g), 64.0 * (p - onehot) / B, rtol=1e-4, atol=1e-6)


def test_x2_exact_gradient_matches_finite_differences_and_closed_form():
    a, h, k = -0.9, 0.0, 0.65
    cy = np.linspace(-0.995, 0.995, 41)
    f = lambda c: a * (np.arccos(c) - h) ** 2 + k  # noqa: E731
    eps = 1e-6
    fd = (f(cy + eps) - f(cy - eps)) / (2 * eps)
    target = lambda c: L.x2_softmax(  # noqa: E731
        c[:, None], jnp.zeros(c.shape, jnp.int32), scale=1.0, gradient="exact"
    )[:, 0].sum()
    g = np.asarray(jax.grad(target)(jnp.asarray(cy, jnp.float32)))
    np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-3)
    # closed form 2a(theta - h) * (-1/sin theta) at interior points, and the limit -2a at theta = 0
    theta = np.arccos(cy)
    np.testing.assert_allclose(g, 2 * a * (theta - h) * (-1 / np.sin(theta)), rtol=2e-3)
    g1 = jax.grad(target)(jnp.ones((1,), jnp.float32))
    np.testing.assert_allclose(np.asarray(g1), [-2 * a], rtol=1e-5)


def test_x2_exact_gradient_with_offset_h_is_finite_at_both_ends():
    labels = jnp.zeros((2,), jnp.int32)
    target = lambda c: L.x2_softmax(c[:, None], labels, scale=64.0, h=0.3, gradient="exact")[:, 0].sum()  # noqa: E731
    g = np.asarray(jax.grad(target)(jnp.array([1.0, -1.0], jnp.float32)))
    assert np.all(np.isfinite(g))
    # -2a theta/sin(theta) + 2a h/sin(theta), sin floored at SIN_FLOOR; theta/sin -> 1 at 0
    a, h, fl = -0.9, 0.3, L.SIN_FLOOR
    expected = 64 * np.array([-2 * a + 2 * a * h / fl, -2 * a * np.pi / fl + 2 * a * h / fl])
    np.testing.assert_allclose(g, expected, rtol=1e-4)


def test_cosface_true_gradient_and_arcface_straight_through():
    cos, labels = _cosines(4)
    onehot = np.eye(C)[labels]
    for name, ref in [("cosface", lambda c, y: ref_combined(c, y, m2=0, m3=0.35)), ("arcface", lambda c, y: ref_combined(c, y))]:
        g = jax.grad(_mean_ce_of_logits(L.get(name)))(jnp.asarray(cos), jnp.asarray(labels))
        logits = ref(cos, labels)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(np.asarray(g), 64.0 * (p - onehot) / B, rtol=1e-4, atol=1e-6)


torch_only = pytest.mark.torch


@torch_only
@pytest.mark.parametrize("kind", ["arcface", "cosface", "x2_softmax"])
def test_equal_to_insightface_torch_code(kind):
    """insightface's CombinedMarginLoss (arcface (1, 0.5, 0), cosface (1, 0, 0.4)) and the
    official X2-Softmax no_grad replacement, in torch: values and gradients."""
    torch = pytest.importorskip("torch")
    cos, labels = _cosines(5, ends=False)
    s = 64.0

    def insightface(logits, labels):
        index = torch.where(labels != -1)[0]
        target_logit = logits[index, labels[index].view(-1)]
        if kind == "arcface":
            with torch.no_grad():
                target_logit.arccos_()
                logits.arccos_()
                final = target_logit + 0.5
                logits[index, labels[index].view(-1)] = final
                logits.cos_()
            return logits * s
        if kind == "cosface":
            final = target_logit - 0.4
            logits[index, labels[index].view(-1)] = final
            return logits * s
        with torch.no_grad():  # official X2-Softmax
            theta = torch.arccos(target_logit)
            logits[index, labels[index].view(-1)] = -0.9 * (theta - 0.0) ** 2 + 0.65
        return logits * s

    tc = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
    tl = torch.tensor(labels, dtype=torch.long)
    out = insightface(tc.clone(), tl)
    loss = torch.nn.functional.cross_entropy(out, tl)
    loss.backward()

    fn = {"arcface": L.arcface, "cosface": lambda c, y: L.cosface(c, y, margin=0.4), "x2_softmax": L.x2_softmax}[kind]
    got = fn(jnp.asarray(cos), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(got), out.detach().numpy(), rtol=2e-5, atol=2e-4)
    g = jax.grad(_mean_ce_of_logits(fn))(jnp.asarray(cos), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(g), tc.grad.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# robustness: no NaN / Inf anywhere in [-1, 1], any dtype; jit / grad / vmap
# ---------------------------------------------------------------------------

_EXTRA = {
    "adaface": lambda: {"norms": jnp.linspace(0.0, 50.0, B)},
    "elasticface": lambda: {"rng": jax.random.key(1)},
}


def _kwargs(name):
    return _EXTRA.get(name, dict)()


@settings(max_examples=20, deadline=None)
@given(
    values=st.lists(
        st.one_of(st.sampled_from([-1.0, 1.0, 0.0, 1 - 1e-7, -1 + 1e-7]), st.floats(-1.0, 1.0)),
        min_size=B * C,
        max_size=B * C,
    ),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    scale=st.floats(1.0, 64.0),
    seed=st.integers(0, 2**16),
)
def test_no_nan_or_inf_anywhere_in_range(values, dtype, scale, seed):
    cos = jnp.asarray(np.array(values, np.float32).reshape(B, C), dtype)
    labels = jnp.asarray(np.random.default_rng(seed).integers(0, C, B), jnp.int32)
    for name in L.NAMES:
        for gradient in (["straight_through", "exact"] if name == "x2_softmax" else [None]):
            kw = _kwargs(name) | ({"gradient": gradient} if gradient else {})
            value, g = _value_and_grad(name, cos, labels, scale, tuple(sorted(kw.items(), key=lambda x: x[0])))
            assert value.dtype == jnp.float32
            assert np.all(np.isfinite(np.asarray(value))), (name, gradient)
            assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, gradient)


def _value_and_grad(name, cos, labels, scale, kw_items):
    """jit(value_and_grad) of the mean CE w.r.t. the cosine; returns (logits, grad)."""
    kw = dict(kw_items)
    static = {k: v for k, v in kw.items() if isinstance(v, str)}
    traced = {k: v for k, v in kw.items() if not isinstance(v, str)}
    return _jit_vg(L.get(name), static)(cos, labels, scale, traced)


_JIT_CACHE = {}


def _jit_vg(fn, static):
    key = (fn, tuple(sorted(static.items())))
    if key not in _JIT_CACHE:

        @jax.jit
        def vg(c, y, s, traced):
            def loss(cc):
                logits = fn(cc, y, scale=s, **traced, **static)
                return jnp.mean(L.cross_entropy(logits, y)), logits

            (_, logits), g = jax.value_and_grad(loss, has_aux=True)(c)
            return logits, g

        _JIT_CACHE[key] = vg
    return _JIT_CACHE[key]


def test_vmap_equals_loop_and_jit_equals_eager():
    cos = np.stack([_cosines(s)[0] for s in range(3)])
    labels = np.stack([_cosines(s)[1] for s in range(3)])
    for name in ["x2_softmax", "arcface", "cosface", "sphereface", "curricularface"]:
        fn = L.get(name)
        batched = jax.vmap(lambda c, y: fn(c, y))(jnp.asarray(cos), jnp.asarray(labels))
        jitted = jax.jit(fn)
        for i in range(3):
            eager = fn(jnp.asarray(cos[i]), jnp.asarray(labels[i]))
            np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(eager), rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(np.asarray(jitted(cos[i], labels[i])), np.asarray(eager), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", L.NAMES)
@pytest.mark.parametrize("bad", [-1, C])
def test_out_of_range_labels_raise_outside_jit(name, bad):
    cos, labels = _cosines(6)
    labels[2] = bad
    with pytest.raises(ValueError, match=rf"out of range \[0, {C}\).*labels\[2\]={bad}"):
        L.get(name)(jnp.asarray(cos), jnp.asarray(labels), **_kwargs(name))


def test_out_of_range_labels_inside_jit_are_counted_and_checkified_never_clipped():
    cos, labels = _cosines(7)
    labels[1] = C + 3
    labels_j = jnp.asarray(labels)
    assert int(jax.jit(L.count_out_of_range, static_argnums=1)(labels_j, C)) == 1

    def checked(cos, labels):
        L.checkify_labels(labels, cos.shape[1])
        return L.x2_softmax(cos, labels)

    err, _ = jax.jit(checkify.checkify(checked))(jnp.asarray(cos), labels_j)
    with pytest.raises(checkify.JaxRuntimeError, match="out of range"):
        err.throw()
    # traced out-of-range row: no margin and zero loss, not a clipped gather of column C-1
    logits = jax.jit(L.x2_softmax)(jnp.asarray(cos), labels_j)
    np.testing.assert_allclose(np.asarray(logits[1]), 64.0 * cos[1], rtol=1e-6)
    ce = jax.jit(L.cross_entropy)(logits, labels_j)
    assert float(ce[1]) == 0.0


def test_margin_loss_rejects_bad_labels_and_shapes():
    emb = jnp.ones((4, 8))
    w = jnp.ones((10, 8))
    with pytest.raises(ValueError, match=r"labels\[3\]=10"):
        L.margin_loss(emb, w, jnp.array([0, 1, 2, 10]), "x2_softmax")
    with pytest.raises(AssertionError):
        L.margin_loss(emb, w, jnp.array([0, 1, 2]), "x2_softmax")  # batch mismatch
    with pytest.raises(AssertionError):
        L.margin_loss(emb, w, jnp.array([0.0, 1.0, 2.0, 3.0]), "x2_softmax")  # float labels
    with pytest.raises(ValueError, match="embedding dim 8 does not match"):
        L.margin_loss(emb, jnp.ones((10, 4)), jnp.array([0, 1, 2, 3]), "x2_softmax")
    with pytest.raises(AssertionError):
        L.x2_softmax(jnp.ones((4,)), jnp.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="unknown loss 'x3'"):
        L.get("x3")
    with pytest.raises(ValueError, match="gradient must be"):
        L.x2_softmax(jnp.ones((2, 3)) * 0.1, jnp.array([0, 1]), gradient="bogus")


# ---------------------------------------------------------------------------
# margin_loss: the full head
# ---------------------------------------------------------------------------


def test_margin_loss_matches_numpy_reference_in_float32_for_low_precision_inputs():
    rng = np.random.default_rng(8)
    emb = rng.normal(size=(B, 16))
    w = rng.normal(size=(C, 16)) * 0.01
    labels = rng.integers(0, C, B).astype(np.int32)
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    ref = ref_ce(ref_x2(cos, labels), labels).mean()
    got = L.margin_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(labels), L.x2_softmax)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    for dtype in (jnp.bfloat16, jnp.float16):
        low = L.margin_loss(jnp.asarray(emb, dtype), jnp.asarray(w, dtype), jnp.asarray(labels), "x2_softmax")
        assert low.dtype == jnp.float32
        np.testing.assert_allclose(float(low), ref, rtol=3e-2)


def test_margin_loss_zero_embedding_has_finite_gradient_and_adaface_gets_norms():
    emb = jnp.zeros((3, 4)).at[1].set(jnp.array([1.0, 2.0, 0.0, 0.0]))
    w = jnp.eye(5, 4)
    labels = jnp.array([0, 1, 2])
    for name in ["x2_softmax", "arcface", "adaface"]:
        ge, gw = jax.grad(L.margin_loss, argnums=(0, 1))(emb, w, labels, name)
        assert np.all(np.isfinite(np.asarray(ge))) and np.all(np.isfinite(np.asarray(gw))), name
    norms = jnp.array([1.0, 5.0, 30.0])
    direct = L.margin_loss(emb, w, labels, "adaface", norms=norms)
    auto = L.margin_loss(emb * 0 + emb, w, labels, "adaface")
    assert float(direct) != float(auto)  # the norms argument is used, and computed when absent
    ref_norms = jnp.linalg.norm(emb, axis=1)
    np.testing.assert_allclose(float(auto), float(L.margin_loss(emb, w, labels, "adaface", norms=ref_norms)), rtol=1e-6)


def test_import_loss_without_flax():
    code = "import sys; from x2jax.losses import x2_softmax; assert 'flax' not in sys.modules, 'flax imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------
# geometry (docs/losses.md)
# ---------------------------------------------------------------------------


def test_adaptive_margin_geometry_matches_the_paper():
    deg = math.degrees
    phi0 = math.acos(0.65)  # below this X2-Softmax has no decision boundary
    assert math.isnan(geometry.angular_gap("x2_softmax", phi0 - 0.01))
    assert not math.isnan(geometry.angular_gap("x2_softmax", phi0 + 0.01))
    assert abs(deg(phi0) - 49.5) < 0.1
    assert abs(deg(geometry.angular_gap("x2_softmax", math.pi / 2)) - 36) < 1.0
    assert abs(deg(geometry.angular_gap("x2_softmax", math.pi)) - 53) < 1.0
    for phi in (0.8, 1.5, 2.5):
        assert abs(deg(geometry.angular_gap("arcface", phi)) - 28.6) < 0.1
    cosface = [deg(geometry.angular_gap("cosface", p)) for p in (math.radians(60), math.pi)]
    assert 38 < cosface[0] < 44 and 18 < cosface[1] < 22
