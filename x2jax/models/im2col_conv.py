"""A 2-D convolution whose gradients avoid XLA:CPU's slow forms.

XLA:CPU computes two convolution gradients of IResNet far below the forward
rate (``benchmarks/conv_grads.py``, figures in docs/benchmarks.md): the weight
gradient of 1x1 convs, and the input gradient of strided convs, which it runs as a conv over the zero-dilated
output gradient (at stride 2, 3 of 4 products are with zeros). :func:`conv2d_im2col`
keeps XLA's forward and computes, with a ``jax.custom_vjp``:

* the weight gradient as an im2col matmul::

      dW[u, v, c, o] = sum_{b, i, j} x_pad[b, i*s + u, j*s + v, c] * g[b, i, j, o]
                     = (G^T @ P)[o, (u, v, c)]

  with ``G = g`` as (B*H'*W', O) and ``P`` the (B*H'*W', KH*KW*C) patches;
  for a 1x1 conv ``P`` is just the strided input (no copy of patches);
* the input gradient of a 1x1 conv as ``g @ W^T`` spread back onto the stride
  grid with an interior ``lax.pad``;
* the input gradient of a strided KxK conv as one stride-1 conv of ``g`` per
  output phase (:func:`_input_grad_phases`), interleaved by a reshape.

Which form is used per conv is chosen from static shapes by
:func:`weight_grad_method` and :func:`input_grad_method` (``"auto"``, the policy
``benchmarks/conv_grads.py`` measured with ``x2jax.runtime``'s flags, XLA's own
convolutions rather than YNNPACK's): matmul weight gradients for 1x1
kernels only, per-phase input gradients for strided convs on inputs of >= 28 px;
XLA's own everywhere else. ``weight_grad="matmul"`` / ``input_grad="phases"``
force them everywhere (tests). Products accumulate in float32
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
InputGrad = Literal["auto", "phases", "xla"]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

__all__ = ["conv2d_im2col", "input_grad_method", "weight_grad_method"]


def _conv(x: Array, kernel: Array, strides: tuple[int, int],
          padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                    dimension_numbers=_DIMENSION_NUMBERS)


def weight_grad_method(x_shape: Sequence[int], kernel_shape: Sequence[int],
                       strides: tuple[int, int]) -> Literal["matmul", "xla"]:
    """Weight-gradient form for a conv of these static shapes ("auto" policy).

    Matmul for 1x1 kernels (where XLA:CPU is slower than one matmul, most on the
    strided IResNet shortcuts); XLA's own kernel for the others, where it beats
    the im2col matmul once convolutions run on XLA's own kernels rather than
    YNNPACK's (``x2jax.runtime``; ``benchmarks/conv_grads.py``, docs/benchmarks.md).
    """
    kh, kw, _, _ = kernel_shape
    return "matmul" if (kh, kw) == (1, 1) else "xla"


def input_grad_method(x_shape: Sequence[int], kernel_shape: Sequence[int],
                      strides: tuple[int, int]) -> Literal["phases", "xla"]:
    """Input-gradient form of a strided KxK conv ("auto" policy).

    XLA computes it as a conv over the zero-dilated output gradient (3 of 4
    products are with zeros at stride 2); :func:`_input_grad_phases` as one
    stride-1 conv per output phase, faster for inputs of >= 28 px and slower
    below (``benchmarks/conv_grads.py``, docs/benchmarks.md).
    """
    if tuple(strides) == (1, 1) or tuple(kernel_shape[:2]) == (1, 1):
        return "xla"
    return "phases" if min(x_shape[1], x_shape[2]) >= 28 else "xla"


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


def _input_grad_phases(g: Array, kernel: Array, x_shape: tuple[int, ...],
                       strides: tuple[int, int],
                       padding: tuple[tuple[int, int], tuple[int, int]]) -> Array:
    """dx of a strided conv as one stride-1 conv of ``g`` per output phase.

    With ``p = s m + a`` a row of the padded input, ``dx_pad[p] = sum_t g[m - t]
    W[a + s t]``: phase ``(a, b)`` is a conv of ``g`` with the taps
    ``W[a::s, b::s]`` flipped (in/out swapped); the phases are interleaved by a
    reshape and the padding cropped. Same products as XLA's transposed conv
    without the zero-dilated rows and columns.
    """
    b_, h, w, c = x_shape
    kh, kw = kernel.shape[:2]
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    _, ho, wo, _ = g.shape
    mh, mw = -(-(h + pt + pb) // sh), -(-(w + pl + pr) // sw)  # rows / cols per phase
    kernel_t = jnp.swapaxes(kernel, 2, 3)  # (KH, KW, O, C): from g back to C channels
    rows = []
    for a in range(sh):
        cols = []
        for b in range(sw):
            ta, tb = len(range(a, kh, sh)), len(range(b, kw, sw))
            if ta == 0 or tb == 0:
                cols.append(jnp.zeros((b_, mh, mw, c), g.dtype))
                continue
            taps = kernel_t[a::sh, b::sw][::-1, ::-1]
            phase = lax.conv_general_dilated(
                g, taps, (1, 1), ((ta - 1, max(0, mh - ho)), (tb - 1, max(0, mw - wo))),
                dimension_numbers=_DIMENSION_NUMBERS, preferred_element_type=jnp.float32)
            cols.append(phase[:, :mh, :mw, :].astype(g.dtype))
        rows.append(jnp.stack(cols, axis=3))  # (B, mh, mw, sw, C)
    dx_pad = jnp.stack(rows, axis=2).reshape(b_, mh * sh, mw * sw, c)  # (B, mh, sh, mw, sw, C)
    return dx_pad[:, pt:pt + h, pl:pl + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul_grads(x: Array, kernel: Array, strides: tuple[int, int],
                       padding: tuple[tuple[int, int], tuple[int, int]],
                       weight_grad: str, input_grad: str) -> Array:
    return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding, weight_grad, input_grad):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, weight_grad, input_grad, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    if weight_grad == "auto":
        weight_grad = weight_grad_method(x.shape, kernel.shape, strides)
    if input_grad == "auto":
        input_grad = input_grad_method(x.shape, kernel.shape, strides)
    if kernel.shape[:2] == (1, 1):
        dx = _input_grad_1x1(g, kernel, x.shape, strides, padding)
    elif input_grad == "phases":
        dx = _input_grad_phases(g, kernel, x.shape, strides, padding)
    else:
        _, vjp_x = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)
        dx = vjp_x(g)[0]
    if weight_grad == "xla":
        _, vjp_w = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
        dw = vjp_w(g)[0]
    else:
        dw = _weight_grad_matmul(x, g, kernel.shape, strides, padding)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_matmul_grads.defvjp(_fwd, _bwd)


def conv2d_im2col(x: Array, kernel: Array, *, strides: tuple[int, int],
                  padding: Sequence[tuple[int, int]], groups: int = 1,
                  weight_grad: WeightGrad = "auto", input_grad: InputGrad = "auto") -> Array:
    """Same value as ``lax.conv_general_dilated`` (NHWC, HWIO), matmul gradients.

    Signature of ``x2jax.models.layers`` conv impls: ``strides`` (sh, sw),
    ``padding`` ((top, bottom), (left, right)) non-negative, ``groups``.
    ``weight_grad``: "auto" (:func:`weight_grad_method`), "matmul" or "xla";
    ``input_grad`` (KxK kernels): "auto" (:func:`input_grad_method`), "phases" or "xla".

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
    if input_grad not in ("auto", "phases", "xla"):
        raise ValueError(f"conv2d_im2col: input_grad must be 'auto', 'phases' or 'xla', "
                         f"got {input_grad!r}")
    if groups != 1:
        return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads,
                                        dimension_numbers=_DIMENSION_NUMBERS,
                                        feature_group_count=groups)
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv2d_im2col: x (B, H, W, C) and kernel (KH, KW, C, O) expected, "
                         f"got x {x.shape} and kernel {kernel.shape}")
    return _conv_matmul_grads(x, kernel, strides, pads, weight_grad, input_grad)  # type: ignore[arg-type]
