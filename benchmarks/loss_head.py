"""Loss head forward+backward on CPU: x2jax X2-Softmax vs its floor vs PyTorch.

The head is ``cosine = normalize(E) @ normalize(W)^T`` (E (B, D), W (C, D)),
margin on the target column, scale, softmax cross-entropy, mean over the batch;
one "step" is the loss and its gradients w.r.t. E and W. Rows:

* ``x2jax x2_softmax``: ``x2jax.losses.margin_loss(E, W, y, "x2_softmax")``
  (official constants s=64, a=-0.9, h=0, k=0.65, straight-through gradient),
  which takes the library's fused path for target-only margins (one logsumexp
  forward, one elementwise backward over the (B, C) cosine);
* ``x2jax normface``: the same head with no margin (``"normface"``): the floor;
* ``x2jax arcface``: ``"arcface"`` (s=64, m=0.5);
* ``x2jax x2_softmax generic``: :func:`generic_head`, the generic path written
  here: ``cross_entropy(x2_softmax(cosine, y))`` on the (B, C) logits, as
  ``margin_loss`` computes a user-supplied margin function (checked against the
  fused row: loss and gradient differences are printed);
* ``x2jax x2_softmax sharded head``: ``x2jax.parallel.sharded_margin_loss`` (the
  training step's head) on a one-device mesh;
* ``torch x2_softmax``: PyTorch reference following the official code: the
  target logit replaced in place under ``torch.no_grad()``;
* ``torch arcface``: insightface ``CombinedMarginLoss`` (1, 0.5, 0) code path
  (``arccos_`` / ``cos_`` of the whole logit matrix under ``no_grad``).

GFLOP/s counts the three GEMMs only (forward ``E W^T`` and the two backward
products): ``6 B D C`` per step. The machine's float32 GEMM rate is measured
in the same round-robin as the heads (same load) on a square 2048^3 product
(``jnp.dot`` and ``torch.mm``) and on the head's own forward product shape
(``jnp.dot`` (B, D) x (D, C)).

    python benchmarks/loss_head.py                       # C = 93431 and 360232 (minutes)
    python benchmarks/loss_head.py --classes 20000 --repeats 3   # quick
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

DEFAULT_CLASSES = "93431,360232"  # MS1MV3, Glint360K
X2 = dict(scale=64.0, a=-0.9, h=0.0, k=0.65)


def generic_head(jnp, losses, margin_fn):
    """``margin_loss`` without the fused path: margin logits (B, C), then ``cross_entropy``."""
    def loss(emb, weight, labels, **params):
        cosine = losses.l2_normalize(emb) @ losses.l2_normalize(weight).T
        return jnp.mean(losses.cross_entropy(margin_fn(cosine, labels, **params), labels))

    return loss


def torch_x2_softmax_loss(torch, emb, weight, labels, *, scale=64.0, a=-0.9, h=0.0, k=0.65):
    """X2-Softmax as the official code does it: in-place target replacement under no_grad."""
    F = torch.nn.functional
    logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    index = torch.where(labels != -1)[0]
    target_logit = logits[index, labels[index].view(-1)]
    with torch.no_grad():
        theta = torch.arccos(target_logit)
        logits[index, labels[index].view(-1)] = a * (theta - h) ** 2 + k
    logits = logits * scale
    return F.cross_entropy(logits, labels)


def torch_arcface_loss(torch, emb, weight, labels, *, scale=64.0, m2=0.5):
    """insightface ``CombinedMarginLoss(s, 1.0, m2, 0.0)`` (ArcFace branch) + cross-entropy."""
    F = torch.nn.functional
    logits = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    index = torch.where(labels != -1)[0]
    target_logit = logits[index, labels[index].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        logits.arccos_()
        logits[index, labels[index].view(-1)] = target_logit + m2
        logits.cos_()
    logits = logits * scale
    return F.cross_entropy(logits, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated class counts")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-torch", action="store_true")
    args = _common.parse_cpu_args(parser)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, _common.REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from x2jax import losses
    from x2jax.parallel import make_mesh
    from x2jax.parallel.head import sharded_margin_loss

    torch = None
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            print("# torch not installed: PyTorch rows skipped")

    print(f"# loss head: B={args.batch}, D={args.dim}, forward+backward (dE, dW), "
          f"median of {args.repeats} after {args.warmup} warmup, {args.threads} threads")
    print(f"# machine: {_common.machine_line()}", flush=True)

    # GEMM rates: timed round-robin together with the heads (same load).
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    gemm_fns = {"jnp.dot 2048^3": (2 * n**3, lambda: dot(a, a).block_until_ready())}
    if torch is not None:
        ta = torch.from_numpy(np.array(a))
        gemm_fns["torch.mm 2048^3"] = (2 * n**3, lambda: torch.mm(ta, ta))

    rows, gemm_rows = [], []
    for num_classes in [int(c) for c in args.classes.split(",") if c]:
        rng = np.random.default_rng(1)
        emb_np = rng.standard_normal((args.batch, args.dim), np.float32)
        w_np = (0.01 * rng.standard_normal((num_classes, args.dim))).astype(np.float32)
        labels_np = rng.integers(0, num_classes, args.batch).astype(np.int32)
        emb, w, labels = jnp.asarray(emb_np), jnp.asarray(w_np), jnp.asarray(labels_np)
        flops = 6.0 * args.batch * args.dim * num_classes

        w_t = jnp.asarray(w_np.T.copy())
        head_dot = jax.jit(jnp.dot)
        gemms = dict(gemm_fns)
        gemms[f"jnp.dot ({args.batch},{args.dim})x({args.dim},{num_classes})"] = (
            2 * args.batch * args.dim * num_classes, lambda: head_dot(emb, w_t).block_until_ready())

        steps, compile_s, losses_seen, outs = {}, {}, {}, {}
        for name, params in (("normface", {}), ("x2_softmax", X2), ("arcface", {})):
            fn = jax.jit(jax.value_and_grad(
                lambda e, w, y, name=name, params=params: losses.margin_loss(e, w, y, name, **params),
                argnums=(0, 1)))
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(emb, w, labels))
            compile_s[f"x2jax {name}"] = time.perf_counter() - t0
            losses_seen[f"x2jax {name}"] = float(out[0])
            outs[name] = out
            steps[f"x2jax {name}"] = lambda fn=fn: jax.block_until_ready(fn(emb, w, labels))
        generic = jax.jit(jax.value_and_grad(
            lambda e, w, y: generic_head(jnp, losses, losses.x2_softmax)(e, w, y, **X2), argnums=(0, 1)))
        t0 = time.perf_counter()
        out = jax.block_until_ready(generic(emb, w, labels))
        compile_s["x2jax x2_softmax generic"] = time.perf_counter() - t0
        losses_seen["x2jax x2_softmax generic"] = float(out[0])
        steps["x2jax x2_softmax generic"] = lambda: jax.block_until_ready(generic(emb, w, labels))
        # The training step's head: x2jax.parallel.sharded_margin_loss on a one-device mesh.
        mesh = make_mesh(data=1, model=1, devices=jax.devices()[:1])
        sharded = jax.jit(jax.value_and_grad(
            lambda e, w, y: sharded_margin_loss(e, w, y, margin_fn="x2_softmax", mesh=mesh, **X2),
            argnums=(0, 1)))
        t0 = time.perf_counter()
        out_sharded = jax.block_until_ready(sharded(emb, w, labels))
        compile_s["x2jax x2_softmax sharded head"] = time.perf_counter() - t0
        losses_seen["x2jax x2_softmax sharded head"] = float(out_sharded[0])
        steps["x2jax x2_softmax sharded head"] = lambda: jax.block_until_ready(sharded(emb, w, labels))
        fused = outs["x2_softmax"]
        rel = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(fused[1], out[1])]
        print(f"# C={num_classes}: x2_softmax fused (margin_loss) vs generic: loss {float(fused[0]):.6f} vs "
              f"{float(out[0]):.6f}; max |grad diff| / max |grad|: dE {rel[0]:.1e}, dW {rel[1]:.1e}",
              flush=True)
        if torch is not None:
            te = torch.from_numpy(emb_np).requires_grad_(True)
            tw = torch.from_numpy(w_np).requires_grad_(True)
            ty = torch.from_numpy(labels_np.astype(np.int64))
            for name, loss_fn in (("x2_softmax", lambda: torch_x2_softmax_loss(torch, te, tw, ty, **X2)),
                                  ("arcface", lambda: torch_arcface_loss(torch, te, tw, ty))):
                def step(loss_fn=loss_fn):
                    te.grad = tw.grad = None
                    loss = loss_fn()
                    loss.backward()
                    return loss
                losses_seen[f"torch {name}"] = float(step().detach())
                steps[f"torch {name}"] = step
        for name, (_, fn) in gemms.items():
            steps["gemm " + name] = fn
        times = _common.time_interleaved(steps, warmup=args.warmup, repeats=args.repeats)
        gemm = {}
        for name, (gemm_flops, _) in gemms.items():
            gemm[name] = gemm_flops / _common.median(times.pop("gemm " + name)) / 1e9
            gemm_rows.append([num_classes, name, f"{gemm[name]:.1f}"])
        results = {name: (_common.median(t), compile_s.get(name, 0.0), losses_seen[name])
                   for name, t in times.items()}
        floor = results["x2jax normface"][0]
        gemm_rate = gemm["jnp.dot 2048^3"]
        for name, (t, compile_s, loss) in results.items():
            peer = results.get("torch " + name.split(" ")[1])
            rows.append([num_classes, name, f"{t:.3f}", f"{flops / t / 1e9:.1f}",
                         f"{100 * flops / t / 1e9 / gemm_rate:.0f}%",
                         f"{t / floor:.3f}",
                         f"{peer[0] / t:.2f}" if peer and name.startswith("x2jax") else "-",
                         f"{compile_s:.1f}" if name.startswith("x2jax") else "-", f"{loss:.4f}"])
        print(f"# C={num_classes} done", flush=True)

    print()
    print(_common.markdown_table(["timed with C", "GEMM (float32)", "GFLOP/s"], gemm_rows))
    print()
    print(_common.markdown_table(
        ["C", "head", "step s (median)", "GFLOP/s (6BDC)", "% of jnp.dot 2048^3",
         "time / x2jax normface", "torch time / this", "compile s", "loss"], rows))
    print(f"# finished: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
