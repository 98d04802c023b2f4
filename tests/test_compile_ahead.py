"""AheadOfTimeStep: the train step compiled in a background thread."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2jax.train.step import AheadOfTimeStep, batch_spec


def _step(state, batch):
    new = {"w": state["w"] - 0.1 * jnp.mean(batch["image"], axis=(0, 1, 2)),
           "n": state["n"] + batch["label"].shape[0]}
    return new, {"loss": jnp.sum(batch["image"] ** 2)}


def _inputs(batch_size):
    rng = np.random.default_rng(0)
    state = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32), "n": jnp.int32(0)}
    batch = {"image": jnp.asarray(rng.standard_normal((batch_size, 4, 4, 3)), jnp.float32),
             "label": jnp.arange(batch_size, dtype=jnp.int32)}
    return state, batch


def test_batch_spec_matches_what_the_loader_yields():
    spec = batch_spec(16, 32)
    assert spec["image"].shape == (16, 32, 32, 3) and spec["image"].dtype == jnp.float32
    assert spec["label"].shape == (16,) and spec["label"].dtype == jnp.int32


def test_compiled_ahead_gives_the_jitted_result_and_falls_back_on_other_shapes():
    jitted = jax.jit(_step, donate_argnums=0)
    state, batch = _inputs(8)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step = AheadOfTimeStep(jitted, abstract_state, batch_spec(8, 4))

    expected_state, expected_metrics = _step(*_inputs(8))
    new_state, metrics = step(state, batch)
    assert step.compiled_ahead
    np.testing.assert_array_equal(new_state["w"], expected_state["w"])
    assert int(new_state["n"]) == 8
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-6)

    state2, batch2 = _inputs(5)  # another batch size: the jitted function compiles for it
    new_state2, _ = step(state2, batch2)
    assert not step.compiled_ahead
    assert int(new_state2["n"]) == 5
    np.testing.assert_array_equal(new_state2["w"], _step(*_inputs(5))[0]["w"])


def test_a_compile_error_surfaces_at_the_first_call():
    def bad(state, batch):
        return state["w"] @ batch["image"], {}  # rank mismatch: fails when traced

    state, batch = _inputs(8)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step = AheadOfTimeStep(jax.jit(bad), abstract_state, batch_spec(8, 4))
    with pytest.raises(TypeError):
        step(state, batch)


def test_warm_up_runs_the_compiled_step_once_on_zeros_before_the_first_call():
    """With ``warm_up`` the background thread executes the compiled program once, on zeros
    of the step's shapes and shardings (a host callback counts executions and records
    what it saw); the first real call then gives the same result as without."""
    seen = []

    def record(w, n):
        seen.append((np.asarray(w).copy(), int(n)))

    def step_with_callback(state, batch):
        jax.debug.callback(record, state["w"], state["n"])
        return _step(state, batch)

    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    jitted = jax.jit(step_with_callback, donate_argnums=0,
                     in_shardings=({"w": replicated, "n": replicated},
                                   {"image": by_batch, "label": by_batch}))
    state, batch = _inputs(8)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    step = AheadOfTimeStep(jitted, abstract_state, batch_spec(8, 4), warm_up=True)
    step._future.result()  # compile and warm-up done
    jax.effects_barrier()  # the callback has no data dependency on the outputs: wait for it
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][0], np.zeros(3, np.float32))
    assert seen[0][1] == 0

    expected_state, _ = _step(*_inputs(8))
    new_state, _ = step(state, batch)
    jax.effects_barrier()
    assert step.compiled_ahead and len(seen) == 2
    np.testing.assert_array_equal(new_state["w"], expected_state["w"])
    assert int(new_state["n"]) == 8

    cold = AheadOfTimeStep(jitted, abstract_state, batch_spec(8, 4))  # default: no warm-up
    cold._future.result()
    assert len(seen) == 2
