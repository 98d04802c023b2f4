"""One-GPU comparison: x2jax bfloat16 vs PyTorch AMP float16 (backbone step, loss head).

Needs ``jax[cuda]`` and a CUDA build of torch (2.13) on a machine with one GPU;
on a machine without a GPU it prints why and exits 0 (``--smoke-cpu`` runs the
same code paths on CPU with tiny sizes, to check the script itself).

Backbone step (IResNet r50 / r100, 112x112, batch 128): forward in train mode,
loss ``mean(embedding**2)``, backward, SGD momentum 0.9 + weight decay 5e-4.

* x2jax: ``get_model(arch, dtype="bfloat16", conv_impl="xla")`` (params float32,
  compute bfloat16), jitted step with donated state;
* PyTorch: ``tests/reference/torch_iresnet.py`` (insightface structure), channels_last,
  ``torch.autocast("cuda", torch.float16)`` + ``GradScaler``, cudnn.benchmark
  (insightface's fp16 recipe).

MFU = (training FLOPs per step) / step time / peak. Training FLOPs are counted
analytically as 3x the forward multiply-adds x 2 of every conv and the fc layer
(forward, input gradient, weight gradient; the stem's unneeded input gradient
included, < 0.1 %); the XLA cost-analysis count of the compiled jax step is
printed alongside. Peak dense bf16/fp16 tensor-core rate: H100 SXM and H200 989
TFLOP/s (``--peak-tflops`` for other devices).

Loss head (B=512, D=512, C in {93431, 360232}): forward+backward of
``x2jax.losses.margin_loss`` (X2-Softmax; float32 math, XLA's default matmul
precision on GPU) vs the PyTorch official-pattern X2-Softmax from
``benchmarks/loss_head.py`` with the logits product under float16 autocast, as
insightface's Partial FC does.

    python benchmarks/gpu_compare.py                      # r50, r100 at batch 128 + loss head
    python benchmarks/gpu_compare.py --archs r50 --batch 256 --no-head
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 / fp16 tensor core (SXM)
TORCH_ARCHS = {
    "r18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "r34": ((3, 4, 6, 3), (64, 128, 256, 512)),
    "r50": ((3, 4, 14, 3), (64, 128, 256, 512)),
    "r100": ((3, 13, 30, 3), (64, 128, 256, 512)),
    "r200": ((6, 26, 60, 6), (64, 128, 256, 512)),
    "r18_tiny": ((2, 2, 2, 2), (16, 32, 64, 128)),
}


def iresnet_forward_flops(arch: str, image_size: int = 112, embedding: int = 512) -> float:
    """Forward FLOPs (2 x multiply-adds) of one image through IResNet ``arch`` (convs + fc)."""
    layers, widths = TORCH_ARCHS[arch]
    s = image_size
    flops = 2.0 * s * s * 3 * widths[0] * 9  # stem 3x3
    cin = widths[0]
    for blocks, planes in zip(layers, widths):
        # first block: conv1 3x3 s1 at s (cin->planes), conv2 3x3 s2 (planes->planes), 1x1 s2 shortcut
        flops += 2.0 * s * s * cin * planes * 9
        s //= 2
        flops += 2.0 * s * s * planes * planes * 9 + 2.0 * s * s * cin * planes
        flops += (blocks - 1) * 2 * (2.0 * s * s * planes * planes * 9)
        cin = planes
    flops += 2.0 * (widths[-1] * s * s) * embedding
    return flops


def gpu_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    name = gpu_name()
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


# ----------------------------------------------------------------------------- backbone


def jax_backbone(args, arch: str, batch: int, sync) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from x2jax.models import registry

    module = registry.get_model(arch, embedding_size=512, image_size=args.image_size,
                                dtype=args.jax_dtype, conv_impl="xla")
    variables = registry.init_variables(module, jax.random.key(0))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
    images = jnp.asarray(np.random.default_rng(0).standard_normal(
        (batch, args.image_size, args.image_size, 3), np.float32))

    def step(params, batch_stats, opt_state, images):
        def loss_fn(p):
            emb, upd = module.apply({"params": p, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.square(emb.astype(jnp.float32))), upd["batch_stats"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    compiled, compile_s, xla_flops = _common.compile_with_flops(jax.jit(step, donate_argnums=(0, 1, 2)),
                                                               *state, images)

    def run():
        p, s, o, loss = compiled(*state, images)
        jax.block_until_ready(loss)
        state[:] = [p, s, o]

    times = _common.time_fn(run, warmup=args.warmup, repeats=args.repeats)
    peak_mem = None
    try:
        peak_mem = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    except Exception:
        pass
    return {"step_s": _common.median(times), "compile_s": compile_s, "xla_flops": xla_flops,
            "peak_mem": peak_mem}


def torch_backbone(args, arch: str, batch: int) -> dict:
    import torch
    sys.path.insert(0, os.path.join(_common.REPO, "tests"))
    from reference import torch_iresnet

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp_dtype = torch.float16 if dev == "cuda" else torch.bfloat16
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    layers, widths = TORCH_ARCHS[arch]
    model = torch_iresnet.IResNet(layers, widths, num_features=512, image_size=args.image_size)
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=dev)
    images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev, enabled=dev == "cuda")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp_dtype):
            loss = model(images).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _common.time_fn(run, warmup=args.warmup, repeats=args.repeats)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return {"step_s": _common.median(times), "compile_s": 0.0, "peak_mem": peak}


# ----------------------------------------------------------------------------- loss head


def head_rows(args, sync_torch) -> list[list[str]]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import loss_head
    from x2jax import losses

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    amp_dtype = torch.float16 if dev == "cuda" else torch.bfloat16
    rows = []
    for num_classes in args.classes:
        rng = np.random.default_rng(1)
        e_np = rng.standard_normal((args.head_batch, 512), np.float32)
        w_np = (0.01 * rng.standard_normal((num_classes, 512))).astype(np.float32)
        y_np = rng.integers(0, num_classes, args.head_batch).astype(np.int32)
        flops = 6.0 * args.head_batch * 512 * num_classes
        e, w, y = jnp.asarray(e_np), jnp.asarray(w_np), jnp.asarray(y_np)
        fn = jax.jit(jax.value_and_grad(
            lambda e, w, y: losses.margin_loss(e, w, y, "x2_softmax", **loss_head.X2), argnums=(0, 1)))
        jax.block_until_ready(fn(e, w, y))
        t_jax = _common.median(_common.time_fn(lambda: jax.block_until_ready(fn(e, w, y)),
                                               warmup=args.warmup, repeats=args.repeats))
        te = torch.from_numpy(e_np).to(dev).requires_grad_(True)
        tw = torch.from_numpy(w_np).to(dev).requires_grad_(True)
        ty = torch.from_numpy(y_np.astype(np.int64)).to(dev)

        def step():
            te.grad = tw.grad = None
            with torch.autocast(dev, dtype=amp_dtype):
                loss = loss_head.torch_x2_softmax_loss(torch, te, tw, ty, **loss_head.X2)
            loss.backward()
            sync_torch()

        t_torch = _common.median(_common.time_fn(step, warmup=args.warmup, repeats=args.repeats))
        for name, t in (("x2jax x2_softmax (f32 math)", t_jax), ("torch x2_softmax (fp16 autocast)", t_torch)):
            rows.append([str(num_classes), name, f"{t * 1e3:.2f}", f"{flops / t / 1e12:.1f}",
                         f"{t_torch / t:.2f}"])
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="r50,r100")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", default="93431,360232")
    parser.add_argument("--head-batch", type=int, default=512)
    parser.add_argument("--no-head", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--jax-dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s of this GPU (known: H100, H200)")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="run the code paths on CPU with tiny sizes (script check only)")
    args = parser.parse_args()
    args.classes = [int(c) for c in args.classes.split(",") if c]
    sys.path.insert(0, _common.REPO)

    if args.smoke_cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.archs, args.batch, args.image_size = "r18_tiny", 4, 32
        args.repeats, args.warmup, args.classes, args.head_batch = 1, 1, [1000], 16
    import jax
    if not args.smoke_cpu and jax.default_backend() != "gpu":
        print(f"gpu_compare: no GPU visible to JAX (backend {jax.default_backend()!r}); "
              "this script needs jax[cuda] and torch with CUDA on a GPU machine. Skipped.")
        return
    try:
        import torch
    except ImportError:
        torch = None
        args.no_torch = args.no_head = True
        print("# torch not installed: PyTorch rows and the head comparison skipped")
    if torch is not None and not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_compare: torch has no CUDA device; PyTorch rows skipped")
        args.no_torch = args.no_head = True

    device = str(jax.devices()[0].device_kind) if not args.smoke_cpu else "cpu (smoke)"
    peak = None if args.smoke_cpu else peak_flops(args)
    print(f"# gpu_compare on {device}; jax {jax.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else "")
          + (f"; peak {peak / 1e12:.0f} TFLOP/s" if peak else "; peak unknown (MFU not shown)"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, median of {args.repeats} after {args.warmup} warmup",
          flush=True)

    def sync_torch():
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()

    rows = []
    for arch in [a for a in args.archs.split(",") if a]:
        train_flops = 3.0 * iresnet_forward_flops(arch, args.image_size) * args.batch
        configs = [(f"x2jax {args.jax_dtype}", lambda: jax_backbone(args, arch, args.batch, sync_torch))]
        if not args.no_torch:
            configs.append(("torch amp fp16" if not args.smoke_cpu else "torch amp bf16 (cpu)",
                            lambda: torch_backbone(args, arch, args.batch)))
        results = {}
        for name, fn in configs:
            results[name] = fn()
            print(f"# {arch} {name}: {results[name]['step_s'] * 1e3:.1f} ms/step", flush=True)
        torch_ips = next((args.batch / r["step_s"] for n, r in results.items() if n.startswith("torch")), None)
        for name, r in results.items():
            achieved = train_flops / r["step_s"]
            rows.append([arch, name, f"{r['step_s'] * 1e3:.1f}", f"{args.batch / r['step_s']:.0f}",
                         f"{achieved / 1e12:.1f}",
                         f"{100 * achieved / peak:.1f}%" if peak else "-",
                         f"{r['xla_flops'] / 1e9:.0f}" if r.get("xla_flops") else "-",
                         f"{r['peak_mem'] / 2**30:.1f}" if r.get("peak_mem") else "-",
                         f"{r['compile_s']:.0f}" if name.startswith("x2jax") else "-",
                         f"{args.batch / r['step_s'] / torch_ips:.2f}" if torch_ips else "-"])
    print()
    print(_common.markdown_table(
        ["arch", "framework", "ms/step", "images/s", "TFLOP/s (analytic)", "MFU",
         "XLA GFLOP/step", "peak GiB", "compile s", "vs torch"], rows))
    print("\nanalytic training GFLOP per image: "
          + ", ".join(f"{a} {3 * iresnet_forward_flops(a, args.image_size) / 1e9:.1f}"
                      for a in args.archs.split(",") if a))

    if not args.no_head:
        print()
        print(_common.markdown_table(["C", "head", "ms/step", "TFLOP/s (6BDC)", "torch time / this"],
                                     head_rows(args, sync_torch)))


if __name__ == "__main__":
    main()
