"""Gradient checkpointing (``remat``) of every backbone: the same parameter tree and the same
gradients, BatchNorm statistics and loss as without it (the reference: the plain backward pass),
the checkpoint really in the program, and bad names rejected by the model and the config."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax import models
from x2jax.models import layers

# (arch, image size, architecture overrides): one small model per family.
FAMILIES = {
    "iresnet": ("r18_tiny", 16, dict(layers=(1, 2, 1, 1), widths=(8, 8, 16, 16))),
    "mobilefacenet": ("mobilefacenet", 16, dict(blocks=(2, 2, 1, 1), scale=1)),  # b0 = 2: a Residual at layers_1
    "vit": ("vit_tiny", 16, {}),
}


def _module(family, remat):
    arch, size, kw = FAMILIES[family]
    return models.get_model(arch, embedding_size=8, image_size=size, remat=remat, conv_impl="xla", **kw)


@functools.lru_cache(maxsize=None)
def _variables(family):
    return jax.jit(models.init_variables, static_argnums=0)(_module(family, "none"), jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _setup(family, remat):
    arch, size, kw = FAMILIES[family]
    module, variables = _module(family, remat), _variables(family)
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))

    def loss(params, key):
        emb, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                    train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.sum(jnp.sin(emb) * emb), (updates["batch_stats"], emb)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    return module, variables, grad_fn, jax.jit(grad_fn)


def _max_rel(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)))


@pytest.mark.parametrize("family,remat", [("iresnet", "blocks"), ("mobilefacenet", "blocks"), ("vit", "blocks"),
                                          ("vit", "dots_saveable")])
def test_remat_keeps_parameters_and_gradients(family, remat):
    _, variables, plain_fn, plain = _setup(family, "none")
    module, _, grad_fn, checkpointed = _setup(family, remat)
    # Same variable tree (names, shapes, dtypes): checkpoints and converted weights fit either.
    assert models.abstract_variables(module) == models.abstract_variables(_module(family, "none"))
    key = jax.random.key(5)  # the ViT's mask and drop path: the recomputed forward redraws the same
    (loss, (stats, emb)), grads = checkpointed(variables["params"], key)
    (loss0, (stats0, emb0)), grads0 = plain(variables["params"], key)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(emb, emb0, rtol=1e-6, atol=1e-6)
    assert _max_rel(grads, grads0) < 1e-5
    assert _max_rel(stats, stats0) < 1e-6
    # The checkpoint is in the program with remat, and only then.
    count = lambda fn: str(jax.make_jaxpr(fn)(variables["params"], key)).count("remat")
    blocks = {"iresnet": 5, "mobilefacenet": 6 + 3, "vit": 2}[family]  # DepthWise: 6 residual + 3 strided
    assert count(grad_fn) >= blocks and count(plain_fn) == 0


def test_remat_is_a_runtime_field_of_saved_models(tmp_path):
    """A model saved without remat loads with it (same variables, same eval embeddings)."""
    module, variables, _, _ = _setup("iresnet", "none")
    arch, size, kw = FAMILIES["iresnet"]
    models.save_model(tmp_path / "m", variables, arch=arch, embedding_size=8, image_size=size, **kw)
    loaded, loaded_vars, _ = models.load_model(tmp_path / "m", remat="blocks", conv_impl="xla")
    assert loaded.remat == "blocks"
    x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
    np.testing.assert_allclose(jax.jit(loaded.apply)(loaded_vars, x), jax.jit(module.apply)(variables, x),
                               rtol=1e-6, atol=1e-6)


def test_bad_remat_names_are_refused():
    assert layers.REMAT_CHOICES[:2] == ("none", "blocks")
    assert all(callable(getattr(jax.checkpoint_policies, p)) for p in layers.REMAT_POLICIES)
    for arch, size, kw in FAMILIES.values():
        with pytest.raises(ValueError, match=rf"{arch}: remat must be one of \('none', 'blocks', 'nothing_saveable'"):
            models.get_model(arch, image_size=size, remat="save_only_these_names", **kw)
    from x2jax.train import config as config_lib  # noqa: PLC0415

    c = config_lib.base_config()
    c.num_steps = 10
    c.model.remat = "everything"
    with pytest.raises(config_lib.ConfigError, match=r"model.remat must be one of \('none', 'blocks'"):
        config_lib.validate(c)
