"""embed_images: flip-sum, padding of the last batch and sharding over the data axis."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from x2jax.evaluation.verification import embed_images


class TinyNet(nn.Module):
    """Not flip-invariant: a conv plus a dense layer on the flattened map."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        return nn.Dense(5)(nn.relu(x).reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def tiny():
    module = TinyNet()
    images = np.random.default_rng(0).integers(0, 256, size=(13, 8, 8, 3), dtype=np.uint8)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    return module, variables, images


def manual_embeddings(module, variables, images):
    """float64 numpy normalisation and flip, the network run one image at a time."""
    x = (images.astype(np.float64) / 255.0 - 0.5) / 0.5
    flipped = x[:, :, ::-1, :]
    out = []
    for i in range(len(images)):
        a = module.apply(variables, jnp.asarray(x[i : i + 1], jnp.float32))
        b = module.apply(variables, jnp.asarray(flipped[i : i + 1], jnp.float32))
        out.append(np.asarray(a + b)[0])
    return np.stack(out)


@pytest.mark.parametrize("batch_size", [4, 13, 32])
def test_flip_sum_matches_manual(tiny, batch_size):
    module, variables, images = tiny
    got = embed_images(module.apply, variables, images, batch_size)
    want = manual_embeddings(module, variables, images)
    assert got.shape == (13, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The flip matters for this network: without it the answer would differ.
    no_flip = 2 * np.asarray(module.apply(variables, (images / 255.0 - 0.5) / 0.5))
    assert np.abs(got - no_flip).max() > 1e-3


def test_sharded_over_data_axis_matches_unsharded(tiny):
    module, variables, images = tiny
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    got = embed_images(module.apply, variables, images, 8, mesh=mesh)
    np.testing.assert_allclose(got, embed_images(module.apply, variables, images, 8), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the mesh 'data' axis size 4"):
        embed_images(module.apply, variables, images, 6, mesh=mesh)


def test_sharded_embedding_program_has_no_collectives(tiny):
    """Each device embeds its own slice of the batch and its flips: no data moves between devices."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from x2jax.evaluation.verification import _flip_sum_embed

    module, variables, images = tiny
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    batch = jax.device_put(images[:8], NamedSharding(mesh, P("data")))
    text = _flip_sum_embed.lower(module.apply, jax.device_put(variables, NamedSharding(mesh, P())),
                                 batch).compile().as_text()
    for op in ("all-to-all", "all-gather", "all-reduce", "collective-permute", "reduce-scatter"):
        assert op not in text, op


def test_rejects_float_images(tiny):
    module, variables, images = tiny
    with pytest.raises(ValueError, match="uint8"):
        embed_images(module.apply, variables, images.astype(np.float32), 4)
