"""2-D convolutions on oneDNN (the library PyTorch's CPU convolutions use), CPU only.

On IResNet's convolutions oneDNN's input and weight gradients are faster than
XLA:CPU's (``benchmarks/conv_grads.py``), and with them an IResNet training
step keeps up with PyTorch's (``benchmarks/backbone_step.py``; figures in
docs/benchmarks.md). This module runs a float32 NHWC/HWIO convolution and both of its gradients as
XLA FFI custom calls into oneDNN::

    y  = conv(x, W)                                  forward
    dx = conv_transpose(dy, W)                       backward data
    dW[u, v, c, o] = sum_{b,i,j} x_pad[b, i*s+u, j*s+v, c] dy[b, i, j, o]

The extension (``csrc/onednn_conv.cc``) is compiled with ``g++`` on first use
against the XLA FFI headers jaxlib ships and oneDNN from the ``onednn`` extra
(``pip install -e '.[onednn]'``: oneDNN 3.2, GNU OpenMP), cached under
``$X2JAX_CACHE_DIR`` (default ``~/.cache/x2jax``) and registered with
``jax.ffi``. :func:`available` says whether that worked, :func:`load` raises
with the reason.

Limits: float32, ``groups == 1``, non-negative padding; anything else goes to
:func:`x2jax.models.im2col_conv.conv2d_im2col` (on GPU/TPU backends: to XLA's conv).
``conv_impl="auto"`` picks oneDNN only for the families :func:`covered` names, those the
shape grid of ``tests/test_onednn_grid.py`` checks (``scripts/check_onednn_memory.sh`` runs
that grid under memory checkers). The custom calls have no sharding rule: under a
multi-device mesh XLA gathers their operands to every device, so use this on
single-device CPU processes (``conv_impl="auto"`` only picks it there).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from x2jax.models.im2col_conv import conv2d_im2col

Array = jax.Array

SOURCE = Path(__file__).with_name("csrc") / "onednn_conv.cc"
TARGETS = {
    "forward": "x2jax_onednn_conv_forward",
    "input_grad": "x2jax_onednn_conv_input_grad",
    "weight_grad": "x2jax_onednn_conv_weight_grad",
}

__all__ = ["available", "conv2d_onednn", "covered", "load", "supports", "version"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def _prefixes() -> list[Path]:
    """Where oneDNN's ``include/`` and ``lib/`` may live: $DNNLROOT, then the Python prefixes."""
    roots = [os.environ.get("X2JAX_DNNL_ROOT"), os.environ.get("DNNLROOT"), sys.prefix,
             sys.base_prefix, sysconfig.get_config_var("prefix"), "/usr/local", "/usr"]
    seen: list[Path] = []
    for r in roots:
        if r and Path(r) not in seen:
            seen.append(Path(r))
    return seen


def _find_onednn() -> tuple[Path, Path]:
    for root in _prefixes():
        header = root / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
        for libdir in (root / "lib", root / "lib64", root / "lib" / "x86_64-linux-gnu"):
            if header.is_file() and (libdir / "libdnnl.so").exists():
                return root / "include", libdir
    raise RuntimeError(
        "x2jax onednn conv: oneDNN headers and libdnnl.so not found under "
        f"{[str(p) for p in _prefixes()]}; install the extra with "
        "pip install -e '.[onednn]' (or set X2JAX_DNNL_ROOT to a oneDNN install)")


def _cache_dir() -> Path:
    return Path(os.environ.get("X2JAX_CACHE_DIR", Path.home() / ".cache" / "x2jax")) / "ext"


def _build() -> Path:
    """Compiles the extension unless a build of this source, jaxlib and oneDNN is cached."""
    include, libdir = _find_onednn()
    ffi_include = Path(jax.ffi.include_dir())
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"x2jax onednn conv: C++ compiler {compiler!r} not found "
                           "(set CXX or install g++)")
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", str(ffi_include), "-I",
             str(include), "-L", str(libdir), "-ldnnl", f"-Wl,-rpath,{libdir}"]
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jax.__version__.encode(), " ".join(flags).encode(),
                 str(shutil.which(compiler)).encode(), str(libdir.resolve()).encode(),
                 (include / "oneapi" / "dnnl" / "dnnl_version.h").read_bytes()):
        digest.update(part)
    out = _cache_dir() / f"x2jax_onednn_conv_{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, str(SOURCE), *flags, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"x2jax onednn conv: building {SOURCE} failed:\n{' '.join(cmd)}\n"
                           f"{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent processes never load a half-written file
    return out


def load() -> ctypes.CDLL:
    """Builds (once, cached) and registers the custom calls; raises with the reason if it can't."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        if "error" in _state:
            raise RuntimeError(_state["error"])
        try:
            lib = ctypes.CDLL(str(_build()))
            for target in TARGETS.values():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                            platform="cpu")
            lib.x2jax_onednn_version.restype = ctypes.c_char_p
        except (RuntimeError, OSError, AttributeError) as e:
            _state["error"] = str(e)
            raise RuntimeError(str(e)) from e
        _state["lib"] = lib
        return lib


def available() -> bool:
    """True when the extension builds and loads here (the result is cached).

    Warns once when oneDNN is installed but the extension cannot be built or loaded
    (no compiler, say): ``conv_impl="auto"`` then silently runs slower convolutions.
    """
    try:
        load()
    except RuntimeError as e:
        if not _state.get("warned") and _installed():
            _state["warned"] = True
            warnings.warn(f"x2jax: oneDNN is installed but its convolutions are unavailable, "
                          f"conv_impl='auto' uses XLA's: {e}", RuntimeWarning, stacklevel=2)
        return False
    return True


def _installed() -> bool:
    try:
        _find_onednn()
    except RuntimeError:
        return False
    return True


def version() -> str:
    """oneDNN version and CPU runtime of the loaded extension, e.g. ``"3.2.0 (2)"``."""
    return load().x2jax_onednn_version().decode()


def supports(x: Array, kernel: Array, padding: Sequence[tuple[int, int]], groups: int) -> bool:
    """Whether :func:`conv2d_onednn` runs this conv on oneDNN (else it falls back)."""
    return (groups == 1 and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and all(p >= 0 for pair in padding for p in pair))


# The families tests/test_onednn_grid.py checks, forward and both gradients, against XLA
# and a float64 reference, each in a process of its own (a crash fails the test).
COVERED_KERNELS = (1, 3, 7)
COVERED_STRIDES = (1, 2)
COVERED_MAX_PADDING = 3


def covered(x: Array, kernel: Array, strides: Sequence[int],
            padding: Sequence[tuple[int, int]], groups: int = 1) -> bool:
    """Whether this conv is in a family the shape grid tests (``conv_impl="auto"`` runs
    only those on oneDNN): :func:`supports`, a square kernel of 1, 3 or 7, equal strides of
    1 or 2 and each padding side in 0..3 (no dilation in :func:`conv2d_onednn`), any
    channel counts."""
    kh, kw = kernel.shape[:2]
    sh, sw = (int(s) for s in strides)
    return (supports(x, kernel, padding, groups) and kh == kw and kh in COVERED_KERNELS
            and sh == sw and sh in COVERED_STRIDES
            and all(0 <= p <= COVERED_MAX_PADDING for pair in padding for p in pair))


def _out_shape(x_shape, k_shape, strides, padding):
    b, h, w, _ = x_shape
    kh, kw, _, o = k_shape
    (pt, pb), (pl, pr) = padding
    return (b, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, o)


def _attrs(strides, padding):
    (pt, pb), (pl, pr) = padding
    return {"strides": np.asarray(strides, np.int64),
            "padding": np.asarray([pt, pb, pl, pr], np.int64)}


def _call(name: str, out_shape, *args, strides, padding) -> Array:
    load()
    out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    return jax.ffi.ffi_call(TARGETS[name], out, vmap_method="sequential")(
        *args, **_attrs(strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: Array, kernel: Array, strides: tuple[int, int],
          padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    return _call("forward", _out_shape(x.shape, kernel.shape, strides, padding), x, kernel,
                 strides=strides, padding=padding)


def _fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, residuals, g):
    x, kernel = residuals
    g = g.astype(jnp.float32)
    dx = _call("input_grad", x.shape, g, kernel, strides=strides, padding=padding)
    dw = _call("weight_grad", kernel.shape, x, g, strides=strides, padding=padding)
    return dx, dw


_conv.defvjp(_fwd, _bwd)


def conv2d_onednn(x: Array, kernel: Array, *, strides: tuple[int, int],
                  padding: Sequence[tuple[int, int]], groups: int = 1) -> Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO) with forward and gradients on oneDNN.

    Signature of ``x2jax.models.layers`` conv impls. Shapes: x (B, H, W, C),
    kernel (KH, KW, C, O) -> (B, H', W', O), H' = (H + top + bottom - KH) // sh + 1.
    Convs outside :func:`supports` go to ``conv2d_im2col``. Raises RuntimeError
    when the extension cannot be built or loaded (:func:`available`).
    """
    strides = (int(strides[0]), int(strides[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        raise ValueError(f"conv2d_onednn: padding must be two (low, high) pairs, got {padding!r}")
    if jax.default_backend() != "cpu":  # oneDNN's targets are registered for the CPU only
        return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=groups)
    if not supports(x, kernel, pads, groups):
        return conv2d_im2col(x, kernel, strides=strides, padding=pads, groups=groups)
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d_onednn: x (B, H, W, C) and kernel (KH, KW, C, O) expected, "
                         f"got x {x.shape} and kernel {kernel.shape}")
    if any(d <= 0 for d in _out_shape(x.shape, kernel.shape, strides, pads)[1:3]):
        raise ValueError(f"conv2d_onednn: kernel {kernel.shape[:2]} larger than the padded "
                         f"input {x.shape[1:3]} + {pads}")
    return _conv(x, kernel, strides, pads)  # type: ignore[arg-type]
