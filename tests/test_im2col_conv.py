"""x2jax.models.im2col_conv: values and gradients equal XLA's conv and a float64 reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from x2jax.models import im2col_conv, layers, registry

DN = ("NHWC", "HWIO", "NHWC")

# (batch, H, W, C, O, kernel, stride, padding)
CASES = [
    (2, 8, 8, 16, 32, 1, 2, ((0, 0), (0, 0))),    # IResNet downsample
    (2, 9, 9, 5, 7, 1, 2, ((0, 0), (0, 0))),      # odd size: last row/col dropped
    (2, 8, 8, 16, 16, 3, 1, ((1, 1), (1, 1))),    # IBasicBlock conv1
    (2, 8, 8, 8, 24, 3, 1, ((1, 1), (1, 1))),     # channel-changing conv1
    (2, 10, 10, 16, 16, 3, 2, ((1, 1), (1, 1))),  # IBasicBlock conv2 (stride)
    (2, 9, 7, 3, 8, 3, 2, ((1, 1), (1, 1))),      # stem-like C=3, odd non-square
    (2, 8, 8, 4, 6, 3, 2, ((0, 1), (1, 0))),      # asymmetric explicit padding
    (1, 6, 6, 4, 4, 1, 1, ((1, 1), (1, 1))),      # padded 1x1
    (2, 11, 11, 4, 6, 3, 3, ((1, 1), (1, 1))),    # stride 3: phases with 1 tap each
    (2, 10, 9, 4, 6, 2, 2, ((0, 0), (0, 1))),     # 2x2 kernel, stride 2
]


def _inputs(case, dtype=jnp.float32, seed=0):
    b, h, w, c, o, k, s, pad = case
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, h, w, c), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kw, (k, k, c, o), jnp.float32) / np.sqrt(k * k * c)).astype(dtype)
    ho = (h + sum(pad[0]) - k) // s + 1
    wo = (w + sum(pad[1]) - k) // s + 1
    g = jax.random.normal(kg, (b, ho, wo, o), jnp.float32).astype(dtype)
    return x, kernel, g


def _numpy_reference(x, kernel, g, stride, pad):
    """Float64 direct sums: y, dL/dx, dL/dW for L = sum(y * g)."""
    x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    ho, wo = g.shape[1:3]
    y = np.zeros(g.shape)
    dxp = np.zeros(xp.shape)
    dw = np.zeros(kernel.shape)
    for u in range(kh):
        for v in range(kw):
            win = xp[:, u:u + (ho - 1) * stride + 1:stride, v:v + (wo - 1) * stride + 1:stride, :]
            y += win @ kernel[u, v]
            dw[u, v] = np.einsum("bijc,bijo->co", win, g)
            dxp[:, u:u + (ho - 1) * stride + 1:stride, v:v + (wo - 1) * stride + 1:stride, :] += \
                g @ kernel[u, v].T
    h, w = x.shape[1:3]
    return y, dxp[:, pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + w, :], dw


def _value_and_grads(fn, x, kernel, g):
    y, vjp = jax.vjp(fn, x, kernel)
    dx, dw = vjp(g)
    return y, dx, dw


def _ours_and_lax(x, kernel, g, stride, pad):
    """(y, dx, dW) of conv2d_im2col (matmul weight gradient, per-phase input gradient)
    and of lax, in one jit."""
    @jax.jit
    def both(a, k, ct):
        ours = _value_and_grads(lambda a, k: im2col_conv.conv2d_im2col(
            a, k, strides=(stride, stride), padding=pad, weight_grad="matmul",
            input_grad="phases"), a, k, ct)
        ref = _value_and_grads(lambda a, k: lax.conv_general_dilated(
            a, k, (stride, stride), pad, dimension_numbers=DN), a, k, ct)
        return ours, ref
    return both(x, kernel, g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[3]}o{c[4]}p{c[7]}")
def test_float32_equals_lax_and_float64(case):
    x, kernel, g = _inputs(case, jnp.float32)
    stride, pad = case[6], case[7]
    ours, ref = _ours_and_lax(x, kernel, g, stride, pad)
    exact = _numpy_reference(x, kernel, g, stride, pad)
    for name, a, b, e in zip(("y", "dx", "dW"), ours, ref, exact):
        assert a.shape == b.shape == e.shape and a.dtype == jnp.float32, name
        scale = np.abs(e).max()
        # float32 sums of <= 9*32*2*10*10 terms: both within a few ulps of the float64 value
        np.testing.assert_allclose(a, e, rtol=0, atol=2e-6 * scale, err_msg=f"{name} vs float64")
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=f"{name} vs lax")


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[5]],
                         ids=lambda c: f"k{c[5]}s{c[6]}c{c[3]}o{c[4]}")
def test_bfloat16_within_one_rounding_of_exact(case):
    x, kernel, g = _inputs(case, jnp.bfloat16, seed=1)
    stride, pad = case[6], case[7]
    ours, ref = _ours_and_lax(x, kernel, g, stride, pad)
    exact = _numpy_reference(x, kernel, g, stride, pad)  # of the bf16-valued inputs
    for name, a, b, e in zip(("y", "dx", "dW"), ours, ref, exact):
        assert a.dtype == b.dtype == jnp.bfloat16, name
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # float32 accumulation then one rounding to bf16: error <= 2^-8 relative (+ tiny sum error)
        tol = 2.0 ** -8 * np.abs(e) + 1e-5 * np.abs(e).max()
        assert np.all(np.abs(a64 - e) <= tol), (name, np.abs(a64 - e).max())
        assert np.all(np.abs(a64 - b64) <= 2 * tol), (name, np.abs(a64 - b64).max())


def test_weight_grad_policy():
    m = im2col_conv.weight_grad_method
    assert m((32, 56, 56, 64), (1, 1, 64, 128), (2, 2)) == "matmul"  # 1x1 shortcut
    assert m((32, 14, 14, 256), (1, 1, 256, 512), (2, 2)) == "matmul"
    assert m((32, 56, 56, 64), (3, 3, 64, 128), (1, 1)) == "xla"
    assert m((32, 112, 112, 64), (3, 3, 64, 64), (2, 2)) == "xla"
    assert m((32, 112, 112, 3), (3, 3, 3, 64), (1, 1)) == "xla"  # stem
    assert m((32, 56, 56, 64), (3, 3, 64, 64), (1, 1)) == "xla"
    assert m((32, 28, 28, 128), (3, 3, 128, 256), (1, 1)) == "xla"
    assert m((32, 56, 56, 128), (3, 3, 128, 128), (2, 2)) == "xla"
    assert m((32, 14, 14, 256), (3, 3, 256, 256), (1, 1)) == "xla"


def test_input_grad_policy():
    m = im2col_conv.input_grad_method
    assert m((32, 112, 112, 64), (3, 3, 64, 64), (2, 2)) == "phases"
    assert m((32, 28, 28, 256), (3, 3, 256, 256), (2, 2)) == "phases"
    assert m((32, 14, 14, 512), (3, 3, 512, 512), (2, 2)) == "xla"  # measured slower there
    assert m((32, 112, 112, 64), (3, 3, 64, 64), (1, 1)) == "xla"  # stride 1: nothing dilated
    assert m((32, 56, 56, 64), (1, 1, 64, 128), (2, 2)) == "xla"  # 1x1: its own matmul form


def test_auto_input_gradient_of_a_large_strided_conv_equals_lax():
    """The "auto" path as the backbone takes it (phases at >= 28 px), float32 vs lax."""
    case = (2, 30, 30, 8, 8, 3, 2, ((1, 1), (1, 1)))
    x, kernel, g = _inputs(case, jnp.float32, seed=3)
    f = lambda a, k: im2col_conv.conv2d_im2col(a, k, strides=(2, 2), padding=case[7])
    r = lambda a, k: lax.conv_general_dilated(a, k, (2, 2), case[7], dimension_numbers=DN)
    ours, ref = jax.jit(lambda a, k, ct: (_value_and_grads(f, a, k, ct),
                                          _value_and_grads(r, a, k, ct)))(x, kernel, g)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: f(a, kernel).sum()))(x))
    assert "lhs_dilation=(2, 2)" not in jaxpr and "lhs_dilation=(1, 1)" in jaxpr
    for name, a, b in zip(("y", "dx", "dW"), ours, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * np.abs(b).max(), err_msg=name)


def test_grouped_conv_falls_back_to_xla():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 6))
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 1, 6))
    pad = ((1, 1), (1, 1))
    f = lambda a, k: im2col_conv.conv2d_im2col(a, k, strides=(2, 2), padding=pad, groups=6)
    r = lambda a, k: lax.conv_general_dilated(a, k, (2, 2), pad, dimension_numbers=DN,
                                              feature_group_count=6)
    g = jnp.ones((2, 4, 4, 6))
    both = jax.jit(lambda a, k, ct: (_value_and_grads(f, a, k, ct), _value_and_grads(r, a, k, ct)))
    ours, ref = both(x, kernel, g)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_raise():
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        im2col_conv.conv2d_im2col(x, k, strides=(1, 1), padding=((-1, 0), (0, 0)))
    with pytest.raises(ValueError, match="weight_grad"):
        im2col_conv.conv2d_im2col(x, k, strides=(1, 1), padding=((1, 1), (1, 1)), weight_grad="fft")
    with pytest.raises(ValueError, match="input_grad"):
        im2col_conv.conv2d_im2col(x, k, strides=(1, 1), padding=((1, 1), (1, 1)), input_grad="fft")
    with pytest.raises(ValueError, match="kernel"):
        im2col_conv.conv2d_im2col(x, jnp.ones((3, 3, 3, 2)), strides=(1, 1),
                                padding=((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="unknown conv impl"):
        layers.conv2d(x, k, impl="im2colx")


def test_auto_uses_matmul_gradients_on_cpu_only():
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2))
    grad = jax.grad(lambda k: layers.conv2d(x, k, strides=2, impl="auto").sum())
    assert jax.default_backend() == "cpu"
    # the 1x1 weight gradient is one dot_general under "auto"; XLA's is a conv
    assert "dot_general" in str(jax.make_jaxpr(grad)(k))
    assert "dot_general" not in str(jax.make_jaxpr(
        jax.grad(lambda k: layers.conv2d(x, k, strides=2, impl="xla").sum()))(k))


@pytest.mark.slow
def test_r18_tiny_train_step_equal_between_impls():
    """Whole backbone, train mode: embeddings, BN statistics and every parameter gradient."""
    images = jax.random.normal(jax.random.key(4), (4, 16, 16, 3))
    out = {}
    for impl in ("xla", "im2col"):
        module = registry.get_model("r18_tiny", embedding_size=32, image_size=16, conv_impl=impl)
        variables = registry.init_variables(module, jax.random.key(0))

        def loss_fn(params):
            emb, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    images, train=True, mutable=["batch_stats"])
            return jnp.sum(emb * jnp.arange(emb.shape[1])) / emb.size, (emb, upd)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
        out[impl] = (aux, grads)
    flat_x = jax.tree_util.tree_flatten_with_path(out["xla"])[0]
    flat_i = jax.tree.leaves(out["im2col"])
    assert len(flat_x) == len(flat_i) > 20
    grad_scale = max(np.abs(np.asarray(v)).max() for v in jax.tree.leaves(out["xla"][1]))
    for (path, a), b in zip(flat_x, flat_i):
        a, b = np.asarray(a), np.asarray(b)
        # relative to the leaf, with a floor for leaves that are zero up to rounding
        # (e.g. the bias of a BN that feeds another BN)
        atol = 1e-4 * np.abs(a).max() + 1e-7 * grad_scale
        np.testing.assert_allclose(b, a, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
    conv_grads = [v for p, v in jax.tree_util.tree_flatten_with_path(out["xla"][1])[0]
                  if "kernel" in jax.tree_util.keystr(p)]
    assert conv_grads and all(np.abs(np.asarray(v)).max() > 0 for v in conv_grads)
