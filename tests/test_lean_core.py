"""``pip install x2jax`` (no extras) is enough for the losses: they import and compute with
flax, orbax, TFDS, grain, ml_collections, PIL, tensorboardX and matplotlib unimportable, and
a subpackage that needs the ``train`` extra says so by name."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("flax", "orbax", "tensorflow_datasets", "grain", "ml_collections", "PIL", "tensorboardX",
           "matplotlib", "array_record", "tensorflow", "torch")

SCRIPT = r'''
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Blocker())
import numpy as np
import jax, jax.numpy as jnp
from x2jax.losses import x2_softmax, margin_loss
import x2jax.losses.geometry, x2jax.parallel
rng = np.random.default_rng(0)
cos = rng.uniform(-0.9, 0.9, (4, 6)).astype(np.float32)
labels = np.array([0, 5, 2, 2], np.int32)
emb = rng.normal(size=(4, 8)).astype(np.float32)
w = rng.normal(size=(6, 8)).astype(np.float32)
loss = float(margin_loss(jnp.asarray(emb), jnp.asarray(w), jnp.asarray(labels), "x2_softmax"))
out = {"logits": np.asarray(x2_softmax(jnp.asarray(cos), jnp.asarray(labels))).tolist(),
       "cos": cos.tolist(), "loss": loss, "emb": emb.tolist(), "w": w.tolist(), "errors": {}}
for pkg in ("x2jax.models", "x2jax.data", "x2jax.train"):
    try:
        __import__(pkg)
        out["errors"][pkg] = None
    except ImportError as e:
        out["errors"][pkg] = str(e)
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(out))
'''


def _x2_reference(cos, labels, s=64.0, a=-0.9, h=0.0, k=0.65):
    cos = np.asarray(cos, np.float64)
    logits = s * cos.copy()
    rows = np.arange(len(labels))
    theta = np.arccos(cos[rows, labels])
    logits[rows, labels] = s * (a * (theta - h) ** 2 + k)
    return logits


def test_losses_import_and_compute_without_the_train_extra():
    out = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [], "a blocked package was imported after all"
    labels = np.array([0, 5, 2, 2])
    np.testing.assert_allclose(got["logits"], _x2_reference(got["cos"], labels), rtol=1e-5, atol=1e-4)
    # margin_loss: mean cross-entropy of the X2 logits of the normalised embeddings and centres
    e, w = np.asarray(got["emb"], np.float64), np.asarray(got["w"], np.float64)
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    z = _x2_reference(cos, labels)
    ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(4), labels]
    np.testing.assert_allclose(got["loss"], ce.mean(), rtol=1e-5)
    for pkg in ("x2jax.models", "x2jax.data", "x2jax.train"):
        assert got["errors"][pkg] is not None and f"{pkg} needs the 'train' extra" in got["errors"][pkg]
        assert "pip install 'x2jax[train]'" in got["errors"][pkg]
