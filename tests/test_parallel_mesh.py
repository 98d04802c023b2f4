"""Mesh, sharding rules, optimizer-state shardings, host-local batches, distributed init."""
from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from x2jax.parallel import (
    DEFAULT_RULES,
    PeerTimeoutError,
    ShardingRules,
    batch_sharding,
    class_centers_sharding,
    fsdp_spec,
    host_local_to_global,
    initialize_distributed,
    initialize_distributed_from_config,
    make_mesh,
    num_class_shards,
    opt_state_shardings,
    param_shardings,
)
from x2jax.parallel import mesh as mesh_lib


def test_make_mesh_shapes_and_auto_axes():
    m = make_mesh()
    assert dict(m.shape) == {"data": 8, "model": 1}
    assert m.axis_types == (AxisType.Auto, AxisType.Auto)
    assert dict(make_mesh(model=2).shape) == {"data": 4, "model": 2}
    assert dict(make_mesh(data=2, model=4).shape) == {"data": 2, "model": 4}
    with pytest.raises(ValueError, match="3 devices|not divisible"):
        make_mesh(model=3)
    with pytest.raises(ValueError, match="does not match"):
        make_mesh(data=3, model=2)


def test_rules_map_logical_axes_in_one_place():
    assert DEFAULT_RULES.spec("batch", None) == P(("data",), None)
    assert DEFAULT_RULES.spec("classes", "embed") == P(("data", "model"), None)
    rules = ShardingRules(classes=("model",))
    m = make_mesh(data=2, model=4)
    assert num_class_shards(m) == 8 and num_class_shards(m, rules) == 4
    assert class_centers_sharding(m, rules).spec == P(("model",), None)
    with pytest.raises(ValueError, match="unknown logical axis 'heads'"):
        DEFAULT_RULES.spec("heads")
    # every spelling of the same rule is the same rule (config strings, names, tuples)
    assert ShardingRules(classes="model") == rules == ShardingRules(classes=["model"])
    assert ShardingRules(batch="data", classes="data, model", embed="", fsdp="data") == DEFAULT_RULES
    assert ShardingRules.from_config({"batch": "data", "classes": "model", "embed": "", "fsdp": ""}).fsdp is None
    with pytest.raises(ValueError, match=r"sharding rule classes: unknown mesh axes \['modle'\]"):
        ShardingRules(classes="data,modle")


def test_fsdp_splits_largest_divisible_dim():
    assert fsdp_spec((3, 3, 64, 128), 8, ("data",)) == P(None, None, None, ("data",))
    assert fsdp_spec((25088, 512), 8, ("data",)) == P(("data",), None)
    assert fsdp_spec((25089, 512), 8, ("data",)) == P(None, ("data",))
    assert fsdp_spec((7, 3001), 8, ("data",), min_size=1) == P()  # nothing divisible
    assert fsdp_spec((64,), 8, ("data",)) == P()  # small: replicated
    m = make_mesh()
    params = {"conv": jnp.zeros((3, 3, 64, 128)), "bn": jnp.zeros((128,))}
    sh = param_shardings(params, m, strategy="fsdp")
    placed = jax.device_put(params, sh)
    assert {s.data.shape for s in placed["conv"].addressable_shards} == {(3, 3, 64, 16)}
    assert placed["bn"].sharding.is_fully_replicated
    rep = param_shardings(params, m)
    assert all(s.spec == P() for s in jax.tree.leaves(rep))
    with pytest.raises(ValueError, match="strategy"):
        param_shardings(params, m, strategy="zero3")


def test_optimizer_state_shardings_follow_params():
    m = make_mesh()
    params = {"w": jnp.zeros((64, 16)), "b": jnp.zeros((16,))}
    shardings = {"w": class_centers_sharding(m), "b": NamedSharding(m, P())}
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(tx.init, params)
    st_sh = opt_state_shardings(tx, state, shardings, m)
    adam = st_sh[0]
    assert adam.mu["w"] == shardings["w"] and adam.nu["w"] == shardings["w"]
    assert adam.mu["b"] == shardings["b"] and adam.count.spec == P()
    # Used as out_shardings the state lands split like the params.
    real = jax.jit(tx.init, out_shardings=st_sh)(params)
    assert {s.data.shape for s in real[0].mu["w"].addressable_shards} == {(8, 16)}


def test_host_local_to_global_single_process():
    m = make_mesh()
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "label": np.arange(16, dtype=np.int32)}
    g = host_local_to_global(batch, m)
    assert g["image"].sharding == batch_sharding(m)
    np.testing.assert_array_equal(g["image"], batch["image"])
    assert [s.data.shape for s in g["label"].addressable_shards] == [(2,)] * 8
    # Shard i holds rows 2i, 2i+1 (the batch is split in order).
    for s in g["label"].addressable_shards:
        np.testing.assert_array_equal(s.data, batch["label"][s.index])


def test_initialize_distributed_single_process_is_noop_and_bad_settings_raise(monkeypatch):
    for var in (mesh_lib.ENV_COORDINATOR, mesh_lib.ENV_NUM_PROCESSES, mesh_lib.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed() is False
    assert initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="coordinator_address"):
        initialize_distributed(num_processes=2, process_id=0)
    monkeypatch.setenv(mesh_lib.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(mesh_lib.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed()
    with pytest.raises(ValueError, match=r"process_id=2 outside \[0, 2\)"):
        initialize_distributed(process_id=2)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "30"])
def test_initialize_distributed_rejects_bad_timeouts(bad):
    with pytest.raises(ValueError, match=rf"initialization_timeout_s={bad!r} must be a whole number"):
        initialize_distributed("127.0.0.1:1234", 2, 0, initialization_timeout_s=bad)
    with pytest.raises(ValueError, match=rf"heartbeat_timeout_s={bad!r} must be a whole number"):
        initialize_distributed("127.0.0.1:1234", 2, 0, heartbeat_timeout_s=bad)


@pytest.fixture
def fast_reports(monkeypatch):
    """Progress lines every 0.1 s instead of 5 s / 10 s."""
    monkeypatch.setattr(mesh_lib, "_FIRST_REPORT_S", 0.1)
    monkeypatch.setattr(mesh_lib, "_REPORT_EVERY_S", 0.1)
    monkeypatch.setattr(mesh_lib, "_EXIT_REPORT_S", 0.05)
    monkeypatch.setattr(mesh_lib, "_EXIT_REPORT_EVERY_S", 0.1)


def test_initialize_distributed_passes_timeouts_and_reports_waiting(monkeypatch, capsys, fast_reports):
    calls = []

    def slow_initialize(**kwargs):
        calls.append(kwargs)
        time.sleep(0.45)

    monkeypatch.setattr(jax.distributed, "initialize", slow_initialize)
    assert initialize_distributed("10.0.0.1:1234", 4, 2, initialization_timeout_s=5,
                                  heartbeat_timeout_s=7) is True
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                          initialization_timeout=5, heartbeat_timeout_seconds=7)]
    err = capsys.readouterr().err
    waiting = [line for line in err.splitlines() if "waiting for the other 3 process(es)" in line]
    assert len(waiting) >= 2, err
    assert waiting[0].startswith("x2jax: process 2 of 4 waiting for the other 3 process(es) at "
                                 "10.0.0.1:1234 (0 s of 5 s, --config.distributed.initialization_timeout_s)")
    assert "process 2 of 4: all processes joined at 10.0.0.1:1234" in err
    assert "timed out" not in err

    calls.clear()
    assert initialize_distributed_from_config(
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
         "initialization_timeout_s": 11, "heartbeat_timeout_s": 12}) is True
    assert calls[0]["initialization_timeout"] == 11 and calls[0]["heartbeat_timeout_seconds"] == 12
    # train.py's config spells "unset" as "", 0 and -1: a single-process run, nothing called
    calls.clear()
    unset = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                           auto_detect=False, initialization_timeout_s=300, heartbeat_timeout_s=100))
    assert initialize_distributed_from_config(unset) is False and not calls


def test_initialize_distributed_timeout_names_address_process_and_key(monkeypatch, capsys, fast_reports):
    def timed_out(**kwargs):
        time.sleep(1.2)  # past initialization_timeout_s=1: the watchdog speaks first
        raise RuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded\nRPC: RegisterTask")

    monkeypatch.setattr(jax.distributed, "initialize", timed_out)
    with pytest.raises(PeerTimeoutError) as info:
        initialize_distributed("10.0.0.1:1234", 4, 2, initialization_timeout_s=1)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "RegisterTask" in str(info.value.__cause__)  # the original is chained
    for part in ("process 2 of 4", "the other 3 process(es) at 10.0.0.1:1234",
                 "initialization_timeout_s=1 s", "all 4 processes",
                 "--config.distributed.initialization_timeout_s=N"):
        assert part in msg, (part, msg)
    err = capsys.readouterr().err
    assert "x2jax: process 2 of 4 timed out waiting" in err  # printed before JAX would abort
    assert "JAX ends this process within about 5 s (unless they join in that grace) with DEADLINE_EXCEEDED" in err

    def other_error(**kwargs):
        raise RuntimeError("UNAVAILABLE: no route to host")

    monkeypatch.setattr(jax.distributed, "initialize", other_error)
    with pytest.raises(RuntimeError, match="no route to host") as info:
        initialize_distributed("10.0.0.1:1234", 4, 2)
    assert not isinstance(info.value, PeerTimeoutError)


def test_exit_report_explains_a_hanging_shutdown(capsys, fast_reports):
    done = threading.Event()
    t = threading.Thread(target=mesh_lib._watch_exit, args=(done, "process 0 of 2", 9))
    t.start()
    time.sleep(0.3)
    done.set()
    t.join(5)
    err = capsys.readouterr().err
    assert "x2jax: process 0 of 2 is waiting at exit for the other processes" in err
    assert "heartbeat_timeout_s=9 s (--config.distributed.heartbeat_timeout_s)" in err
    assert "'Task K heartbeat timeout'" in err and "still waiting at exit" in err
    # A quick exit says nothing.
    done = threading.Event()
    done.set()
    mesh_lib._watch_exit(done, "process 0 of 2", 9)
    assert capsys.readouterr().err == ""
