"""One process of the two-process head test (spawned by tests/test_multihost.py).

Usage: python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz
       python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES --loop INIT_TIMEOUT_S HEARTBEAT_S

Each process has 4 CPU devices; together they form the same 8-device mesh as
the single-process reference. Every process feeds only its half of the global
batch (``host_local_to_global``) and builds W from its own shards.
"""
from __future__ import annotations

import os
import sys

NUM_CLASSES, DIM, BATCH, LR = 61, 16, 16, 0.1


def global_problem():
    """The global batch and initial W, identical in every process."""
    import numpy as np

    rng = np.random.default_rng(2024)
    e = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    w = (0.01 * rng.normal(size=(NUM_CLASSES, DIM))).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)
    return e, w, y


def run_step(mesh, e_local, w_full, y_local, sample_rate=1.0):
    """One SGD(momentum) step of the sharded head on W and the embeddings.

    Returns (loss, new W (C_pad, D), new embeddings (B, D)) as global jax.Arrays.
    """
    import jax
    import numpy as np
    import optax

    from x2jax.parallel import (
        class_centers_sharding,
        host_local_to_global,
        num_class_shards,
        pad_num_classes,
    )
    from reference.head_step import make_head_step

    rows = pad_num_classes(NUM_CLASSES, num_class_shards(mesh))
    w_pad = np.pad(w_full, ((0, rows - NUM_CLASSES), (0, 0)))
    w = jax.make_array_from_callback(w_pad.shape, class_centers_sharding(mesh),
                                     lambda idx: w_pad[idx])
    batch = host_local_to_global({"e": e_local, "y": y_local}, mesh)
    step, init_opt = make_head_step(optax.sgd(LR, momentum=0.9), w_pad.shape,
                                    margin_fn="x2_softmax", mesh=mesh,
                                    num_classes=NUM_CLASSES, sample_rate=sample_rate)
    out = step(w, init_opt(w), batch["e"], batch["y"], jax.random.key(7))
    e_new = jax.jit(lambda e, g: e - LR * g)(batch["e"], out.grad_embeddings)
    return out.loss, out.weight, e_new


def collective_loop(port, pid, nproc, init_timeout_s, heartbeat_s):
    """A cross-process sum every 50 ms, forever; prints ``step N`` every 10 steps."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from x2jax.parallel import initialize_distributed, make_mesh

    assert initialize_distributed(f"127.0.0.1:{port}", nproc, pid,
                                  initialization_timeout_s=init_timeout_s,
                                  heartbeat_timeout_s=heartbeat_s)
    mesh = make_mesh()
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.ones((jax.local_device_count(),), np.float32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    step = 0
    while True:
        assert float(total(x)) == jax.device_count()
        step += 1
        if step % 10 == 0:
            print(f"step {step}", flush=True)
        time.sleep(0.05)


def main(argv):
    port, pid, nproc = int(argv[1]), int(argv[2]), int(argv[3])
    loop = argv[4] == "--loop"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={1 if loop else 4}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if loop:
        return collective_loop(port, pid, nproc, int(argv[5]), int(argv[6]))
    out_path = argv[4]
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from x2jax.parallel import initialize_distributed, make_mesh

    assert initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    assert jax.process_count() == nproc and jax.local_device_count() == 4
    mesh = make_mesh()
    e, w, y = global_problem()
    per = BATCH // nproc
    local = slice(pid * per, (pid + 1) * per)
    loss, w_new, e_new = run_step(mesh, e[local], w, y[local])
    # The new W stays split across the processes: each one holds only its rows.
    local_rows = sum(s.data.shape[0] for s in w_new.addressable_shards)
    w_all, e_all = multihost_utils.process_allgather((w_new, e_new), tiled=True)
    np.savez(out_path, loss=np.asarray(loss), w=np.asarray(w_all), e=np.asarray(e_all),
             local_rows=local_rows, process_count=jax.process_count())
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
