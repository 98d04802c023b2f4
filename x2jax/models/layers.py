"""Building blocks shared by the backbones: one conv function, Conv, BatchNorm, PReLU.

Every convolution in ``x2jax.models`` goes through :func:`conv2d`, so a faster
implementation (for example one whose weight gradient is an im2col matmul, as
XLA:CPU computes convolution weight gradients slowly) can be swapped in by name through the ``conv_impl``
attribute of the modules, without touching the networks.

Layout is NHWC activations and HWIO kernels. Parameters are float32; the
computation runs in the module's ``dtype`` (float32 or bfloat16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from x2jax.models import onednn_conv
from x2jax.models.im2col_conv import conv2d_im2col

Padding = int | Sequence[tuple[int, int]]
ConvFn = Callable[..., jax.Array]

# PyTorch BatchNorm defaults (insightface keeps them): eps 1e-5 and running
# statistics updated as new = (1 - 0.1) * old + 0.1 * batch.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: weight of the old value (torch momentum 0.1).

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding: Padding) -> list[tuple[int, int]]:
    if isinstance(padding, int):
        return [(padding, padding), (padding, padding)]
    pads = [tuple(int(p) for p in pair) for pair in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"padding must be an int or two (low, high) pairs, got {padding!r}")
    return pads  # type: ignore[return-value]


def _conv2d_xla(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
                padding: list[tuple[int, int]], groups: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding,
        dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=groups)


def resolve_conv_impl(impl: str, platform: str | None = None, num_devices: int | None = None) -> str:
    """The implementation ``impl`` names where the model runs: "auto" resolved, others as given.

    "auto" is the fastest measured implementation (docs/benchmarks.md): "xla" on
    GPU/TPU; on CPU "onednn" when the process has a single device (the oneDNN custom
    calls have no sharding rule) and the extension loads (the ``onednn`` extra),
    "im2col" otherwise.

    Args:
      impl: a name in :data:`CONV_IMPLS`.
      platform: where the model runs ("cpu", "gpu", "tpu"); default ``jax.default_backend()``.
      num_devices: devices of the process; default ``jax.device_count()``.

    Returns:
      A name in :data:`CONV_IMPLS` other than "auto".
    """
    if impl != "auto":
        return impl
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        return "xla"
    num_devices = jax.device_count() if num_devices is None else num_devices
    return "onednn" if num_devices == 1 and onednn_conv.available() else "im2col"


def _conv2d_onednn(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
                   padding: list[tuple[int, int]], groups: int) -> jax.Array:
    """oneDNN for the conv families its shape grid tests, im2col for the others.

    :func:`x2jax.models.onednn_conv.covered`: float32, no groups, kernel 1, 3 or 7,
    stride 1 or 2, padding up to 3.
    """
    if onednn_conv.covered(x, kernel, strides, padding, groups):
        return onednn_conv.conv2d_onednn(x, kernel, strides=strides, padding=padding, groups=groups)
    return conv2d_im2col(x, kernel, strides=strides, padding=padding, groups=groups)


def _conv2d_auto(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int],
                 padding: list[tuple[int, int]], groups: int) -> jax.Array:
    """:func:`resolve_conv_impl` of "auto" at trace time, from the process's backend and devices.

    Models built by :meth:`x2jax.models.spec.ModelSpec.build` resolve "auto" once
    instead and never reach this.
    """
    return CONV_IMPLS[resolve_conv_impl("auto")](x, kernel, strides=strides, padding=padding,
                                                 groups=groups)


CONV_IMPLS: dict[str, ConvFn] = {"xla": _conv2d_xla, "im2col": conv2d_im2col,
                                 "onednn": _conv2d_onednn, "auto": _conv2d_auto}
"""Registered conv implementations: name -> fn(x, kernel, *, strides, padding, groups).

"im2col": :func:`x2jax.models.im2col_conv.conv2d_im2col` (matmul and per-phase gradients, for CPU);
"onednn": :func:`x2jax.models.onednn_conv.conv2d_onednn` (oneDNN custom calls, CPU, needs the
``onednn`` extra) for the convs :func:`x2jax.models.onednn_conv.covered` names, im2col for
the others;
"auto": :func:`resolve_conv_impl` at trace time ("xla" on GPU/TPU; on CPU "onednn" on a
single device where the extension loads, else "im2col").

Add one with :func:`register_conv_impl`; select it with ``conv_impl=<name>``.
"""


def register_conv_impl(name: str, fn: ConvFn) -> None:
    """Makes ``fn`` selectable as ``conv_impl=name`` (same signature as the XLA one)."""
    CONV_IMPLS[name] = fn


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: int | tuple[int, int] = 1,
           padding: Padding = 0, groups: int = 1, impl: str = "xla") -> jax.Array:
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` but channels-last.

    ``y[b, i, j, o] = sum_{u, v, c} x_pad[b, i*s + u, j*s + v, g(o)*Cg + c] * kernel[u, v, c, o]``
    where ``g(o)`` is the group of output channel ``o`` and ``Cg = C / groups``.

    Args:
      x: (B, H, W, C) activations.
      kernel: (KH, KW, C // groups, O) weights (HWIO; torch OIHW transposed (2, 3, 1, 0)).
      strides: int or (sh, sw).
      padding: int (symmetric, as torch) or ((top, bottom), (left, right)).
      groups: feature groups (C and O must be divisible by it).
      impl: name in :data:`CONV_IMPLS`.
    Returns:
      (B, H', W', O) in the dtype of ``x`` (the kernel is cast to it).
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"conv2d expects x (B, H, W, C) and kernel (KH, KW, I, O); "
                         f"got x {x.shape} and kernel {kernel.shape}")
    if x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(f"conv2d: x has {x.shape[-1]} channels but kernel {kernel.shape} "
                         f"with groups={groups} expects {kernel.shape[2] * groups}")
    try:
        fn = CONV_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown conv impl {impl!r}; registered: {sorted(CONV_IMPLS)}") from None
    if isinstance(strides, int):
        strides = (strides, strides)
    return fn(x, kernel.astype(x.dtype), strides=tuple(strides),
              padding=_explicit_padding(padding), groups=groups)


class Conv(nn.Module):
    """Bias-free 2-D convolution through :func:`conv2d` (param ``kernel`` HWIO, float32)."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    groups: int = 1
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise ValueError(f"Conv {self.name}: channels in={in_features}, out={self.features} "
                             f"must be divisible by groups={self.groups}")
        kernel = self.param(
            "kernel", self.kernel_init,
            (self.kernel_size, self.kernel_size, in_features // self.groups, self.features),
            jnp.float32)
        return conv2d(x.astype(self.dtype), kernel, strides=self.strides,
                      padding=self.padding, groups=self.groups, impl=self.conv_impl)


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last, exactly as torch's BatchNorm{1,2}d.

    ``y = (x - mu) / sqrt(var + eps) * scale + bias``. In training ``mu, var`` are the
    batch mean and biased variance (two-pass, float32) and the running statistics
    are updated with torch's rule: ``mean <- m * mean + (1 - m) * mu``,
    ``var <- m * var + (1 - m) * var_batch * n / (n - 1)`` (unbiased, n = elements per
    channel), with m = 0.9. In evaluation the running statistics are used.
    (Flax's ``nn.BatchNorm`` stores the biased variance, which differs from torch
    by n / (n - 1): 1 % at a BatchNorm1d batch of 100.)

    Variables: params ``scale`` (if ``use_scale``), ``bias``; batch_stats ``mean``, ``var``.
    Statistics and normalisation are computed in float32; the output is cast to ``dtype``.

    ``groups > 1`` ("local" BatchNorm, torch DDP without SyncBatchNorm): the batch
    (B, ...) is split into ``groups`` contiguous slices of B / groups examples
    (x viewed as (G, B/G, ...)) and each slice is normalised with its own
    statistics ``mu_g, var_g`` (n = elements per channel of one slice). With
    G = the number of batch shards of the mesh, slice g is exactly device g's
    part of the batch, so the sharding of the batch carries over to the group
    axis and the statistics need no collective (checked in the compiled HLO:
    tests/test_batch_norm_local.py). The running statistics are updated with the
    mean over the groups: ``mean <- m * mean + (1 - m) * mean_g(mu_g)``,
    ``var <- m * var + (1 - m) * mean_g(var_g * n / (n - 1))``, which is exactly
    the average of what each device would hold had it kept its own running
    statistics (the update is linear); it is identical on every device and its
    one (2, C) reduction per layer feeds nothing but the new statistics, off the
    forward pass's path. ``groups=1`` is the global batch. Evaluation ignores it.
    """

    use_running_average: bool | None = None
    use_scale: bool = True
    epsilon: float = BN_EPSILON
    momentum: float = BN_MOMENTUM
    dtype: jnp.dtype = jnp.float32
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = (self.param("scale", nn.initializers.ones, (features,), jnp.float32)
                 if self.use_scale else None)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)

        x32 = x.astype(jnp.float32)
        scale = jnp.ones_like(bias) if scale is None else scale
        if use_running_average:
            y, _ = _normalize(x32, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
            return y.astype(self.dtype)
        groups = int(self.groups)
        if groups < 1 or x.shape[0] % groups:
            raise ValueError(f"BatchNorm {self.name}: groups={groups} (batch_norm='local': one group per "
                             f"batch shard) must be >= 1 and divide the batch of input {x.shape}")
        n = x.size // (features * groups)
        if n < 2:
            raise ValueError(f"BatchNorm {self.name}: training needs more than one value "
                             f"per channel{' and group' if groups > 1 else ''}, got input {x.shape}"
                             f"{f' in {groups} groups' if groups > 1 else ''} (as torch)")
        if groups == 1:
            y, mean, var = batch_norm_train(x32, scale, bias, self.epsilon)
        else:  # (G, B/G, ...): statistics per group, parameter gradients summed over groups
            xg = x32.reshape((groups, x.shape[0] // groups) + x.shape[1:])
            yg, mean, var = jax.vmap(lambda v, s, b: batch_norm_train(v, s, b, self.epsilon),
                                     in_axes=(0, None, None))(xg, scale, bias)
            y = yg.reshape(x.shape)
        if not self.is_initializing():
            unbiased = var * (n / (n - 1))
            if groups > 1:  # the mean of the groups' statistics, one (2, C) reduction
                mean, unbiased = jnp.mean(jnp.stack([mean, unbiased], axis=1), axis=0)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over all axes but the last, with a hand-written backward.

    ``mu = mean(x)``, ``var = mean((x - mu)^2)`` (two-pass, biased),
    ``xhat = (x - mu) / sqrt(var + eps)``, ``y = xhat * scale + bias``. Backward
    (``n`` values per channel, sums over all axes but the last)::

        dbias = sum(dy),  dscale = sum(dy * xhat)
        dx = scale / sqrt(var + eps) * (dy - dbias / n - xhat * dscale / n)

    Two reductions and one elementwise pass, where autodiff of the forward
    materialises ``x - mu`` and reduces more often. ``mean`` and ``var`` are
    returned for the running statistics and are not differentiated (their
    cotangents are ignored). Shapes: x (..., C) float32; scale, bias (C,).
    """
    y, mean, var, _ = _bn_forward(x, scale, bias, epsilon)
    return y, mean, var


def _bn_forward(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    y, inv = _normalize(x, mean, var, scale, bias, epsilon)
    return y, mean, var, (x, mean, inv, scale)


def _normalize(x, mean, var, scale, bias, epsilon):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` and ``1 / sqrt(var + eps)``."""
    inv = jax.lax.rsqrt(var + epsilon)
    return (x - mean) * (inv * scale) + bias, inv


def _bn_fwd(x, scale, bias, epsilon):
    y, mean, var, residuals = _bn_forward(x, scale, bias, epsilon)
    return (y, mean, var), residuals


def _bn_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy = cotangents[0]  # those of mean and var are ignored (running statistics only)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (x - mean) * inv
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * xhat, axis=axes)
    dx = (scale * inv) * (dy - dbias / n - xhat * (dscale / n))
    return dx, dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class PReLU(nn.Module):
    """Per-channel PReLU as torch ``nn.PReLU(C)``: ``y = x if x >= 0 else a_c * x``.

    Param ``negative_slope`` (C,) float32, initialised to 0.25."""

    dtype: jnp.dtype = jnp.float32
    init_value: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("negative_slope", nn.initializers.constant(self.init_value),
                           (x.shape[-1],), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


# ----------------------------------------------------------------------------- remat
REMAT_POLICIES: tuple[str, ...] = (
    "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
"""``jax.checkpoint_policies`` that need no arguments, selectable by name as ``remat``."""

REMAT_CHOICES: tuple[str, ...] = ("none", "blocks") + REMAT_POLICIES
"""Values of a backbone's ``remat`` field (the ``model.remat`` config key):

* "none": no gradient checkpointing (every activation the backward needs is kept);
* "blocks": each residual block (IResNet ``IBasicBlock``, MobileFaceNet ``DepthWise``,
  ViT ``Block``) is a ``jax.checkpoint`` that saves only its input: everything inside
  it is recomputed in the backward pass (= "nothing_saveable" within a block);
* a policy name: the same per-block checkpoint, keeping what ``jax.checkpoint_policies.<name>``
  saves (e.g. "dots_saveable": the matmul/conv outputs, recomputing the elementwise ops).
"""


def check_remat(remat: str, model: str = "model") -> None:
    """Raises ValueError unless ``remat`` is one of :data:`REMAT_CHOICES`."""
    if remat not in REMAT_CHOICES:
        raise ValueError(f"{model}: remat must be one of {REMAT_CHOICES}, got {remat!r}")


@functools.lru_cache(maxsize=None)
def remat_block(cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = (2,)) -> type[nn.Module]:
    """``cls`` with gradient checkpointing ``remat`` (:data:`REMAT_CHOICES`) around its ``__call__``.

    "none" returns ``cls`` itself; otherwise ``nn.remat(cls, policy=..., static_argnums=...)``
    ("blocks": policy None, i.e. nothing inside the block is saved). Parameter and
    variable names do not change (a block keeps the ``name=`` it is given), so checkpoints
    and converted weights load with any ``remat``. Cached: one class per (cls, remat).

    Args:
      cls: a block whose ``__call__(self, x, train)`` takes ``train`` positionally.
      remat: a name in :data:`REMAT_CHOICES`.
      static_argnums: arguments of ``__call__`` that are Python values, ``self`` = 0
        (default: ``train``, argument 2, which selects batch or running statistics).

    Returns:
      A module class with the fields of ``cls``.
    """
    check_remat(remat, cls.__name__)
    if remat == "none":
        return cls
    policy = None if remat == "blocks" else getattr(jax.checkpoint_policies, remat)
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)
