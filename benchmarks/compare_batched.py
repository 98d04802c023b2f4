"""K runs of a comparison: one batched (vmapped) step against K train.py steps one after the other.

The default config (``configs/synthetic_tiny_x2softmax.py``: r18_tiny, batch 128,
32x32) with K = ``len(--losses) x --seeds`` runs (default 4 losses x 2 seeds = 8),
on JAX's single CPU device:

* ``sequential``: each run's own jitted train.py step (``build_step(...).train_step``,
  one compile per loss), the K runs stepped one after the other, as
  ``python -m x2jax.compare --sequential`` trains them (there: run after run);
* ``batched``: ``x2jax.compare``'s ``jit(vmap(step))`` over the K stacked states,
  the losses behind ``jax.lax.switch``, one step for all K runs.

Both step the same pre-loaded batches (the data pipeline is not timed; batched
mode loads one batch for all K runs, sequential mode one per run and step). A
repeat is ``--steps`` steps of all K runs; the modes run round-robin
(``_common.time_interleaved``) so that load changes hit both; total images/s =
K x steps x batch / median repeat. ``--impls`` picks the convolutions of both
modes (``auto`` = what training uses here: oneDNN with the ``onednn`` extra).

    python benchmarks/compare_batched.py                       # K = 8, auto convs
    python benchmarks/compare_batched.py --impls auto,im2col --steps 5 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIG = os.path.join(_common.REPO, "configs", "synthetic_tiny_x2softmax.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", default="x2_softmax,arcface,cosface,normface")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--impls", default="auto", help="conv implementations (comma-separated)")
    parser.add_argument("--steps", type=int, default=5, help="steps of every run per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = _common.parse_cpu_args(parser)

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from x2jax import losses
    from x2jax.compare import batched as B
    from x2jax.compare.runs import plan_comparison
    from x2jax.data import get_train_source
    from x2jax.models.layers import resolve_conv_impl
    from x2jax.parallel.mesh import make_mesh
    from x2jax.parallel.sharding import ShardingRules
    from x2jax.train import config as config_lib
    from x2jax.train.setup import build_step
    from x2jax.train.step import make_step_fn

    base = config_lib.load_config(CONFIG)
    d = base.data
    source = get_train_source(f"synthetic_{d.variant}", num_identities=d.num_identities,
                              images_per_identity=d.images_per_identity)
    num_classes, image_size = source.num_classes, int(source.image_size[0])
    batch_size, total_steps = d.batch_size, int(base.num_steps)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
                "label": rng.integers(0, num_classes, batch_size).astype(np.int32)} for _ in range(args.steps)]
    rules = ShardingRules.from_config(base.mesh.rules)
    device = jax.devices()[:1]

    fns, info = {}, []
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        base.model.conv_impl = impl
        comparison = plan_comparison(base, losses_text=args.losses, num_seeds=args.seeds, workdir="/tmp/unused")
        plans = comparison.runs
        k = len(plans)
        resolved = resolve_conv_impl(impl, num_devices=1)

        # sequential: train.py's jitted step of each loss, states of each run
        mesh = make_mesh(1, 1, devices=device)
        steps_of_loss = {}
        for p in plans:
            if p.loss.label not in steps_of_loss:
                steps_of_loss[p.loss.label] = build_step(p.config, mesh, rules, num_classes=num_classes,
                                                         image_size=image_size, total_steps=total_steps)
        seq_states = [steps_of_loss[p.loss.label].create_state(jax.random.PRNGKey(p.seed)) for p in plans]
        seq_batches = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]

        def sequential(plans=plans, steps_of_loss=steps_of_loss, seq_states=seq_states, seq_batches=seq_batches):
            out = None
            for i, p in enumerate(plans):
                for b in seq_batches:
                    seq_states[i], out = steps_of_loss[p.loss.label].train_step(seq_states[i], b)
            jax.block_until_ready((seq_states, out))

        # batched: one vmapped step for the K runs
        bmesh = B.run_mesh(device)
        plan = B.plan_batch(plans)
        step = build_step(plans[0].config, bmesh, rules, num_classes=num_classes, image_size=image_size,
                          total_steps=total_steps)
        step_fn = make_step_fn(model=step.model, tx=step.tx, schedule=step.schedule, mesh=bmesh,
                               num_classes=num_classes, branches=plan.branches, rules=rules)
        batched_step = B.make_batched_step(step_fn, bmesh)
        states = B.stack_states([step.create_state(jax.random.PRNGKey(p.seed)).replace(
            loss_state=losses.spec(p.loss.name).init_state()) for p in plans], plan, bmesh)
        run_args = jax.device_put(plan.run_args, NamedSharding(bmesh, P(B.RUN_AXIS)))
        rep_batches = [jax.device_put(b, NamedSharding(bmesh, P())) for b in batches]
        holder = {"states": states}
        t0 = time.perf_counter()
        holder["states"], m = batched_step(holder["states"], rep_batches[0], run_args)
        jax.block_until_ready(m)
        batched_compile_s = time.perf_counter() - t0

        def batched(holder=holder, run_args=run_args, rep_batches=rep_batches, batched_step=batched_step):
            out = None
            for b in rep_batches:
                holder["states"], out = batched_step(holder["states"], b, run_args)
            jax.block_until_ready((holder["states"], out))

        fns[f"sequential {impl}"] = sequential
        fns[f"batched {impl}"] = batched
        info.append((impl, resolved, k, len(plan.branches), batched_compile_s))

    times = _common.time_interleaved(fns, warmup=args.warmup, repeats=args.repeats)
    k = info[0][2]
    images = k * args.steps * batch_size
    rows = []
    for impl, resolved, _, branches, compile_s in info:
        seq = _common.median(times[f"sequential {impl}"])
        bat = _common.median(times[f"batched {impl}"])
        rows.append([f"sequential ({k} x train.py step)", f"{impl} ({resolved})", f"{images / seq:.0f}",
                     f"{seq / args.steps / k * 1000:.0f}", "1.00"])
        rows.append([f"batched (vmap, {branches} loss branches)", f"{impl} ({resolved})", f"{images / bat:.0f}",
                     f"{bat / args.steps / k * 1000:.0f}", f"{seq / bat:.2f}"])
    print(f"K = {k} runs ({args.losses} x {args.seeds} seeds) of {os.path.relpath(CONFIG, _common.REPO)}: "
          f"batch {batch_size}, {image_size}x{image_size}, {num_classes} classes; {args.steps} steps a repeat, "
          f"median of {args.repeats} (warm-up {args.warmup}); batched first step (compile) "
          + ", ".join(f"{i[0]}: {i[4]:.1f} s" for i in info))
    print()
    print(_common.markdown_table(["mode", "conv impl", "total images/s", "ms per run-step", "speed-up vs sequential"],
                                 rows))
    print()
    print(_common.machine_line())


if __name__ == "__main__":
    main()
