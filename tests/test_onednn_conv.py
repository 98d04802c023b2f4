"""x2jax.models.onednn_conv: oneDNN custom calls equal a float64 reference and lax; the
"auto" choice, the fallbacks, the build and its errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Shapes (batch, H, W, C, O, kernel, stride, padding), inputs and the float64 reference
# are those of the im2col_conv tests.
from test_im2col_conv import CASES, _inputs, _numpy_reference

from x2jax.models import layers, onednn_conv, registry

ROOT = Path(__file__).resolve().parent.parent
DN = ("NHWC", "HWIO", "NHWC")
FORWARD, INPUT_GRAD, WEIGHT_GRAD = (onednn_conv.TARGETS[k]
                                    for k in ("forward", "input_grad", "weight_grad"))



# Skipped only where the extra is not installed; with it, a failing build fails the tests.
pytestmark = pytest.mark.skipif(not onednn_conv._installed(),
                                reason="oneDNN not installed (pip install -e '.[onednn]')")

def _value_and_grads(fn, x, kernel, g):
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(g))


def _onednn(stride, pad):
    return lambda a, k: onednn_conv.conv2d_onednn(a, k, strides=(stride, stride), padding=pad)


def _lax(stride, pad):
    return lambda a, k: lax.conv_general_dilated(a, k, (stride, stride), pad, dimension_numbers=DN)


def _both(stride, pad):
    """jit of (y, dx, dW) of conv2d_onednn and of lax for the cotangent g."""
    return jax.jit(lambda a, k, ct: (_value_and_grads(_onednn(stride, pad), a, k, ct),
                                     _value_and_grads(_lax(stride, pad), a, k, ct)))


def _assert_close(ours, ref, exact=None, rel=2e-6):
    for name, a, b, e in zip(("y", "dx", "dW"), ours, ref, exact or ref):
        assert a.shape == b.shape == e.shape and a.dtype == jnp.float32, name
        scale = np.abs(np.asarray(e, np.float64)).max()
        np.testing.assert_allclose(a, e, rtol=0, atol=rel * scale, err_msg=f"{name} vs float64")
        np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale, err_msg=f"{name} vs lax")


def _run_fresh(code: str, *args: str) -> dict:
    """Runs ``code`` in a new 1-device Python process; returns the JSON of its last line."""
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=180, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- values and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[5]}s{c[6]}c{c[3]}o{c[4]}p{c[7]}")
def test_values_and_gradients_equal_float64_and_lax(case):
    x, kernel, g = _inputs(case)
    stride, pad = case[6], case[7]
    both = _both(stride, pad)
    hlo = both.lower(x, kernel, g).as_text()
    assert all(t in hlo for t in (FORWARD, INPUT_GRAD, WEIGHT_GRAD))  # oneDNN, not a fallback
    ours, ref = both(x, kernel, g)
    _assert_close(ours, ref, _numpy_reference(x, kernel, g, stride, pad))


def test_vmap_and_empty_batch_equal_lax():
    case = (2, 10, 10, 16, 16, 3, 2, ((1, 1), (1, 1)))  # IBasicBlock conv2 (stride)
    x, kernel, g = _inputs(case, seed=5)
    stride, pad = case[6], case[7]
    xs = jnp.stack([x, -2 * x, x[:, ::-1]])  # a leading vmapped axis of 3
    ours = jax.jit(jax.vmap(_onednn(stride, pad), in_axes=(0, None)))(xs, kernel)
    ref = jax.vmap(_lax(stride, pad), in_axes=(0, None))(xs, kernel)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    # batch 0 is a valid conv: empty output, zero weight gradient
    x0, g0 = x[:0], g[:0]
    ours0, ref0 = _both(stride, pad)(x0, kernel, g0)
    for a, b in zip(ours0, ref0):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert ours0[0].shape == (0, 5, 5, 16) and not np.any(ours0[2])


def test_repeated_calls_are_bitwise_equal():
    """oneDNN's primitives (cached per shape) give the same bits on every call, as the
    bitwise-resume guarantee of train.py needs (docs/design.md, determinism)."""
    case = (4, 16, 16, 32, 32, 3, 1, ((1, 1), (1, 1)))
    x, kernel, g = _inputs(case, seed=7)
    both = _both(case[6], case[7])
    first = [np.asarray(a) for a in both(x, kernel, g)[0]]
    for _ in range(3):
        again = both(x, kernel, g)[0]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_layers_conv2d_onednn_and_its_fallbacks_equal_xla():
    case = (2, 9, 9, 8, 12, 3, 2, ((1, 1), (1, 1)))
    x, kernel, g = _inputs(case, seed=7)
    conv = lambda impl, **kw: lambda a, k: layers.conv2d(a, k, strides=2, padding=1, impl=impl,
                                                          **kw)
    f = jax.jit(lambda a, k, ct: _value_and_grads(conv("onednn"), a, k, ct))
    assert FORWARD in f.lower(x, kernel, g).as_text()
    _assert_close(f(x, kernel, g), _value_and_grads(conv("xla"), x, kernel, g),
                  _numpy_reference(x, kernel, g, 2, case[7]))

    # groups=2: not a oneDNN conv, goes to im2col; equals XLA's grouped conv and per-group sums
    kg = kernel[:, :, :4, :]
    fg = jax.jit(conv("onednn", groups=2))
    assert "x2jax_onednn" not in fg.lower(x, kg).as_text()
    exact_g = np.concatenate([_numpy_reference(x[..., 4 * i:4 * i + 4], kg[..., 6 * i:6 * i + 6],
                                               g[..., 6 * i:6 * i + 6], 2, case[7])[0]
                              for i in range(2)], axis=-1)
    ref_g = conv("xla", groups=2)(x, kg)
    for y in (fg(x, kg), ref_g):
        np.testing.assert_allclose(y, exact_g, rtol=0, atol=2e-6 * np.abs(exact_g).max())

    # bfloat16: falls back too; a float32 sum rounded once to bf16, as XLA's
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    fb = jax.jit(conv("onednn"))
    assert "x2jax_onednn" not in fb.lower(xb, kernel).as_text()
    yb, ref_b = fb(xb, kernel), conv("xla")(xb, kernel)
    assert yb.dtype == ref_b.dtype == jnp.bfloat16
    exact_b = _numpy_reference(xb, kb, g, 2, case[7])[0]  # of the bf16-valued inputs
    tol = 2.0 ** -8 * np.abs(exact_b) + 1e-5 * np.abs(exact_b).max()
    for y in (yb, ref_b):
        assert np.all(np.abs(np.asarray(y, np.float64) - exact_b) <= tol)


def test_r18_tiny_train_step_equals_xla():
    """Whole backbone in train mode: loss, BN statistics and every parameter gradient."""
    images = jax.random.normal(jax.random.key(4), (4, 16, 16, 3))
    out = {}
    for impl in ("xla", "onednn"):
        module = registry.get_model("r18_tiny", embedding_size=16, image_size=16, conv_impl=impl)
        variables = registry.init_variables(module.clone(conv_impl="xla"), jax.random.key(0))

        def loss_fn(params, module=module, variables=variables):
            emb, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    images, train=True, mutable=["batch_stats"])
            return jnp.mean(emb ** 2), upd["batch_stats"]

        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        if impl == "onednn":
            hlo = step.lower(variables["params"]).as_text()
            assert all(t in hlo for t in (FORWARD, INPUT_GRAD, WEIGHT_GRAD))
        (loss, stats), grads = step(variables["params"])
        out[impl] = {"loss": loss, "stats": stats, "grads": grads}
    np.testing.assert_allclose(out["onednn"]["loss"], out["xla"]["loss"], rtol=1e-5)
    # Per leaf: 3e-3 of its largest entry plus a floor, 1e-4 of the group's largest entry.
    # In this tiny train-mode net BN amplifies float32 rounding: with the convs replaced by
    # float64 ones as the reference, XLA's own convs are 1.4e-3 off on the small BN and
    # PReLU gradients (oneDNN 1.7e-3) and 1.8e-5 of the largest gradient off on those that
    # are zero up to rounding (a BN bias behind another BN; oneDNN 3.5e-5). A wrong
    # gradient is off by O(1); the per-conv tests above hold oneDNN to 2e-6.
    for group in ("grads", "stats"):
        scale = max(np.abs(np.asarray(v)).max() for v in jax.tree.leaves(out["xla"][group]))
        flat_x = jax.tree_util.tree_flatten_with_path(out["xla"][group])[0]
        flat_o = jax.tree.leaves(out["onednn"][group])
        assert len(flat_x) == len(flat_o) > 20
        for (path, a), b in zip(flat_x, flat_o):
            a, b = np.asarray(a), np.asarray(b)
            atol = 3e-3 * np.abs(a).max() + 1e-4 * scale
            np.testing.assert_allclose(b, a, rtol=0, atol=atol,
                                       err_msg=group + jax.tree_util.keystr(path))
    conv_grads = [v for p, v in jax.tree_util.tree_flatten_with_path(out["xla"]["grads"])[0]
                  if "kernel" in jax.tree_util.keystr(p)]
    assert len(conv_grads) > 15 and all(np.abs(np.asarray(v)).max() > 0 for v in conv_grads)


def test_batch_sharded_input_on_a_mesh_is_correct():
    """No sharding rule: XLA gathers the operands; values and gradients still right."""
    assert jax.device_count() == 8
    case = (8, 8, 8, 4, 6, 3, 2, ((1, 1), (1, 1)))
    x, kernel, g = _inputs(case, seed=2)
    stride, pad = case[6], case[7]
    data = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    x, g = jax.device_put(x, data), jax.device_put(g, data)
    both = _both(stride, pad)
    assert WEIGHT_GRAD in both.lower(x, kernel, g).compile().as_text()
    ours, ref = both(x, kernel, g)
    _assert_close(ours, ref, _numpy_reference(x, kernel, g, stride, pad))


# --- "auto" -------------------------------------------------------------------------------

_AUTO_PROBE = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from x2jax.models import layers
x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
k = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
conv = lambda x, k: layers.conv2d(x, k, strides=2, padding=1, impl="auto")
ref = lambda x, k: lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
loss = lambda f: jax.jit(jax.value_and_grad(lambda x, k: (f(x, k) ** 2).sum(), argnums=(0, 1)))
hlo = loss(conv).lower(x, k).compile().as_text()
err = max(float(np.abs(a - b).max() / np.abs(b).max())
          for a, b in zip(jax.tree.leaves(loss(conv)(x, k)), jax.tree.leaves(loss(ref)(x, k))))
print(json.dumps({"devices": jax.device_count(), "err": err,
                  "targets": sorted(set(t for t in hlo.split('"') if t.startswith("x2jax_")))}))
"""


def test_auto_picks_onednn_in_a_one_device_process_only():
    fresh = _run_fresh(_AUTO_PROBE)
    assert fresh["devices"] == 1
    assert fresh["targets"] == sorted([FORWARD, INPUT_GRAD, WEIGHT_GRAD])
    assert fresh["err"] < 2e-6
    # here (8 devices): im2col, no custom call
    x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    f = jax.jit(lambda x, k: layers.conv2d(x, k, strides=2, padding=1, impl="auto"))
    assert jax.device_count() == 8 and "x2jax_onednn" not in f.lower(x, k).compile().as_text()


# --- errors and the build -----------------------------------------------------------------


def test_missing_onednn_names_the_extra(monkeypatch, tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(onednn_conv, "_prefixes", lambda: [tmp_path])
    with pytest.raises(RuntimeError, match=re.escape("pip install -e '.[onednn]'")):
        onednn_conv._find_onednn()
    # load() reports it, available() says False, and it stays cached
    monkeypatch.setattr(onednn_conv, "_state", {})
    assert onednn_conv.available() is False
    with pytest.raises(RuntimeError, match=re.escape(str(tmp_path))):
        onednn_conv.load()
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(RuntimeError, match="onednn"):
        onednn_conv.conv2d_onednn(x, k, strides=(1, 1), padding=((1, 1), (1, 1)))
    # the fallback needs no extension
    y = onednn_conv.conv2d_onednn(x, k[:, :, :1], strides=(1, 1), padding=((1, 1), (1, 1)),
                                  groups=2)
    ref = lax.conv_general_dilated(x, k[:, :, :1], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=DN, feature_group_count=2)
    np.testing.assert_allclose(y, ref, rtol=1e-6)


def test_installed_but_unbuildable_warns_once(monkeypatch, tmp_path):
    """oneDNN present, no compiler: available() is False and says why, once (auto then
    falls back to slower convolutions, which must not pass unnoticed)."""
    monkeypatch.setattr(onednn_conv, "_state", {})
    monkeypatch.setenv("X2JAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-x2jax")
    with pytest.warns(RuntimeWarning, match="no-such-compiler-x2jax"):
        assert onednn_conv.available() is False
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert onednn_conv.available() is False  # cached, no second warning


def test_build_failure_and_missing_compiler_raise(monkeypatch, tmp_path):
    onednn_conv.load()  # the real extension, loaded before the failing builds below
    bad = tmp_path / "bad.cc"
    bad.write_text("int broken( {\n")
    monkeypatch.setattr(onednn_conv, "SOURCE", bad)
    monkeypatch.setenv("X2JAX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"building .*bad\.cc failed(.|\n)*error"):
        onednn_conv._build()
    assert list((tmp_path / "cache" / "ext").iterdir()) == []  # no half-written .so left
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(RuntimeError, match="compiler .* not found"):
        onednn_conv._build()
    assert "lib" in onednn_conv._state  # the loaded extension was not disturbed


def test_bad_shapes_raise():
    x = jnp.ones((1, 2, 2, 3))
    with pytest.raises(ValueError, match="larger than the padded input"):
        onednn_conv.conv2d_onednn(x, jnp.ones((3, 3, 3, 4)), strides=(1, 1),
                                  padding=((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"kernel \(KH, KW, C, O\) expected"):
        onednn_conv.conv2d_onednn(x, jnp.ones((1, 1, 2, 4)), strides=(1, 1),
                                  padding=((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="two"):
        onednn_conv.conv2d_onednn(x, jnp.ones((1, 1, 3, 4)), strides=(1, 1),
                                  padding=((0, 0),))
    # padded enough, the same kernel is fine
    y = onednn_conv.conv2d_onednn(x, jnp.ones((3, 3, 3, 4)), strides=(1, 1),
                                  padding=((1, 0), (0, 1)))
    assert y.shape == (1, 1, 1, 4) and float(y[0, 0, 0, 0]) == 3 * 2 * 2


def test_build_is_cached_and_keyed_on_the_source(monkeypatch, tmp_path):
    first = onednn_conv._build()
    assert first == onednn_conv._build() and first.is_file()
    calls = []

    def fake_compiler(cmd, **kwargs):  # writes a stand-in for the .so
        calls.append(cmd)
        Path(cmd[-1]).write_bytes(b"so")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(onednn_conv.subprocess, "run", fake_compiler)
    assert onednn_conv._build() == first and calls == []  # cached: no compiler run
    edited = tmp_path / "onednn_conv.cc"
    edited.write_bytes(onednn_conv.SOURCE.read_bytes() + b"// edited\n")
    monkeypatch.setattr(onednn_conv, "SOURCE", edited)
    monkeypatch.setenv("X2JAX_CACHE_DIR", str(tmp_path / "cache"))
    other = onednn_conv._build()
    assert other != first and other.parent == tmp_path / "cache" / "ext"
    assert other.read_bytes() == b"so" and len(calls) == 1 and str(edited) in calls[0]
    assert onednn_conv._build() == other and len(calls) == 1


def test_version_is_the_installed_onednn():
    assert re.fullmatch(r"3\.2\.\d+ \(\d+\)", onednn_conv.version())
