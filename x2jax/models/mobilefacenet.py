"""MobileFaceNet as insightface ``backbones/mobilefacenet.py`` ("mbf"), in Flax Linen, NHWC.

Topology with channel multiplier ``scale`` (c = 64 * scale) and ``blocks`` (b0..b3):

    layers_0  ConvBlock(3 -> c, 3x3 s2)
    layers_1  ConvBlock(c -> c, 3x3 s1, groups 64) if b0 == 1 else Residual(c, b0, g=128)
    layers_2  DepthWise(c -> c, s2, g=128)        layers_3  Residual(c, b1, g=128)
    layers_4  DepthWise(c -> 2c, s2, g=256)       layers_5  Residual(2c, b2, g=256)
    layers_6  DepthWise(2c -> 2c, s2, g=512)      layers_7  Residual(2c, b3, g=256)
    conv_sep  ConvBlock(2c -> 512, 1x1)
    features  GDC: LinearBlock(512, depthwise S/16 x S/16) -> flatten
              -> Linear(512 -> E, no bias) -> BatchNorm1d(E)

    ConvBlock = conv -> BN -> PReLU; LinearBlock = conv -> BN;
    DepthWise(in -> out, g) = ConvBlock(in -> g, 1x1) -> ConvBlock(g, g x g-grouped 3x3,
    stride) -> LinearBlock(g -> out, 1x1), plus identity inside a Residual.

Names mirror the PyTorch ``state_dict`` (``layers_3.layers_1.layers_0`` is torch
``layers.3.layers.1.layers.0``). insightface's "mbf" is blocks (1, 4, 6, 2), scale 2;
"mbf_large" is (2, 8, 12, 4), scale 4. Conv and Linear init: kaiming normal, fan_out.
The trunk runs in ``dtype``; conv_sep and the GDC head in float32 (insightface's fp16
mode does the same); embeddings are float32.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from x2jax.models.iresnet import bn_groups, check_image_size, check_images
from x2jax.models.layers import BatchNorm, Conv, PReLU, remat_block

_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU (``linear=True``: no PReLU, insightface LinearBlock)."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    bn_groups: int = 1  # BatchNorm statistics per group of the batch (layers.BatchNorm.groups)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = Conv(self.features, self.kernel_size, self.strides, self.padding, self.groups,
                 conv_impl=self.conv_impl, dtype=self.dtype, kernel_init=_KAIMING_FAN_OUT,
                 name="layers_0")(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, groups=self.bn_groups,
                      name="layers_1")(x)
        if not self.linear:
            x = PReLU(dtype=self.dtype, name="layers_2")(x)
        return x


class DepthWise(nn.Module):
    """1x1 expand to ``groups`` -> grouped 3x3 (stride) -> 1x1 linear projection (+ x)."""

    features: int
    groups: int
    strides: int = 1
    residual: bool = False
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, bn_groups=self.bn_groups)
        y = ConvBlock(self.groups, 1, name="layers_0", **kw)(x, train)
        y = ConvBlock(self.groups, 3, self.strides, 1, groups=self.groups, name="layers_1",
                      **kw)(y, train)
        y = ConvBlock(self.features, 1, linear=True, name="layers_2", **kw)(y, train)
        return x + y if self.residual else y


class Residual(nn.Module):
    """``num_blocks`` residual DepthWise blocks at constant width (each one checkpointed
    with ``remat``, a name in ``layers.REMAT_CHOICES``)."""

    features: int
    num_blocks: int
    groups: int
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    bn_groups: int = 1
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        block = remat_block(DepthWise, self.remat)
        for i in range(self.num_blocks):
            x = block(self.features, self.groups, residual=True, conv_impl=self.conv_impl,
                          dtype=self.dtype, bn_groups=self.bn_groups, name=f"layers_{i}")(x, train)
        return x


class GDC(nn.Module):
    """Global depthwise conv (kernel = spatial size) -> flatten -> Linear (no bias) -> BN1d."""

    embedding_size: int
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"GDC expects a square feature map, got {x.shape}")
        x = ConvBlock(x.shape[-1], x.shape[1], groups=x.shape[-1], linear=True,
                      conv_impl=self.conv_impl, dtype=self.dtype, bn_groups=self.bn_groups,
                      name="layers_0")(x, train)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)  # (B, 1, 1, C): same order as NCHW
        x = nn.Dense(self.embedding_size, use_bias=False, dtype=jnp.float32,
                     param_dtype=jnp.float32, kernel_init=_KAIMING_FAN_OUT, name="layers_2")(x)
        return BatchNorm(use_running_average=not train, dtype=jnp.float32, groups=self.bn_groups,
                         name="layers_3")(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``apply(variables, images (B, S, S, 3), train) -> (B, E) float32``."""

    blocks: Sequence[int] = (1, 4, 6, 2)
    scale: int = 2
    embedding_size: int = 512
    image_size: int = 112
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    remat: str = "none"  # gradient checkpointing of every DepthWise block (layers.REMAT_CHOICES)
    batch_norm: str = "global"  # training BN statistics: "global" batch or per device ("local")
    batch_shards: int = 1  # devices the training batch is split over (IResNet.batch_shards)
    arch: str = "mobilefacenet"

    num_fixed_params = 0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        check_image_size(self.image_size, self.arch)
        check_images(images, self.image_size, self.arch)
        if len(self.blocks) != 4:
            raise ValueError(f"{self.arch}: blocks needs 4 entries, got {tuple(self.blocks)}")
        groups = bn_groups(self.batch_norm, self.batch_shards, self.arch)
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, bn_groups=groups)
        c = 64 * self.scale
        b0, b1, b2, b3 = self.blocks
        x = images.astype(self.dtype)
        x = ConvBlock(c, 3, 2, 1, name="layers_0", **kw)(x, train)
        if b0 == 1:
            x = ConvBlock(c, 3, 1, 1, groups=64, name="layers_1", **kw)(x, train)
        else:
            x = Residual(c, b0, groups=128, remat=self.remat, name="layers_1", **kw)(x, train)
        depthwise = remat_block(DepthWise, self.remat)  # "none": DepthWise itself
        x = depthwise(c, groups=128, strides=2, name="layers_2", **kw)(x, train)
        x = Residual(c, b1, groups=128, remat=self.remat, name="layers_3", **kw)(x, train)
        x = depthwise(2 * c, groups=256, strides=2, name="layers_4", **kw)(x, train)
        x = Residual(2 * c, b2, groups=256, remat=self.remat, name="layers_5", **kw)(x, train)
        x = depthwise(2 * c, groups=512, strides=2, name="layers_6", **kw)(x, train)
        x = Residual(2 * c, b3, groups=256, remat=self.remat, name="layers_7", **kw)(x, train)
        # As insightface's fp16 mode: the trunk runs in `dtype`, conv_sep and GDC in float32.
        kw32 = dict(conv_impl=self.conv_impl, dtype=jnp.float32, bn_groups=groups)
        x = ConvBlock(512, 1, name="conv_sep", **kw32)(x, train)
        x = GDC(self.embedding_size, name="features", **kw32)(x, train)
        chex.assert_shape(x, (images.shape[0], self.embedding_size))
        chex.assert_type(x, jnp.float32)
        return x
