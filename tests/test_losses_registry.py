"""The MarginSpec registry: declared fields against the functions, presets, and losses
registered by users (a target-only one and a stateful generic one) going through
``margin_loss``, the sharded head and config validation, against numpy float64."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import losses
from x2jax.losses import _registry
from x2jax.parallel import make_mesh, pad_num_classes, sharded_margin_loss
from x2jax.train import config as config_lib

B, C, D = 16, 61, 32
BUILTIN = ("adaface", "arcface", "combined_margin", "cosface", "curricularface", "elasticface",
           "normface", "softmax", "sphereface", "x2_softmax")


# ---------------------------------------------------------------------------
# The built-in specs
# ---------------------------------------------------------------------------


def test_builtin_names():
    assert losses.NAMES == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_declared_fields_agree_with_the_function(name):
    spec = losses.spec(name)
    assert losses.get(name) is spec.fn and losses.spec_of(spec.fn).fn is spec.fn
    fn_params = inspect.signature(spec.fn).parameters
    state = spec.init_state()
    assert set(state) <= set(fn_params)  # the step passes the state as keywords
    assert set(spec.params) == set(fn_params) - {"cosine", "labels", "rng", "norms"} - set(state)
    assert spec.needs_norms == ("norms" in fn_params) and spec.needs_rng == ("rng" in fn_params)
    assert spec.nontarget_depends_on_target == (name == "curricularface")
    assert (spec.target_margin is None) == (name == "curricularface")
    if spec.target_margin is not None:  # the fused path fills in the same defaults as a call
        margin_params = inspect.signature(spec.target_margin).parameters
        for key in set(fn_params) - {"cosine", "labels"}:
            assert margin_params[key].default == fn_params[key].default, key


def test_presets_are_the_official_constants():
    presets = {name: dict(losses.spec(name).preset) for name in BUILTIN}
    assert presets == {
        "x2_softmax": dict(scale=64.0, a=-0.9, h=0.0, k=0.65),
        "arcface": dict(scale=64.0, margin=0.5),
        "cosface": dict(scale=64.0, margin=0.35),
        "normface": dict(scale=64.0),
        **{n: {} for n in ("adaface", "combined_margin", "curricularface", "elasticface",
                           "softmax", "sphereface")},
    }
    cfg = config_lib.set_loss(config_lib.base_config(), "x2_softmax")
    assert cfg.loss.name == "x2_softmax" and cfg.loss.params.to_dict() == presets["x2_softmax"]
    with pytest.raises(ValueError, match="unknown loss 'x3'"):
        config_lib.set_loss(config_lib.base_config(), "x3")


def test_specs_are_validated_and_names_unique():
    with pytest.raises(ValueError, match="give fn, target_margin or both"):
        losses.MarginSpec("nothing")
    with pytest.raises(ValueError, match=r"preset \['m'\] not in params"):
        losses.MarginSpec("bad", fn=losses.normface, params=("scale",), preset=dict(m=1.0))
    with pytest.raises(ValueError, match="already registered"):
        losses.register(losses.spec("arcface"))
    plain = losses.spec_of(lambda c, y: c)  # outside the registry: generic path, nothing filled in
    assert plain.target_margin is None and not (plain.needs_norms or plain.needs_rng)


# ---------------------------------------------------------------------------
# User losses: one function + one register(MarginSpec(...))
# ---------------------------------------------------------------------------


def toy_margin(*, scale: float = 16.0, margin: float = 0.2) -> losses.TargetMargin:
    """Target ``cos_y - margin (1 - cos_y^2)``, true gradient."""
    return losses.TargetMargin(scale, lambda cos_y: cos_y - margin * (1.0 - cos_y**2))


def toy_ema(cosine, labels, *, scale: float = 16.0, margin: float = 0.1, t=0.0):
    """Target ``cos_y - margin (1 + t)``, ``t`` an EMA of ``cos_y`` (loss state)."""
    cosine = losses.clip_cosine(cosine.astype(jnp.float32))
    target = labels[:, None] == jnp.arange(cosine.shape[1])[None, :]
    return scale * jnp.where(target, cosine - margin * (1.0 + t), cosine)


def _toy_ema_update(state, *, target_cosine, norms):
    return {"t": 0.9 * state["t"] + 0.1 * jnp.mean(target_cosine)}


TOY_SPECS = (
    losses.MarginSpec(name="toy_margin", target_margin=toy_margin, params=("scale", "margin"),
                      preset=dict(scale=32.0, margin=0.3)),
    losses.MarginSpec(name="toy_ema", fn=toy_ema, params=("scale", "margin"),
                      init_state=lambda: {"t": jnp.zeros((), jnp.float32)},
                      update_state=_toy_ema_update),
)


@pytest.fixture
def toys(monkeypatch):
    """The toy losses registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(_registry, "_SPECS", dict(_registry._SPECS))
    monkeypatch.setattr(_registry, "NAMES", _registry.NAMES)
    for spec in TOY_SPECS:
        losses.register(spec)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh()


def _np_target(name, cos_y, scale, margin, t):
    """float64 target (cosine units) and its derivative."""
    if name == "toy_margin":
        return cos_y - margin * (1 - cos_y**2), 1 + 2 * margin * cos_y
    return cos_y - margin * (1 + t), np.ones_like(cos_y)


def _np_logits(name, cos, labels, scale, margin, t=0.0):
    cos = np.clip(cos.astype(np.float64), -1, 1)
    rows = np.arange(len(labels))
    out = cos.copy()
    out[rows, labels] = _np_target(name, cos[rows, labels], scale, margin, t)[0]
    return scale * out


def _np_head(name, e, w, labels, scale, margin, t=0.0):
    """float64 mean cross-entropy and its gradients w.r.t. the embeddings and the centres."""
    e, w = e.astype(np.float64), w.astype(np.float64)
    ne, nw = np.linalg.norm(e, axis=1, keepdims=True), np.linalg.norm(w, axis=1, keepdims=True)
    en, wn = e / ne, w / nw
    cos = en @ wn.T
    assert np.abs(cos).max() < 1
    z = _np_logits(name, cos, labels, scale, margin, t)
    rows = np.arange(len(labels))
    mx = z.max(1, keepdims=True)
    p = np.exp(z - mx)
    p /= p.sum(1, keepdims=True)
    loss = np.mean(np.log(np.exp(z - mx).sum(1)) + mx[:, 0] - z[rows, labels])
    g = scale * p
    g[rows, labels] = scale * (p[rows, labels] - 1) * _np_target(name, cos[rows, labels], scale, margin, t)[1]
    g /= len(labels)
    d_en, d_wn = g @ wn, g.T @ en
    d_e = (d_en - en * np.sum(en * d_en, axis=1, keepdims=True)) / ne
    d_w = (d_wn - wn * np.sum(wn * d_wn, axis=1, keepdims=True)) / nw
    return loss, d_e, d_w


def _data(seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(B, D)).astype(np.float32)
    w = rng.normal(size=(C, D)).astype(np.float32)
    y = rng.integers(0, C, B).astype(np.int32)
    return e, w, y


def _pad(w):
    return np.pad(w, ((0, pad_num_classes(C, 8) - C), (0, 0)))


CASES = [("toy_margin", {}, 16.0, 0.2, 0.0), ("toy_margin", {"scale": 24.0, "margin": 0.4}, 24.0, 0.4, 0.0),
         ("toy_ema", {"t": np.float32(0.5)}, 16.0, 0.1, 0.5)]


@pytest.mark.parametrize("name,params,scale,margin,t", CASES)
def test_toy_losses_match_numpy_float64_in_margin_loss_and_the_sharded_head(toys, mesh, name, params, scale,
                                                                            margin, t):
    e, w, y = _data()
    cos = np.random.default_rng(1).uniform(-1, 1, (B, C)).astype(np.float32)
    logits = losses.get(name)(jnp.asarray(cos), jnp.asarray(y), **params)
    np.testing.assert_allclose(np.asarray(logits), _np_logits(name, cos, y, scale, margin, t), rtol=1e-5, atol=1e-5)

    want, want_e, want_w = _np_head(name, e, w, y, scale, margin, t)
    single = jax.jit(jax.value_and_grad(lambda e, w: losses.margin_loss(e, w, y, name, **params), argnums=(0, 1)))
    sharded = jax.jit(jax.value_and_grad(lambda e, w: sharded_margin_loss(
        e, w, y, margin_fn=name, mesh=mesh, num_classes=C, **params), argnums=(0, 1)))
    for loss, (g_e, g_w) in (single(e, w), sharded(e, _pad(w))):
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g_e), want_e, rtol=1e-4, atol=1e-5 * np.abs(want_e).max())
        np.testing.assert_allclose(np.asarray(g_w)[:C], want_w, rtol=1e-4, atol=1e-5 * np.abs(want_w).max())
    # The target-only toy takes the fused cross-entropy; the generic one does not.
    jaxpr = str(jax.make_jaxpr(lambda e, w: losses.margin_loss(e, w, y, name, **params))(e, w))
    assert ("custom_vjp" in jaxpr) == (name == "toy_margin")


@pytest.mark.parametrize("name", ["toy_margin", "toy_ema"])
def test_toy_losses_train_through_margin_loss_and_the_sharded_head(toys, mesh, name):
    e, w, y = _data(2)
    spec = losses.spec(name)
    state = spec.init_state()
    heads = {
        "margin_loss": lambda e, w, kw: losses.margin_loss(e, w, y, name, **kw),
        "sharded": lambda e, w, kw: sharded_margin_loss(e, w, y, margin_fn=name, mesh=mesh, num_classes=C, **kw),
    }
    for head, loss_fn in heads.items():
        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
        params = (jnp.asarray(e), jnp.asarray(_pad(w) if head == "sharded" else w))
        loss_state, seen = dict(state), []
        for _ in range(20):
            loss, grads = step(*params, loss_state)
            params = tuple(p - 1.0 * g for p, g in zip(params, grads))
            cos = losses.l2_normalize(params[0]) @ losses.l2_normalize(params[1][:C]).T
            loss_state = spec.update_state(loss_state, target_cosine=cos[np.arange(B), y], norms=None)
            seen.append(float(loss))
        assert seen[-1] < 0.5 * seen[0], (head, seen)
        if name == "toy_ema":
            assert float(loss_state["t"]) > 0.0  # the state followed the rising target cosines


def test_toy_losses_pass_config_validation_and_unknown_params_are_refused(toys):
    cfg = config_lib.base_config()
    cfg.num_steps = 10
    config_lib.set_loss(cfg, "toy_margin")
    assert cfg.loss.params.to_dict() == dict(scale=32.0, margin=0.3)  # the preset
    config_lib.validate(cfg)
    config_lib.apply_overrides(cfg, ["loss.params.margin=0.25"])
    config_lib.validate(cfg)
    for name, bad in (("toy_margin", "m2"), ("toy_ema", "t")):  # t: state, not a parameter
        config_lib.set_loss(cfg, name)
        config_lib.validate(cfg)
        config_lib.apply_overrides(cfg, [f"loss.params.{bad}=0.1"])
        with pytest.raises(config_lib.ConfigError,
                           match=rf"loss.params \['{bad}'\] not accepted by {name}; accepted: \['margin', 'scale'\]"):
            config_lib.validate(cfg)
    assert losses.initial_state("toy_ema")["t"] == 0.0 and losses.initial_state("toy_margin") == {}
    assert math.isclose(float(losses.update_state("toy_ema", {"t": jnp.float32(1.0)},
                                                  target_cosine=jnp.ones(3), norms=None)["t"]), 1.0)


def test_registry_is_restored_after_the_toys(toys):
    assert "toy_margin" in losses.NAMES and "toy_ema" in losses.NAMES


def test_toys_are_gone():
    assert losses.NAMES == BUILTIN
    with pytest.raises(ValueError, match="unknown loss 'toy_margin'"):
        losses.spec("toy_margin")
