"""Backbone training step on CPU (IResNet, ViT): x2jax (conv impl "xla" / "im2col" / "onednn") vs PyTorch.

Configs: ``jax-xla``, ``jax-im2col`` and ``jax-onednn`` (``conv_impl``; im2col =
matmul weight gradients where ``im2col_conv.weight_grad_method`` picks them; onednn
= ``x2jax.models.onednn_conv``, what "auto" picks on a one-device CPU process with the
``onednn`` extra), ``torch-nchw``,
``torch-channels_last``; optional ``jax-im2col_all`` (matmul weight gradient on
every conv) and ``jax-im2col_1x1`` (matmul weight gradient on 1x1 convs only).

One step = forward in train mode (batch statistics), loss ``mean(embedding**2)``,
backward, SGD momentum 0.9 + weight decay 5e-4 (optax / torch.optim.SGD), BN
running statistics updated. Same architecture on both sides (PyTorch:
``tests/reference/torch_iresnet.py`` / ``tests/reference/torch_vit.py``, insightface's module
structure). ViTs (``--arch vit_t`` ...) train as arcface_torch's do: token masking and drop
path on, fresh draws every step on both sides (x2jax: from the step's "dropout" key), the
attention softmax in float32; their only convolution is the patch embedding, so one JAX
config (``jax-xla``) and one torch config (``torch-nchw``) say it all.

Every configuration runs in a fresh subprocess so that ``ru_maxrss`` (peak RSS)
is its own; with ``--interleave`` all run in one process, timed round-robin
(fair when the machine's load changes; peak RSS then shared). Reported per configuration: compile seconds (JAX: ``lower`` +
``compile`` of the jitted step, no persistent cache; torch: none), median step
seconds over ``--steps`` timed steps after ``--warmup`` untimed ones, images/s,
peak RSS, and the ratio of images/s to the PyTorch configuration measured in
the same run (the faster of NCHW / channels_last).

    python benchmarks/backbone_step.py --arch r18 --batch 32
    python benchmarks/backbone_step.py --arch r50 --batch 32 --steps 3 --interleave \
        --configs jax-xla,jax-im2col,torch-channels_last   # ~3-6 min on 2 cores
    python benchmarks/backbone_step.py --arch vit_t --batch 32 --steps 3 --interleave \
        --configs jax-xla,torch-nchw

IResNet-50 at batch 32 costs 7-21 s per step on a 2-core CPU: keep
``--steps`` small there.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CONFIGS = ("jax-xla", "jax-im2col", "jax-onednn", "torch-nchw", "torch-channels_last")
# matmul weight gradient for every conv / for 1x1 convs only (XLA's own for the others)
EXTRA_CONFIGS = ("jax-im2col_all", "jax-im2col_1x1")
TORCH_ARCHS = {  # layers, widths (insightface IResNet; r18_tiny = x2jax's small CPU model)
    "r18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "r34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "r50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "r100": ((3, 13, 30, 3), (64, 128, 256, 512)),
    "r18_tiny": ((2, 2, 2, 2), (16, 32, 64, 128)),
}
VIT_ARCHS = ("vit_t", "vit_s", "vit_b", "vit_l")  # tests/reference/torch_vit.py VARIANTS


# ----------------------------------------------------------------------------- workers


def _build_jax(args, impl: str) -> tuple:
    sys.path.insert(0, _common.REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from x2jax.models import im2col_conv, layers, registry

    layers.register_conv_impl("im2col_all", functools.partial(im2col_conv.conv2d_im2col,
                                                              weight_grad="matmul"))

    def im2col_1x1(x, kernel, **kw):
        one = kernel.shape[:2] == (1, 1)
        return im2col_conv.conv2d_im2col(x, kernel, weight_grad="matmul" if one else "xla", **kw)

    layers.register_conv_impl("im2col_1x1", im2col_1x1)
    module = registry.get_model(args.arch, embedding_size=args.embedding, image_size=args.image_size,
                                conv_impl=impl)
    variables = registry.init_variables(module, jax.random.key(0))
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)
    images = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, args.image_size, args.image_size, 3), np.float32))

    def step(params, batch_stats, opt_state, key, images):
        key, dropout_key = jax.random.split(key)  # ViT: mask and drop path draws (IResNet: unused)

        def loss_fn(p):
            emb, updates = module.apply({"params": p, "batch_stats": batch_stats}, images,
                                        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
            return jnp.mean(jnp.square(emb)), updates["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, key, loss

    key = jax.random.key(1)
    compiled, compile_s, flops = _common.compile_with_flops(jax.jit(step, donate_argnums=(0, 1, 2)),
                                                           params, batch_stats, opt_state, key, images)
    state = [params, batch_stats, opt_state, key]

    def run():
        p, s, o, k, loss = compiled(*state, images)
        jax.block_until_ready(loss)
        state[:] = [p, s, o, k]

    return run, {"compile_s": compile_s, "xla_flops": flops, "jax": jax.__version__}


def _build_torch(args, channels_last: bool) -> tuple:
    sys.path.insert(0, os.path.join(_common.REPO, "tests"))
    import torch

    from reference import torch_iresnet, torch_vit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.arch in VIT_ARCHS:
        model = torch_vit.vit(args.arch, num_features=args.embedding, image_size=args.image_size).train()
    else:
        layers, widths = TORCH_ARCHS[args.arch]
        model = torch_iresnet.IResNet(layers, widths, num_features=args.embedding,
                                      image_size=args.image_size).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(images).square().mean()
        loss.backward()
        opt.step()

    return run, {"compile_s": 0.0, "torch": torch.__version__,
                 "torch_threads": torch.get_num_threads()}


def worker(args) -> None:
    """Builds every config of ``args.worker`` (comma-separated) in this process and times
    them (round-robin when there are several); prints one RESULT line per config."""
    runs, infos = {}, {}
    for config in args.worker.split(","):
        if config.startswith("jax-"):
            runs[config], infos[config] = _build_jax(args, config[len("jax-"):])
        else:
            runs[config], infos[config] = _build_torch(args, config == "torch-channels_last")
    times = _common.time_interleaved(runs, warmup=args.warmup, repeats=args.steps)
    rss = _common.peak_rss_gib()
    for config in runs:
        out = dict(infos[config], config=config, times=times[config],
                   peak_rss_gib=rss if len(runs) == 1 else None)
        print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="r18", choices=sorted(TORCH_ARCHS) + list(VIT_ARCHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {CONFIGS + EXTRA_CONFIGS}")
    parser.add_argument("--interleave", action="store_true",
                        help="build all configs in one process and time them round-robin "
                             "(fair under changing load; peak RSS then not per config)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = _common.parse_cpu_args(parser)
    if args.worker:
        worker(args)
        return

    configs = [c for c in args.configs.split(",") if c]
    bad = set(configs) - set(CONFIGS + EXTRA_CONFIGS)
    if bad:
        parser.error(f"unknown configs {sorted(bad)}; known: {CONFIGS}")
    print(f"# backbone step: {args.arch}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup, {args.threads} threads")
    print(f"# machine: {_common.machine_line()}", flush=True)
    results = {}
    groups = [",".join(configs)] if args.interleave else configs
    for group in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", group,
               "--arch", args.arch, "--batch", str(args.batch), "--image-size", str(args.image_size),
               "--embedding", str(args.embedding), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{group}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        for line in lines:
            res = json.loads(line[len("RESULT "):])
            res["step_s"] = _common.median(res["times"])
            res["images_per_s"] = args.batch / res["step_s"]
            results[res["config"]] = res
            print(f"# {res['config']}: steps {[round(t, 3) for t in res['times']]}", flush=True)
        print(f"# {group}: process done in {time.perf_counter() - t0:.0f} s", flush=True)

    torch_ref = max((results[c]["images_per_s"] for c in results if c.startswith("torch")),
                    default=None)
    xla_ref = results.get("jax-xla", {}).get("images_per_s")
    # XLA's cost analysis does not count custom calls (jax-onednn): every row uses the
    # largest count among the JAX programs, the same network's FLOPs.
    step_flops = max((res.get("xla_flops") or 0 for res in results.values()), default=0)
    rows = []
    for config, res in results.items():
        gflops = step_flops / res["step_s"] / 1e9 if step_flops else None
        rows.append([
            config, f"{res['compile_s']:.1f}", f"{res['step_s']:.3f}", f"{res['images_per_s']:.2f}",
            f"{res['peak_rss_gib']:.2f}" if res["peak_rss_gib"] is not None else "(shared)",
            f"{gflops:.1f}" if gflops else "-",
            f"{res['images_per_s'] / xla_ref:.2f}" if xla_ref else "-",
            f"{res['images_per_s'] / torch_ref:.2f}" if torch_ref else "-",
        ])
    print()
    print(_common.markdown_table(
        ["config", "compile s", "step s (median)", "images/s", "peak RSS GiB",
         "GFLOP/s (XLA count)", "vs jax-xla", "vs best torch"], rows))
    if step_flops:
        print(f"\nXLA cost analysis: {step_flops / 1e9:.1f} GFLOP per step (the largest count "
              f"among the JAX programs; used for every row's GFLOP/s)")
    print(f"# finished: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
