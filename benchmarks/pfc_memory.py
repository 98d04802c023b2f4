"""Partial FC head alone, compiled for a TPU topology: per-chip HBM of the dense and the row-sparse update.

The head step of a training step with the backbone cut off: global embeddings (B, 512)
in, the margin loss over W (C rows split over every chip), its gradient, the SGD
update of W and its momentum (0.9, weight decay 5e-4), W and the momentum donated.
Modes (comma-separated ``kind:W dtype:momentum dtype``):

* ``dense:float32:float32``: W's dense gradient and ``masked_row_updates`` (the step's
  ``loss.head_update="dense"``);
* ``sparse:<dtype>:<dtype>``: ``select_rows`` -> ``gather_rows`` -> the loss on the
  gathered rows -> ``row_sparse_sgd`` (the step's default with SGD).

Each compile (libtpu, no TPU needed) prints arguments, temporaries and the total per
chip; a mode that does not fit prints the compiler's out-of-memory line.

    python benchmarks/pfc_memory.py --topology v6e:2x4 --num-classes 60000000 --batch 1024 \\
        --sample-rate 0.1 --modes sparse:bfloat16:bfloat16,sparse:float32:float32,dense:float32:float32
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; no TPU is opened

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from x2jax import tpu  # noqa: E402
from x2jax.parallel import (  # noqa: E402
    batch_sharding,
    class_centers_sharding,
    gather_rows,
    masked_row_updates,
    opt_state_shardings,
    replicated,
    row_sparse_sgd,
    select_rows,
    sharded_margin_loss,
)
from x2jax.train.state import checkpoint_class_rows  # noqa: E402

GIB = 2**30


def compile_head_step(mesh, mode: str, num_classes: int, batch: int, sample_rate: float, dim: int = 512):
    """``jax.stages.Compiled`` of one head step of ``mode`` (see the module docstring)."""
    kind, w_dtype, m_dtype = mode.split(":")
    rows = checkpoint_class_rows(num_classes, mesh.size)
    lr = optax.constant_schedule(0.1)
    if kind == "dense":
        tx = masked_row_updates(optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)))
    else:
        tx = row_sparse_sgd(lr, momentum=0.9, weight_decay=5e-4, momentum_dtype=m_dtype)
    wsh = class_centers_sharding(mesh)
    w = {"weight": jax.ShapeDtypeStruct((rows, dim), jnp.dtype(w_dtype), sharding=wsh)}
    state_sh = opt_state_shardings(tx, jax.eval_shape(tx.init, w), {"weight": wsh}, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(tx.init, w), state_sh)

    def step(p, s, e, y, key):
        def head(weight, e, sample=None):
            return sharded_margin_loss(e, weight, y, margin_fn="x2_softmax", mesh=mesh, num_classes=num_classes,
                                       sample_rate=sample_rate, rng=key, rows=sample, return_aux=True)
        if kind == "dense":
            (loss, aux), (g, ge) = jax.value_and_grad(lambda p, e: head(p["weight"], e), argnums=(0, 1),
                                                      has_aux=True)(p, e)
            u, s = tx.update(g, s, p, row_mask=aux.row_mask)
            return optax.apply_updates(p, u), s, loss, ge
        sample = select_rows(y, key, mesh=mesh, num_rows=rows, num_classes=num_classes, sample_rate=sample_rate)
        values = gather_rows(p["weight"], sample)
        (loss, _), (g, ge) = jax.value_and_grad(lambda v, e: head(v, e, sample), argnums=(0, 1),
                                                has_aux=True)(values, e)
        new_w, s = tx.update({"weight": g}, s, p, rows=sample, row_values=values)
        return new_w, s, loss, ge

    bsh, rep = batch_sharding(mesh), replicated(mesh)
    jitted = jax.jit(step, in_shardings=({"weight": wsh}, state_sh, bsh, bsh, rep),
                     out_shardings=({"weight": wsh}, state_sh, rep, bsh), donate_argnums=(0, 1))
    return jitted.lower(w, state, jax.ShapeDtypeStruct((batch, dim), jnp.float32),
                        jax.ShapeDtypeStruct((batch,), jnp.int32),
                        jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v6e:2x4")
    p.add_argument("--num-classes", type=int, default=60_000_000)
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--modes", default="sparse:bfloat16:bfloat16,sparse:float32:float32,dense:float32:float32")
    args = p.parse_args()
    mesh = tpu.topology_mesh(args.topology)
    for mode in args.modes.split(","):
        t = time.time()
        try:
            m = compile_head_step(mesh, mode, args.num_classes, args.batch, args.sample_rate).memory_analysis()
        except Exception as e:  # noqa: BLE001 (the compiler's out-of-memory refusal)
            print(f"{mode}: does not compile: {str(e).splitlines()[0][:240]}", flush=True)
            continue
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        print(f"{args.topology} C={args.num_classes} B={args.batch} rate={args.sample_rate} {mode}: "
              f"arguments {m.argument_size_in_bytes / GIB:.2f} GiB, temporaries {m.temp_size_in_bytes / GIB:.2f} GiB, "
              f"total {total / GIB:.2f} GiB per chip ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
