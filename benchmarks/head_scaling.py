"""Class-sharded head: memory per device and step time as the class count grows.

Runs one subprocess per device count (``--xla_force_host_platform_device_count``),
trains the head alone (W (C, 512) + SGD momentum 0.9 + weight decay 5e-4,
global batch 128 of random embeddings) with ``x2jax.parallel.make_head_step``
and prints a markdown table:

* ``W+grad+opt / device``: bytes of this device's rows of W, of its gradient
  (dense, same shape) and of the momentum;
* ``XLA peak / device``: ``compiled.memory_analysis()`` arguments + temporaries
  (outputs alias the donated W and momentum);
* step time: best (min) of ``--steps`` steps after one warm-up step; for 1
  device also a plain jitted ``losses.margin_loss`` (gradients of W and of
  the embeddings) + optax step on the same batch (the unsharded peer), its
  steps interleaved with ours, and the ratio peer / ours.

``--max-classes`` fits bytes(C) = a + b * C per host from two compiled sizes
(no allocation) and reports the largest C whose step fits in the host memory
budget; ``--verify`` then trains one step at the largest C that fits in the
memory available *now* (minus a headroom) and reports its peak RSS.

Simulated devices share the host's RAM and cores: 8 of them hold the same
total bytes as 1 device, and no speed-up is expected on a 2-core CPU. The
per-device column is what one accelerator would need.

    python benchmarks/head_scaling.py                       # table
    python benchmarks/head_scaling.py --max-classes --verify
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_CASES = "93431:1.0,360232:1.0,2059906:0.1"  # MS1MV3, Glint360K, WebFace42M
GiB = 2**30


def _parse_cases(text):
    out = []
    for item in text.split(","):
        c, r = item.split(":")
        out.append((int(c), float(r)))
    return out


# ----------------------------------------------------------------------------- worker


def _setup(n):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)


def _compiled_step(num_classes, rate, args):
    import jax
    import jax.numpy as jnp
    import optax

    from x2jax.parallel import (
        batch_sharding,
        class_centers_sharding,
        make_mesh,
        num_class_shards,
        pad_num_classes,
    )
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from reference.head_step import make_head_step

    mesh = make_mesh()
    rows = pad_num_classes(num_classes, num_class_shards(mesh))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    step, init_opt = make_head_step(tx, (rows, args.dim), margin_fn="x2_softmax", mesh=mesh,
                                    num_classes=num_classes, sample_rate=rate)
    w = jax.ShapeDtypeStruct((rows, args.dim), jnp.float32, sharding=class_centers_sharding(mesh))
    st = jax.eval_shape(init_opt, w)
    e = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32, sharding=batch_sharding(mesh))
    y = jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=batch_sharding(mesh))
    t = time.perf_counter()
    compiled = step.lower(w, st, e, y, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes
    return mesh, rows, compiled, init_opt, compile_s, peak


def _make_peer(num_classes, args, e, y):
    """Unsharded peer: jit(margin_loss grads for W and embeddings + optax) on one device.

    Returns ``run()`` doing one timed step (state kept inside), after one
    compile step.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from x2jax import losses

    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))

    def step(w, st, e, y):
        # Like the head step: gradients for W and for the embeddings (the backbone's input).
        g_e, g_w = jax.grad(losses.margin_loss, argnums=(0, 1))(e, w, y, losses.x2_softmax)
        u, st = tx.update(g_w, st, w)
        return optax.apply_updates(w, u), st, g_e

    step = jax.jit(step, donate_argnums=(0, 1))
    w = 0.01 * jax.random.normal(jax.random.key(0), (num_classes, args.dim), jnp.float32)
    state = list(step(w, tx.init(w), e, y)[:2])
    jax.block_until_ready(state)

    def run():
        t = time.perf_counter()
        w, st, g_e = step(*state, e, y)
        jax.block_until_ready((w, st, g_e))
        state[:] = [w, st]
        return time.perf_counter() - t

    return run


def worker(args):
    _setup(args.worker)
    import jax
    import numpy as np

    from x2jax.parallel import batch_sharding, init_class_centers, replicated

    n = jax.device_count()
    rng = np.random.default_rng(0)
    e_host = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
    for num_classes, rate in _parse_cases(args.cases):
        mesh, rows, step, init_opt, compile_s, peak = _compiled_step(num_classes, rate, args)
        y_host = rng.integers(0, num_classes, args.batch).astype(np.int32)
        e, y = jax.device_put((e_host, y_host), batch_sharding(mesh))
        keys = [jax.device_put(jax.random.key(i), replicated(mesh)) for i in range(args.steps + 1)]
        w = init_class_centers(jax.random.key(0), num_classes, args.dim, mesh)
        st = init_opt(w)
        shard_bytes = w.addressable_shards[0].data.nbytes
        opt_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(st)
                        if leaf.ndim)
        t0 = time.perf_counter()
        out = step(w, st, e, y, keys[0])
        jax.block_until_ready(out.weight)
        first = time.perf_counter() - t0
        # The peer's steps alternate with ours, so both see the same machine load.
        peer = (_make_peer(num_classes, args, e_host, y_host)
                if n == 1 and rate == 1.0 and args.peer else None)
        times, peer_times = [], []
        for i in range(args.steps):
            t = time.perf_counter()
            out = step(out.weight, out.opt_state, e, y, keys[i + 1])
            jax.block_until_ready(out.weight)
            times.append(time.perf_counter() - t)
            if peer is not None:
                peer_times.append(peer())
        loss = float(out.loss)
        del w, st, out, peer
        print(json.dumps({
            "devices": n, "classes": num_classes, "rows": rows, "sample_rate": rate,
            "state_bytes_per_device": 2 * shard_bytes + opt_bytes, "xla_peak_per_device": peak,
            "compile_s": compile_s, "first_step_s": first, "step_s": min(times),
            "peer_step_s": min(peer_times) if peer_times else None, "loss": loss,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def max_classes_worker(args):
    """Linear fit of per-host XLA peak bytes in C, from two compiled sizes."""
    _setup(args.worker)
    import jax

    n = jax.device_count()
    for rate in (1.0, 0.1):
        c1, c2 = 1_000_000, 2_000_000
        p1 = _compiled_step(c1, rate, args)[-1] * n
        p2 = _compiled_step(c2, rate, args)[-1] * n
        b = (p2 - p1) / (c2 - c1)
        a = p1 - b * c1
        budget = args.host_gib * GiB - args.reserve_gib * GiB
        cmax = int((budget - a) / b)
        print(json.dumps({"devices": n, "sample_rate": rate, "bytes_per_class": b, "fixed_bytes": a,
                              "budget": budget, "max_classes": cmax}), flush=True)


def verify_worker(args):
    """One real step at --verify-classes; reports predicted peak and measured RSS."""
    _setup(args.worker)
    import jax
    import numpy as np

    from x2jax.parallel import init_class_centers

    c, rate = args.verify_classes, args.verify_rate
    mesh, _, step, init_opt, _, peak = _compiled_step(c, rate, args)
    n = jax.device_count()
    from x2jax.parallel import batch_sharding, replicated

    rng = np.random.default_rng(0)
    e = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
    y = rng.integers(0, c, args.batch).astype(np.int32)
    e, y = jax.device_put((e, y), batch_sharding(mesh))
    w = init_class_centers(jax.random.key(0), c, args.dim, mesh)
    st = init_opt(w)
    t = time.perf_counter()
    out = step(w, st, e, y, jax.device_put(jax.random.key(1), replicated(mesh)))
    jax.block_until_ready(out.weight)
    print(json.dumps({"devices": n, "classes": c, "sample_rate": rate, "predicted_peak": peak * n,
                          "step_s": time.perf_counter() - t, "loss": float(out.loss),
                          "finite": bool(np.isfinite(float(out.loss))),
                          "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


# ----------------------------------------------------------------------------- driver


def _run(args, n, mode, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--mode", mode,
           "--batch", str(args.batch), "--dim", str(args.dim), "--steps", str(args.steps),
           "--cases", args.cases, "--host-gib", str(args.host_gib),
           "--reserve-gib", str(args.reserve_gib), *extra]
    if not args.peer:
        cmd.append("--no-peer")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker ({n} devices, {mode}) failed with {proc.returncode}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cases", default=DEFAULT_CASES, help="C:sample_rate,...")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-peer", dest="peer", action="store_false")
    p.add_argument("--max-classes", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--host-gib", type=float, default=24.0)
    p.add_argument("--reserve-gib", type=float, default=2.0,
                   help="host memory kept for the OS, Python and the XLA runtime")
    p.add_argument("--headroom-gib", type=float, default=6.0,
                   help="--verify leaves this much of the memory available now unused")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="table", help=argparse.SUPPRESS)
    p.add_argument("--verify-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--verify-rate", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        {"table": worker, "max": max_classes_worker, "verify": verify_worker}[args.mode](args)
        return

    print(f"# head scaling: batch {args.batch}, D {args.dim}, x2_softmax, SGD momentum 0.9 + wd 5e-4, "
          f"best of {args.steps} steps (min: robust to other load), float32")
    print("| devices | classes C | sample rate | W+grad+opt / device | XLA peak / device "
          "| process peak RSS | compile s | 1st step s | step s | plain margin_loss step s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.devices:
        for r in _run(args, n, "table"):
            peer = r["peer_step_s"]
            peer_s = "" if peer is None else f"{peer:.2f}"
            ratio = "" if peer is None else f"{peer / r['step_s']:.2f}x"
            print(f"| {r['devices']} | {r['classes']:,} | {r['sample_rate']:g} "
                  f"| {r['state_bytes_per_device'] / GiB:.3f} GiB "
                  f"| {r['xla_peak_per_device'] / GiB:.3f} GiB | {r['maxrss'] / GiB:.2f} GiB "
                  f"| {r['compile_s']:.1f} | {r['first_step_s']:.1f} "
                  f"| {r['step_s']:.2f} | {peer_s} | {ratio} |", flush=True)
    if args.max_classes or args.verify:
        fits = {}
        print(f"\n# largest C per host ({args.host_gib:g} GiB, {args.reserve_gib:g} GiB reserved)")
        print("| devices | sample rate | bytes / class (host) | fixed bytes | largest C |")
        print("|---|---|---|---|---|")
        for n in args.devices:
            for r in _run(args, n, "max"):
                fits[(n, r["sample_rate"])] = r
                print(f"| {n} | {r['sample_rate']:g} | {r['bytes_per_class']:,.0f} "
                      f"| {r['fixed_bytes'] / GiB:.2f} GiB | {r['max_classes']:,} |", flush=True)
        if args.verify:
            for rate in (1.0, 0.1):
                fit = fits[(args.devices[0], rate)]
                avail = _mem_available() - args.headroom_gib * GiB
                c = min(fit["max_classes"],
                        int((avail - fit["fixed_bytes"]) / fit["bytes_per_class"]))
                c = c // 1000 * 1000
                r = _run(args, args.devices[0], "verify",
                         ["--verify-classes", str(c), "--verify-rate", str(rate)])[0]
                print(f"\nverified one step: devices {r['devices']}, C {c:,}, sample rate {rate:g}: "
                      f"predicted {r['predicted_peak'] / GiB:.2f} GiB, peak RSS "
                      f"{r['maxrss'] / GiB:.2f} GiB, step {r['step_s']:.1f} s (incl. compile), "
                      f"loss finite: {r['finite']}  (limited by {avail / GiB:.1f} GiB available now"
                      f"{'' if c < fit['max_classes'] else '; at the predicted maximum'})",
                      flush=True)


if __name__ == "__main__":
    main()
