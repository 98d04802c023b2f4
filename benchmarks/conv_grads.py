"""Per-layer convolution timings on the IResNet-50 shapes: forward, input and weight gradient.

For every distinct conv of IResNet-50 at 112x112 (batch ``--batch``), times with
``jax.jit`` (round-robin, median of ``--repeats``):

* ``fwd``: ``lax.conv_general_dilated``;
* ``dx``: XLA's input gradient (transposed conv);
* ``dx phases``: ``im2col_conv``'s per-phase input gradient (one stride-1 conv per
  output phase; the same as ``dx`` at stride 1);
* ``dW xla``: XLA's weight gradient;
* ``dW matmul``: ``x2jax.models.im2col_conv``'s matmul weight gradient (``G^T @ P``);
* ``fwd im2col``: the forward as one im2col GEMM (for comparison only);
* ``fwd/dx/dW onednn``: ``x2jax.models.onednn_conv``'s three custom calls (oneDNN,
  the library PyTorch's CPU convolutions use; needs the ``onednn`` extra, else
  these columns are left out).

and the r50 totals (each shape times its count in the network). GFLOP/s =
``2 B H' W' C O KH KW`` / time for each column.

    python benchmarks/conv_grads.py               # batch 32, about a minute on 2 cores
    python benchmarks/conv_grads.py --batch 8 --repeats 3
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# (input side H, C, O, kernel, stride, count in IResNet-50)
R50_CONVS = [
    (112, 3, 64, 3, 1, 1), (112, 64, 64, 3, 1, 1), (112, 64, 64, 3, 2, 1), (112, 64, 64, 1, 2, 1),
    (56, 64, 64, 3, 1, 4), (56, 64, 128, 3, 1, 1), (56, 128, 128, 3, 2, 1), (56, 64, 128, 1, 2, 1),
    (28, 128, 128, 3, 1, 6), (28, 128, 256, 3, 1, 1), (28, 256, 256, 3, 2, 1), (28, 128, 256, 1, 2, 1),
    (14, 256, 256, 3, 1, 26), (14, 256, 512, 3, 1, 1), (14, 512, 512, 3, 2, 1), (14, 256, 512, 1, 2, 1),
    (7, 512, 512, 3, 1, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = _common.parse_cpu_args(parser)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, _common.REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from x2jax.models import im2col_conv, onednn_conv

    dn = ("NHWC", "HWIO", "NHWC")
    print(f"# conv timings, IResNet-50 shapes, batch {args.batch}, median of {args.repeats}")
    print(f"# machine: {_common.machine_line()}", flush=True)
    names = ("fwd", "dx", "dx phases", "dW xla", "dW matmul", "fwd im2col")
    if onednn_conv.available():
        names += ("fwd onednn", "dx onednn", "dW onednn")
        print(f"# oneDNN {onednn_conv.version()}")
    else:
        print("# oneDNN columns left out: the extension does not load (pip install -e '.[onednn]')")
    totals = dict.fromkeys(names, 0.0)
    rows = []
    for h, c, o, k, s, count in R50_CONVS:
        pad = ((k // 2, k // 2), (k // 2, k // 2))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((args.batch, h, h, c), np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, c, o), np.float32) / np.sqrt(k * k * c))
        conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)
        y = conv(x, w)
        g = jnp.ones_like(y)
        ho = y.shape[1]
        flops = 2.0 * args.batch * ho * ho * c * o * k * k

        def im2col_fwd(x, w):
            xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
            p = im2col_conv._patches(xp, k, k, (s, s), (ho, ho))
            return jnp.dot(p.reshape(-1, k * k * c), w.reshape(-1, o)).reshape(y.shape)

        fns = {
            "fwd": jax.jit(conv),
            "dx": jax.jit(lambda x, w: jax.vjp(lambda a: conv(a, w), x)[1](g)[0]),
            "dx phases": jax.jit(lambda x, w: im2col_conv._input_grad_phases(
                g, w, x.shape, (s, s), pad)),
            "dW xla": jax.jit(lambda x, w: jax.vjp(lambda b: conv(x, b), w)[1](g)[0]),
            "dW matmul": jax.jit(lambda x, w: im2col_conv._weight_grad_matmul(
                x, g, w.shape, (s, s), pad)),
            "fwd im2col": jax.jit(im2col_fwd),
        }
        if "fwd onednn" in names:
            call = functools.partial(onednn_conv._call, strides=(s, s), padding=pad)
            fns["fwd onednn"] = jax.jit(lambda x, w: call("forward", y.shape, x, w))
            fns["dx onednn"] = jax.jit(lambda x, w: call("input_grad", x.shape, g, w))
            fns["dW onednn"] = jax.jit(lambda x, w: call("weight_grad", w.shape, x, g))
        times = _common.time_interleaved(
            {n: (lambda f=f: jax.block_until_ready(f(x, w))) for n, f in fns.items()},
            warmup=1, repeats=args.repeats)
        med = {n: _common.median(t) for n, t in times.items()}
        for n in names:
            totals[n] += count * med[n]
        rows.append([f"{h}x{h} {c}->{o} k{k} s{s}", count]
                    + [f"{flops / med[n] / 1e9:.0f}" for n in names])
        print(f"# {rows[-1][0]} done", flush=True)
    print()
    print(_common.markdown_table(["conv (input side)", "count in r50"]
                                 + [f"{n} GFLOP/s" for n in names], rows))
    print()
    print(_common.markdown_table(["r50 total (s, x count)"] + list(names),
                                 [["seconds"] + [f"{totals[n]:.2f}" for n in names]]))
    print(f"# finished: load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
