"""The loss researcher's metrics (target_prob, target_angle_deg, nearest_angle_deg) against numpy float64.

The head's per-row values (``HeadAux.target_prob``, ``nearest_cosine``) and the
train step's batch means are checked against p_y and the angles computed from
the embeddings and W directly, on one device and on a class-sharded mesh of 8
simulated devices, with the full head and with Partial FC.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import losses
from x2jax.parallel import make_mesh, pad_num_classes, sharded_margin_loss
from x2jax.parallel.sharding import ShardingRules
from x2jax.train import config as config_lib
from x2jax.train.metrics import progress_fields
from x2jax.train.setup import build_step

ROOT = Path(__file__).resolve().parent.parent
B, D, C = 16, 8, 37


def _meshes():
    return {"1 device": make_mesh(1, 1, devices=jax.devices()[:1]), "8 devices": make_mesh(4, 2)}


def _data(seed=0):
    """Embeddings near their class centres (p_y far from 0 and 1), W with padded zero rows."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(C, D))
    y = rng.integers(0, C, B)
    e = w[y] + 1.2 * rng.normal(size=(B, D))
    rows = pad_num_classes(C, 8)
    w = np.pad(w, ((0, rows - C), (0, 0)))
    return e.astype(np.float32), w.astype(np.float32), y.astype(np.int32)


def _np_target(name, cos_y, p):
    """float64 target logit of the losses under test (before the scale)."""
    theta = np.arccos(np.clip(cos_y, -1, 1))
    if name == "x2_softmax":
        return p.get("a", -0.9) * (theta - p.get("h", 0.0)) ** 2 + p.get("k", 0.65)
    if name == "arcface":
        return np.cos(theta + p.get("margin", 0.5))
    if name == "cosface_generic":
        return cos_y - 0.2
    raise AssertionError(name)


def _np_metrics(e, w, y, name, params, seen):
    """(p_y, target angle, nearest angle) per row; ``seen`` (C_pad,) bool: the classes the step sees."""
    e = e.astype(np.float64) / np.linalg.norm(e, axis=1, keepdims=True)
    norms = np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True)
    wn = np.where(norms > 0, w / np.maximum(norms, 1e-30), 0.0)
    cos = e @ wn.T
    scale = params.get("scale", 64.0)
    p_y, theta_y, theta_n = [], [], []
    for i in range(len(y)):
        others = seen.copy()
        others[y[i]] = False
        tgt = scale * _np_target(name, cos[i, y[i]], params)
        z = np.concatenate([[tgt], scale * np.clip(cos[i, others], -1, 1)])
        p_y.append(np.exp(tgt - z.max()) / np.sum(np.exp(z - z.max())))
        theta_y.append(np.degrees(np.arccos(np.clip(cos[i, y[i]], -1, 1))))
        theta_n.append(np.degrees(np.arccos(np.clip(cos[i, others].max(), -1, 1))))
    return np.array(p_y), np.array(theta_y), np.array(theta_n)


def _generic_cosface(cosine, labels, *, scale=16.0):
    """A margin outside the registry: the head's generic (label -1) path."""
    return losses.cosface(cosine, labels, scale=scale, margin=0.2)


X2, ARC, GENERIC = ("x2_softmax", dict(scale=8.0)), ("arcface", dict(scale=16.0, margin=0.3)), \
    ("cosface_generic", dict(scale=16.0))
# each loss path (fused target-only, generic label -1) on 1 device and sharded, full head and Partial FC
CASES = [("1 device", *X2, 1.0), ("8 devices", *X2, 0.6), ("8 devices", *ARC, 1.0), ("1 device", *ARC, 0.6),
         ("8 devices", *GENERIC, 1.0), ("8 devices", *GENERIC, 0.6)]


@pytest.mark.parametrize("mesh_name,name,params,sample_rate", CASES,
                         ids=[f"{c[1]}-{c[0]}-rate{c[3]}" for c in CASES])
def test_head_metrics_match_numpy(mesh_name, name, params, sample_rate):
    mesh = _meshes()[mesh_name]
    e, w, y = _data()
    margin_fn = _generic_cosface if name == "cosface_generic" else name
    _, aux = sharded_margin_loss(jnp.asarray(e), jnp.asarray(w), jnp.asarray(y), margin_fn=margin_fn, mesh=mesh,
                                 num_classes=C, sample_rate=sample_rate, rng=jax.random.PRNGKey(3),
                                 return_aux=True, **params)
    seen = np.asarray(aux.sampled)  # all real rows, or the Partial FC sample
    assert not seen[C:].any()
    assert seen.sum() == C if sample_rate == 1.0 else seen.sum() < C  # the sample leaves classes out
    p_y, theta_y, theta_n = _np_metrics(e, w, y, name, params, seen)
    assert 0.01 < p_y.mean() < 0.99  # not a vacuous comparison
    np.testing.assert_allclose(np.asarray(aux.target_prob), p_y, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.degrees(np.arccos(np.clip(np.asarray(aux.target_cosine), -1, 1))), theta_y,
                               atol=2e-3)
    np.testing.assert_allclose(np.degrees(np.arccos(np.clip(np.asarray(aux.nearest_cosine), -1, 1))), theta_n,
                               atol=2e-3)


def _tiny_config(cache_dir, **kw):
    c = config_lib.load_config(ROOT / "configs" / "synthetic_tiny_x2softmax.py")
    c.data.batch_size = 16
    c.model.layers, c.model.widths, c.model.embedding_size = (1, 1, 1, 1), (8, 8, 16, 16), 16
    c.model.conv_impl = "xla"
    c.loss.params.scale = 8.0
    c.num_steps = 4
    c.schedule.warmup_steps = 0
    c.eval.sets = ""
    c.compilation_cache_dir = str(cache_dir)
    for k, v in kw.items():
        node = c
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        node[last] = v
    return c


@pytest.mark.parametrize("mesh_name,sample_rate", [("1 device", 1.0), ("8 devices", 0.5)])
def test_train_step_metrics_are_the_batch_means(mesh_name, sample_rate, cache_dir):
    """The jitted train step's metrics against numpy from the same embeddings (train mode) and W."""
    config = _tiny_config(cache_dir, **{"loss.sample_rate": sample_rate})
    mesh = _meshes()[mesh_name]
    rules = ShardingRules.from_config(config.mesh.rules)
    step = build_step(config, mesh, rules, num_classes=C, image_size=16, total_steps=4)
    state = step.create_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    batch = {"image": rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, C, 16).astype(np.int32)}
    params = jax.device_get(state.params)
    variables = {"params": params["backbone"], "batch_stats": jax.device_get(state.batch_stats)}
    emb, _ = step.model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    w = np.asarray(params["head"]["weight"])
    _, _, head_rng = jax.random.split(jax.device_get(state.rng), 3)  # as the step splits it
    _, metrics = step.train_step(state, batch)  # (donates state)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if sample_rate == 1.0:
        seen = np.arange(w.shape[0]) < C
    else:  # the sample is random: rebuild it with the step's key
        _, aux = sharded_margin_loss(jnp.asarray(emb), jnp.asarray(w), jnp.asarray(batch["label"]),
                                     margin_fn="x2_softmax", mesh=mesh, num_classes=C, sample_rate=sample_rate,
                                     rng=head_rng, return_aux=True, **dict(config.loss.params))
        seen = np.asarray(aux.sampled)
        assert seen.sum() < C
    p_y, theta_y, theta_n = _np_metrics(np.asarray(emb), w, batch["label"], "x2_softmax",
                                        dict(config.loss.params), seen)
    assert metrics["target_prob"] > 1e-6  # scale 8: p_y is not lost to underflow
    np.testing.assert_allclose(metrics["target_prob"], p_y.mean(), rtol=1e-3)
    np.testing.assert_allclose(metrics["target_angle_deg"], theta_y.mean(), atol=5e-3)
    np.testing.assert_allclose(metrics["nearest_angle_deg"], theta_n.mean(), atol=5e-3)


def test_progress_line_shows_the_metrics():
    fields = progress_fields({"loss": 80.27, "lr": 0.1, "target_prob": 1.234e-35, "target_angle_deg": 71.23,
                              "nearest_angle_deg": 85.31})
    assert fields == {"loss": 80.27, "p_y": "1.23e-35", "target": "71.2 deg", "nearest": "85.3 deg", "lr": 0.1}
