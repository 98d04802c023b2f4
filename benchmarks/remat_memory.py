"""Memory that gradient checkpointing (``model.remat``) saves: XLA's temporaries of a backbone's
training-mode gradient, with and without remat.

For each architecture and each ``remat`` value the script lowers and compiles (it runs
nothing) ``jax.grad`` of ``sum(embedding**2)`` through ``module.apply(..., train=True)``
(batch statistics, BatchNorm running-statistics update, the ViT's token masking and drop
path) on abstract inputs, and prints ``compiled.memory_analysis()``: the temporary buffer
(``temp_size_in_bytes``: activations kept for the backward pass and scratch), beside the
arguments (parameters, batch) and outputs (gradients), in MiB, and the temporaries
relative to ``remat="none"``.

    python benchmarks/remat_memory.py                       # r50, r18, vit_t on CPU, batch 32
    python benchmarks/remat_memory.py --archs vit_t,r50 --platform tpu --topology v5e:1x1

``--platform tpu`` compiles for one chip of a TPU slice on this host (libtpu, the ``tpu``
extra; ``x2jax.tpu.topology_devices``), in ``--dtype`` (default bfloat16 there).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MIB = 2**20


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_common.REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def measure(arch: str, remat: str, *, batch: int, image_size: int, dtype: str, device=None) -> dict:
    """``memory_analysis()`` of the compiled gradient of ``arch`` with ``remat`` (MiB) and compile seconds."""
    import jax
    import jax.numpy as jnp

    from x2jax import models

    module = models.get_model(arch, image_size=image_size, remat=remat, conv_impl="xla", dtype=dtype)
    sharding = jax.sharding.SingleDeviceSharding(device) if device is not None else None
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
    variables = jax.tree.map(place, models.abstract_variables(module))
    images = place(jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32))

    def loss(params, batch_stats, images, key):
        emb, updates = module.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": key})
        return jnp.sum(jnp.square(emb)), updates["batch_stats"]

    key = jax.eval_shape(lambda: jax.random.key(0))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(
        variables["params"], variables["batch_stats"], images, place(key)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes / MIB, "args": m.argument_size_in_bytes / MIB,
            "out": m.output_size_in_bytes / MIB, "compile_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="r50,r18,vit_t", help="comma-separated model names")
    parser.add_argument("--remats", default="none,blocks,dots_saveable",
                        help="comma-separated values of model.remat (x2jax.models.layers.REMAT_CHOICES)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--platform", default="cpu", choices=("cpu", "tpu"))
    parser.add_argument("--topology", default="v5e:1x1", help="TPU slice for --platform tpu (its first chip)")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 on TPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = _common.parse_cpu_args(parser)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    dtype = args.dtype or ("bfloat16" if args.platform == "tpu" else "float32")
    device = None
    if args.platform == "tpu":
        from x2jax.tpu import topology_devices

        device = topology_devices(args.topology)[0]
    import jax  # noqa: F401  (after the flags)

    where = f"TPU {args.topology} (one chip, compiled here)" if device is not None else "CPU"
    print(f"# remat memory: {where}, batch {args.batch}, {args.image_size}x{args.image_size}, {dtype}, "
          f"commit {_commit()}")
    print(f"# machine: {_common.machine_line()}", flush=True)
    rows = []
    for arch in [a for a in args.archs.split(",") if a]:
        base = None
        for remat in [r for r in args.remats.split(",") if r]:
            res = measure(arch, remat, batch=args.batch, image_size=args.image_size, dtype=dtype, device=device)
            base = res["temp"] if remat == "none" else base
            ratio = f"{res['temp'] / base:.2f}" if base else "-"
            rows.append([arch, remat, f"{res['temp']:.0f}", ratio, f"{res['args']:.0f}", f"{res['out']:.0f}",
                         f"{res['compile_s']:.1f}"])
            print(f"# {arch} {remat}: temp {res['temp']:.0f} MiB ({res['compile_s']:.0f} s to compile)", flush=True)
    print()
    print(_common.markdown_table(["arch", "remat", "temp MiB", "temp vs none", "arguments MiB", "outputs MiB",
                                  "compile s"], rows))


if __name__ == "__main__":
    main()
