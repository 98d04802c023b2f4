"""A 2-D convolution whose gradients are computed as matmuls where XLA:CPU is slow.

XLA:CPU lowers the weight gradient of a convolution (a conv that contracts over
the batch and spatial axes) to kernels that reach a fraction of the forward
rate on some shapes; for the strided 1x1 shortcut convs of IResNet it was 3-4x
slower than one matmul (``benchmarks/conv_grads.py``, docs/benchmarks.md). :func:`conv2d_im2col`
keeps XLA's forward and computes, with a ``jax.custom_vjp``:

* the weight gradient as an im2col matmul::

      dW[u, v, c, o] = sum_{b, i, j} x_pad[b, i*s + u, j*s + v, c] * g[b, i, j, o]
                     = (G^T @ P)[o, (u, v, c)]

  with ``G = g`` as (B*H'*W', O) and ``P`` the (B*H'*W', KH*KW*C) patches;
  for a 1x1 conv ``P`` is just the strided input (no copy of patches).
* the input gradient of a 1x1 conv as ``g @ W^T`` spread back onto the stride
  grid with an interior ``lax.pad``; for larger kernels XLA's transposed conv,
  which runs at the forward rate on this CPU.

Which weight-gradient form is used per conv is chosen from static shapes by
:func:`weight_grad_method` (``"auto"``), measured on a 2-core AVX2/AVX-512 CPU
with jax 0.10.2: the matmul wins for 1x1 kernels and for narrow (< 128
channel) strided, channel-changing or large-input convs, and loses to XLA's own
kernel on the others. ``weight_grad="matmul"``
forces the matmul everywhere (tests). Products accumulate in float32
(``preferred_element_type``) and are cast to the input dtype, as XLA does.

Grouped (depthwise) convolutions are passed to XLA unchanged.
"""

from __future__ import annotations

import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
WeightGrad = Literal["auto", "matmul", "xla"]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

__all__ = ["conv2d_im2col", "weight_grad_method"]


def _conv(x: Array, kernel: Array, strides: tuple[int, int],
          padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                    dimension_numbers=_DIMENSION_NUMBERS)


def weight_grad_method(x_shape: Sequence[int], kernel_shape: Sequence[int],
                       strides: tuple[int, int]) -> Literal["matmul", "xla"]:
    """Weight-gradient form for a conv of these static shapes ("auto" policy).

    Matmul for 1x1 kernels (XLA:CPU: 3-4x slower than one matmul on the strided
    IResNet shortcuts) and for narrow convs (< 128 input channels) that are
    strided, change the channel count or run on >= 112 px inputs (XLA 1.2-1.7x
    slower there); XLA's own kernel elsewhere, where it was as fast or faster
    (``benchmarks/conv_grads.py``, docs/benchmarks.md).
    """
    kh, kw, cin, cout = kernel_shape
    if (kh, kw) == (1, 1):
        return "matmul"
    if cin < 128 and (strides != (1, 1) or cin != cout or x_shape[1] >= 112):
        return "matmul"
    return "xla"


def _patches(x_pad: Array, kh: int, kw: int, strides: tuple[int, int],
             out_hw: tuple[int, int]) -> Array:
    """im2col: (B, H', W', KH*KW*C) with the last axis ordered (u, v, c) as HWIO."""
    b, _, _, c = x_pad.shape
    (sh, sw), (ho, wo) = strides, out_hw
    cols = [lax.slice(x_pad, (0, u, v, 0), (b, u + (ho - 1) * sh + 1, v + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
            for u in range(kh) for v in range(kw)]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _weight_grad_matmul(x: Array, g: Array, kernel_shape: tuple[int, ...],
                        strides: tuple[int, int],
                        padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """dW = (G^T @ P) reshaped to HWIO; float32 accumulation, cast to x.dtype."""
    kh, kw, c, o = kernel_shape
    x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    patches = _patches(x_pad, kh, kw, strides, g.shape[1:3]).reshape(-1, kh * kw * c)
    g2 = g.reshape(-1, o)
    dw_t = lax.dot_general(g2, patches, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)  # (O, KH*KW*C)
    return dw_t.T.reshape(kh, kw, c, o).astype(x.dtype)


def _input_grad_1x1(g: Array, kernel: Array, x_shape: tuple[int, ...],
                    strides: tuple[int, int],
                    padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """dx of a 1x1 conv: ``g @ W^T`` placed on the stride grid of the padded input."""
    _, h, w, c = x_shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    _, ho, wo, o = g.shape
    dxs = lax.dot_general(g, kernel.reshape(c, o), (((3,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32).astype(g.dtype)  # (B, H', W', C)
    hp, wp = h + pt + pb, w + pl + pr
    dx_pad = lax.pad(dxs, jnp.zeros((), dxs.dtype),
                     ((0, 0, 0), (0, hp - ((ho - 1) * sh + 1), sh - 1),
                      (0, wp - ((wo - 1) * sw + 1), sw - 1), (0, 0, 0)))
    return dx_pad[:, pt:pt + h, pl:pl + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grads(x: Array, kernel: Array, strides: tuple[int, int],
                       padding: tuple[tuple[int, int], tuple[int, int]],
                       weight_grad: str) -> Array:
    return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding, weight_grad):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, weight_grad, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    if weight_grad == "auto":
        weight_grad = weight_grad_method(x.shape, kernel.shape, strides)
    if kernel.shape[:2] == (1, 1):
        dx = _input_grad_1x1(g, kernel, x.shape, strides, padding)
        if weight_grad == "xla":
            _, vjp_w = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
            dw = vjp_w(g)[0]
        else:
            dw = _weight_grad_matmul(x, g, kernel.shape, strides, padding)
        return dx, dw.astype(kernel.dtype)
    if weight_grad == "xla":
        _, vjp = jax.vjp(lambda a, k: _conv(a, k, strides, padding), x, kernel)
        dx, dw = vjp(g)
    else:
        _, vjp_x = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)
        dx = vjp_x(g)[0]
        dw = _weight_grad_matmul(x, g, kernel.shape, strides, padding)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_matmul_grads.defvjp(_fwd, _bwd)


def conv2d_im2col(x: Array, kernel: Array, *, strides: tuple[int, int],
                  padding: Sequence[tuple[int, int]], groups: int = 1,
                  weight_grad: WeightGrad = "auto") -> Array:
    """Same value as ``lax.conv_general_dilated`` (NHWC, HWIO), matmul gradients.

    Signature of ``x2jax.models.layers`` conv impls: ``strides`` (sh, sw),
    ``padding`` ((top, bottom), (left, right)) non-negative, ``groups``.
    ``weight_grad``: "auto" (:func:`weight_grad_method`), "matmul" or "xla".

    Shapes: x (B, H, W, C), kernel (KH, KW, C // groups, O) of x's dtype -> (B, H', W', O).
    """
    strides = (int(strides[0]), int(strides[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"conv2d_im2col: padding must be two non-negative (low, high) pairs, "
                         f"got {padding!r}")
    if weight_grad not in ("auto", "matmul", "xla"):
        raise ValueError(f"conv2d_im2col: weight_grad must be 'auto', 'matmul' or 'xla', "
                         f"got {weight_grad!r}")
    if groups != 1:
        return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                        dimension_numbers=_DIMENSION_NUMBERS,
                                        feature_group_count=groups)
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d_im2col: x (B, H, W, C) and kernel (KH, KW, C, O) expected, "
                         f"got x {x.shape} and kernel {kernel.shape}")
    return _conv_matmul_grads(x, kernel, strides, pads, weight_grad)  # type: ignore[arg-type]
