"""x2jax.models.onednn_conv over a grid of shapes: forward, input and weight gradient equal
XLA's conv and a float64 direct sum, and no shape crashes the process.

The grid is a covering design, not the full product: every (kernel, stride, padding) of
kernel {1, 3, 7} x stride {1, 2} x padding {0, 1, 3}, every (C, O) pair of
:data:`CHANNELS`, odd and even sizes from 7 to 113 px (square and not), asymmetric padding,
IResNet's widths, and the strided 1x1 shapes whose weight gradient oneDNN's jit 1x1
kernels corrupted the heap on. Cases run in subprocesses, one per family (kernel size), so
a crash fails the test instead of killing the test run; a family that crashes is rerun case
by case to name the shape. :func:`x2jax.models.onednn_conv.covered` (what
``conv_impl="auto"`` sends to oneDNN) must name exactly what this grid holds.

Run as ``python tests/test_onednn_grid.py INDEX...`` it is the worker: it runs those cases of
:data:`CASES` in one jit and prints one JSON line of their errors.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_im2col_conv import _numpy_reference

from x2jax.models import onednn_conv

ROOT = Path(__file__).resolve().parent.parent

CHANNELS = (1, 3, 4, 8, 12, 15, 16, 17, 64)
KERNELS, STRIDES, PADDINGS = (1, 3, 7), (1, 2), (0, 1, 3)
SIZES = (7, 8, 11, 16, 23, 32, 57)  # 7 sizes: coprime with the 18 (k, s, p) and 9 channels
# Largest error allowed, relative to the largest value of y, dx or dW: float32 sums of up to
# 2*56*56*64 terms are a few 1e-7 off; a wrong gradient or a stray write is O(1) off.
TOL = 1e-5
WORKER_TIMEOUT_S = 300


def _case(b, h, w, c, o, k, s, pad):
    pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    return (b, h, w, c, o, k, s, pad)


def _grid() -> list[tuple]:
    ksp = list(itertools.product(KERNELS, STRIDES, PADDINGS))
    cases = []
    for i, (c, o) in enumerate(itertools.product(CHANNELS, CHANNELS)):
        k, s, p = ksp[i % len(ksp)]
        h, w = SIZES[i % len(SIZES)], SIZES[(i + i // len(SIZES)) % len(SIZES)]
        cases.append(_case(1 + i % 2, h, w, c, o, k, s, p))
    cases += [
        # strided 1x1 that crashed (B, H, C, O, stride 2): the weight gradient overran
        # oneDNN's scratchpad when C < 16 and H, W are multiples of the stride
        _case(2, 112, 112, 8, 8, 1, 2, 0),
        _case(2, 56, 56, 4, 8, 1, 2, 0),
        _case(1, 32, 32, 1, 4, 1, 2, 0),
        _case(2, 112, 112, 12, 24, 1, 2, 0),
        _case(1, 113, 56, 3, 17, 1, 2, 0),  # odd H: no reduce-to-unit-stride in oneDNN
        _case(2, 64, 64, 15, 16, 1, 2, 0),
        # IResNet: stem, a stride-2 3x3, the 1x1 downsamples
        _case(2, 112, 112, 3, 64, 3, 1, 1),
        _case(2, 56, 56, 64, 64, 3, 2, 1),
        _case(2, 56, 56, 64, 128, 1, 2, 0),
        _case(2, 28, 28, 128, 256, 1, 2, 0),
        _case(2, 14, 14, 256, 512, 1, 2, 0),
        _case(1, 14, 14, 256, 256, 3, 1, 1),
        # 7x7 stem-like on a large odd image, asymmetric and uneven paddings
        _case(1, 111, 97, 3, 16, 7, 2, 3),
        _case(2, 9, 8, 5, 6, 3, 2, ((0, 1), (1, 0))),
        _case(1, 16, 15, 17, 3, 7, 1, ((3, 0), (2, 3))),
        _case(2, 20, 21, 4, 12, 1, 1, ((0, 3), (1, 2))),
        _case(1, 31, 30, 16, 8, 3, 2, ((1, 0), (0, 0))),
        _case(2, 12, 13, 64, 1, 7, 2, ((3, 2), (0, 1))),
    ]
    return cases


CASES = _grid()
FAMILIES = {f"k{k}": [i for i, c in enumerate(CASES) if c[5] == k] for k in KERNELS}


def flops(case) -> float:
    """Multiply-adds of one of the three convolutions of ``case``."""
    b, h, w, c, o, k, s, ((pt, pb), (pl, pr)) = case
    return b * ((h + pt + pb - k) // s + 1) * ((w + pl + pr - k) // s + 1) * k * k * c * o


def _name(case) -> str:
    b, h, w, c, o, k, s, pad = case
    return f"B{b} {h}x{w} C{c} O{o} k{k} s{s} pad{pad}"


# --- the worker (a fresh 1-device process) -------------------------------------------------


def _worker(indices: list[int]) -> dict:
    onednn_conv.load()  # a broken build raises here: the family fails
    dn = ("NHWC", "HWIO", "NHWC")

    def value_and_grads(fn, x, kernel, g):
        y, vjp = jax.vjp(fn, x, kernel)
        return (y, *vjp(g))

    def both(cases):
        def f(args):
            out = []
            for (x, kernel, g), (_, _, _, _, _, _, s, pad) in zip(args, cases):
                ours = lambda a, k, s=s, pad=pad: onednn_conv.conv2d_onednn(
                    a, k, strides=(s, s), padding=pad)
                ref = lambda a, k, s=s, pad=pad: lax.conv_general_dilated(
                    a, k, (s, s), pad, dimension_numbers=dn)
                out.append((value_and_grads(ours, x, kernel, g),
                            value_and_grads(ref, x, kernel, g)))
            return out
        return jax.jit(f)

    cases = [CASES[i] for i in indices]
    args = []
    for i, (b, h, w, c, o, k, s, pad) in zip(indices, cases):
        rng = np.random.default_rng(i)  # numpy: one jax.random compile per shape is slow
        oh = (h + sum(pad[0]) - k) // s + 1
        ow = (w + sum(pad[1]) - k) // s + 1
        args.append((rng.standard_normal((b, h, w, c), np.float32),
                     rng.standard_normal((k, k, c, o), np.float32) / np.sqrt(k * k * c),
                     rng.standard_normal((b, oh, ow, o), np.float32)))
    fn = both(cases)
    hlo = fn.lower(args).as_text()
    for target in onednn_conv.TARGETS.values():  # oneDNN ran, not a fallback
        assert hlo.count(f"@{target}(") == len(cases), target
    results = jax.block_until_ready(fn(args))
    report = {}
    for i, case, (x, kernel, g), (ours, ref) in zip(indices, cases, args, results):
        exact = (_numpy_reference(x, kernel, g, case[6], case[7]) if flops(case) <= 3e8
                 else (None,) * 3)
        errs = {}
        for name, a, b_, e in zip(("y", "dx", "dW"), ours, ref, exact):
            a, b_ = np.asarray(a, np.float64), np.asarray(b_, np.float64)
            assert a.shape == b_.shape, (name, a.shape, b_.shape)
            scale = np.abs(b_ if e is None else e).max() or 1.0
            errs[name] = {"xla": float(np.abs(a - b_).max() / scale)}
            if e is not None:
                errs[name]["f64"] = float(np.abs(a - e).max() / scale)
        report[str(i)] = errs
    return report


def _failures(indices: list[int]) -> list[str]:
    """Runs ``indices`` in one fresh process: what crashed, hung or came out wrong."""
    where = (_name(CASES[indices[0]]) if len(indices) == 1
             else f"{len(indices)} cases in one process")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    try:
        out = subprocess.run([sys.executable, __file__, *map(str, indices)], env=env,
                             capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
                             cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return [f"{where}: no result in {WORKER_TIMEOUT_S} s (hung)"]
    if out.returncode:
        return [f"{where}: exit {out.returncode}\n{out.stderr[-1500:]}"]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(map(int, report)) == sorted(indices)
    return [f"{_name(CASES[int(i)])}: {name} off {err:.2g} of its largest value vs {against}"
            for i, errs in report.items() for name, pair in errs.items()
            for against, err in pair.items() if not err <= TOL]


# --- tests ---------------------------------------------------------------------------------

# Skipped only where the extra is not installed; with it, a failing build fails the tests.
installed = pytest.mark.skipif(not onednn_conv._installed(),
                               reason="oneDNN not installed (pip install -e '.[onednn]')")


@installed
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grid_equals_xla_and_float64_without_crashing(family):
    onednn_conv.load()  # built here once, not by the worker
    indices = FAMILIES[family]
    failures = _failures(indices)
    if failures:  # one at a time, to name the shapes (a stray write may hit another case)
        failures += ["each case in its own process:"] + [
            f for i in indices for f in _failures([i])]
    assert not failures, "\n".join(failures)


def test_grid_covers_its_design():
    kinds = {(c[5], c[6], c[7][0][0]) for c in CASES}
    assert set(itertools.product(KERNELS, STRIDES, PADDINGS)) <= kinds
    assert set(itertools.product(CHANNELS, CHANNELS)) <= {(c[3], c[4]) for c in CASES}
    sizes = {c[1] for c in CASES} | {c[2] for c in CASES}
    assert min(sizes) == 7 and max(sizes) >= 112 and any(s % 2 for s in sizes)
    assert sorted(i for f in FAMILIES.values() for i in f) == list(range(len(CASES)))
    for case in [(2, 112, 8, 8, 2, 1, 0), (2, 56, 4, 8, 2, 1, 0), (1, 32, 1, 4, 2, 1, 0),
                 (2, 112, 12, 24, 2, 1, 0)]:  # the reported rows (B, H, C, O, s, k, pad)
        b, h, c, o, s, k, p = case
        assert _case(b, h, h, c, o, k, s, p) in CASES


def test_covered_names_exactly_the_grid():
    """covered() (what conv_impl="auto" runs on oneDNN) holds for every grid case and for
    nothing outside the grid's families; "auto" sends the others to im2col."""
    def cov(k, s, pad=((1, 1), (1, 1)), c=4, groups=1, dtype=jnp.float32, kdtype=None):
        x = jax.ShapeDtypeStruct((2, 16, 16, c), dtype)
        kernel = jax.ShapeDtypeStruct((*k, c // groups, 8), kdtype or dtype)
        return onednn_conv.covered(x, kernel, strides=s, padding=pad, groups=groups)

    for b, h, w, c, o, k, s, pad in CASES:
        assert cov((k, k), (s, s), pad, c=c), _name((b, h, w, c, o, k, s, pad))
    assert cov((3, 3), (2, 2), ((0, 2), (3, 1)))  # any side in 0..3
    assert cov((1, 1), (1, 1), c=512)  # the channel count is not restricted
    assert not cov((2, 2), (1, 1))  # kernel 2 and 5: not in the grid
    assert not cov((5, 5), (1, 1))
    assert not cov((1, 3), (1, 1))  # non-square kernel
    assert not cov((3, 3), (3, 3))  # stride 3
    assert not cov((3, 3), (1, 2))  # unequal strides
    assert not cov((3, 3), (1, 1), ((4, 4), (1, 1)))  # padding 4
    assert not cov((3, 3), (1, 1), ((-1, 0), (1, 1)))
    assert not cov((3, 3), (1, 1), groups=2)
    assert not cov((3, 3), (1, 1), dtype=jnp.bfloat16)
    assert not cov((3, 3), (1, 1), kdtype=jnp.bfloat16)
    # "auto" on one device: oneDNN for a grid family, im2col (no custom call) for stride 3
    fresh = subprocess.run(
        [sys.executable, "-c", _AUTO_PROBE], env=dict(os.environ, XLA_FLAGS="",
                                                       JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == {
        "devices": 1, "k3s2": onednn_conv._installed(), "k3s3": False, "k2s2": False}


_AUTO_PROBE = """
import json
import jax, jax.numpy as jnp
from x2jax.models import layers
x = jnp.ones((2, 12, 12, 4))
def uses_onednn(k, s):
    f = jax.jit(jax.grad(lambda x, w: layers.conv2d(x, w, strides=s, padding=1,
                                                    impl="auto").sum(), argnums=(0, 1)))
    return "x2jax_onednn" in f.lower(x, jnp.ones((k, k, 4, 6))).as_text()
print(json.dumps({"devices": jax.device_count(), "k3s2": uses_onednn(3, 2),
                  "k3s3": uses_onednn(3, 3), "k2s2": uses_onednn(2, 2)}))
"""


if __name__ == "__main__":
    from x2jax.runtime import use_fast_cpu_flags

    use_fast_cpu_flags()
    print(json.dumps(_worker([int(a) for a in sys.argv[1:]])))
