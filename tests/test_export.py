"""jax.export round trip of the embedding function: same embeddings after deserialising."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax.evaluation.export import export_embedding, load_exported, save_exported
from x2jax.models import ModelSpec, get_model, init_variables

SPEC = ModelSpec("r18_tiny", embedding_size=8, image_size=16, conv_impl="xla")


@pytest.fixture(scope="module")
def tiny_model():
    module = get_model("r18_tiny", embedding_size=8, image_size=16)
    variables = jax.jit(init_variables, static_argnums=0)(module, jax.random.key(0))
    return module, variables


def images(n, seed):
    return jax.random.uniform(jax.random.key(seed), (n, 16, 16, 3), jnp.float32, -1.0, 1.0)


@pytest.fixture(scope="module")
def reference(tiny_model):
    module, variables = tiny_model
    x = images(8, 1)
    return x, np.asarray(jax.jit(functools.partial(module.apply, train=False))(variables, x))


def test_round_trip_baked_weights_symbolic_batch(tiny_model, reference, tmp_path):
    module, variables = tiny_model
    x, want = reference
    exported = export_embedding(SPEC, variables)
    loaded = load_exported(save_exported(tmp_path / "sub" / "embed.jax", exported))
    # Symbolic batch: two batch sizes through one serialised function.
    for rows in (slice(0, 3), slice(3, 8)):
        got = np.asarray(loaded.call(x[rows]))
        assert got.shape == want[rows].shape == (got.shape[0], 8)
        np.testing.assert_allclose(got, want[rows], rtol=1e-5, atol=1e-5)


def test_round_trip_weights_as_arguments(tiny_model, reference, tmp_path):
    module, variables = tiny_model
    x, want = reference
    exported = export_embedding(SPEC, variables, bake_variables=False)
    loaded = load_exported(save_exported(tmp_path / "embed_args.jax", exported))
    np.testing.assert_allclose(np.asarray(loaded.call(variables, x)), want, rtol=1e-5, atol=1e-5)
    # Other weights of the same architecture go through the same file.
    other = jax.tree.map(lambda v: v * 1.5, variables)
    np.testing.assert_allclose(
        np.asarray(loaded.call(other, x)),
        np.asarray(jax.jit(functools.partial(module.apply, train=False))(other, x)),
        rtol=1e-4,
        atol=1e-4,
    )
    assert np.abs(np.asarray(loaded.call(other, x)) - want).max() > 1e-3


def test_wrong_input_shape_and_bad_file(tiny_model, tmp_path):
    module, variables = tiny_model
    exported = export_embedding(SPEC, variables)
    with pytest.raises(ValueError, match="shape"):
        exported.call(jnp.zeros((2, 32, 32, 3)))
    bad = tmp_path / "bad.jax"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.jax is not a jax.export serialisation"):
        load_exported(bad)
    with pytest.raises(FileNotFoundError, match="missing.jax"):
        load_exported(tmp_path / "missing.jax")


def test_module_with_onednn_convs_exports_with_xla_convs(tiny_model, reference, tmp_path):
    """conv_impl is a runtime choice: a module running on oneDNN custom calls (which
    jax.export refuses to serialise) exports with XLA convs, same embeddings."""
    from x2jax.models import onednn_conv

    if not onednn_conv.available():
        pytest.skip("oneDNN extension not available (pip install -e '.[onednn]')")
    module, variables = tiny_model
    x, want = reference
    onednn_spec = SPEC.replace(conv_impl="onednn")
    onednn_module = onednn_spec.build()
    apply_fn = functools.partial(onednn_module.apply, train=False)
    own = np.asarray(jax.jit(apply_fn)(variables, x))
    assert "x2jax_onednn_conv_forward" in jax.jit(apply_fn).lower(variables, x).as_text()
    for bake in (True, False):
        exported = export_embedding(onednn_spec, variables, bake_variables=bake)
        assert "x2jax_onednn" not in exported.mlir_module()
        loaded = load_exported(save_exported(tmp_path / f"onednn_{bake}.jax", exported))
        got = np.asarray(loaded.call(x) if bake else loaded.call(variables, x))
        np.testing.assert_allclose(got, own, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the caller's spec and module are left as they were
    assert onednn_spec.conv_impl == onednn_module.conv_impl == "onednn"
