"""IResNet (insightface ``backbones/iresnet.py``) in Flax Linen, channels-last.

Topology (insightface recognition/arcface_torch/backbones/iresnet.py), for an image of S x S (S a multiple of 16):

    stem:   conv3x3 s1 (w0) -> BN -> PReLU
    stage k (k = 1..4, width w_k, n_k blocks): first block stride 2 with a
            downsample (conv1x1 s2 + BN), the others stride 1.
    IBasicBlock: BN -> conv3x3 s1 -> BN -> PReLU -> conv3x3 (stride) -> BN, + identity
    head:   BN2d -> flatten -> dropout -> Dense(w4 * (S/16)^2 -> E, bias)
            -> BatchNorm1d with scale fixed at 1 (no ``scale`` param; torch
               keeps a frozen weight of ones, counted by :attr:`IResNet.num_fixed_params`).

Submodule names mirror the PyTorch ``state_dict`` keys with ``_<i>`` for ``.<i>``
(``layer3_5.bn2`` is torch ``layer3.5.bn2``), so ``convert.py`` maps names
mechanically. The flatten is NHWC here and NCHW in torch: the converter permutes
the rows of ``fc`` (activations are never transposed at run time).

The stem, stages and BN2d run in ``dtype``; the fc and the final BN run in
float32 (as insightface's fp16 mode) and embeddings are float32.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from x2jax.models.layers import BatchNorm, Conv, PReLU, remat_block

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
IRESNET_WIDTHS = (64, 128, 256, 512)


def check_images(images: jax.Array, image_size: int, model: str) -> None:
    """Raises ValueError unless ``images`` is float (B, S, S, 3) NHWC."""
    expected = (image_size, image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"{model} expects images (B, {image_size}, {image_size}, 3) NHWC; got shape "
            f"{tuple(images.shape)}" + (" (NCHW? transpose to NHWC)"
                                         if images.ndim == 4 and images.shape[1] == 3 else ""))
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{model} expects float images normalised as (x/255 - 0.5)/0.5; "
                         f"got dtype {images.dtype}")


BATCH_NORMS = ("global", "local")


def bn_groups(batch_norm: str, batch_shards: int, model: str) -> int:
    """BatchNorm groups of a backbone: ``batch_shards`` for "local" statistics, 1 for "global".

    Raises:
      ValueError: ``batch_norm`` not in :data:`BATCH_NORMS`, or ``batch_shards < 1``.
    """
    if batch_norm not in BATCH_NORMS:
        raise ValueError(f"{model}: batch_norm must be one of {BATCH_NORMS}, got {batch_norm!r}")
    if int(batch_shards) < 1:
        raise ValueError(f"{model}: batch_shards must be >= 1, got {batch_shards}")
    return int(batch_shards) if batch_norm == "local" else 1


def check_image_size(image_size: int, model: str) -> None:
    if image_size <= 0 or image_size % 16:
        raise ValueError(f"{model}: image_size must be a positive multiple of 16, got {image_size}")


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus (downsampled) identity."""

    planes: int
    stride: int = 1
    downsample: bool = False
    conv_impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    bn_groups: int = 1  # BatchNorm statistics per group of the batch (layers.BatchNorm.groups)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, groups=self.bn_groups,
                                    name=name)
        conv = lambda name, k, s, p: Conv(self.planes, k, s, p, conv_impl=self.conv_impl,
                                          dtype=self.dtype, name=name)
        out = bn("bn1")(x)
        out = conv("conv1", 3, 1, 1)(out)
        out = bn("bn2")(out)
        out = PReLU(dtype=self.dtype, name="prelu")(out)
        out = conv("conv2", 3, self.stride, 1)(out)
        out = bn("bn3")(out)
        identity = x
        if self.downsample:
            identity = conv("downsample_0", 1, self.stride, 0)(x)
            identity = bn("downsample_1")(identity)
        return out + identity


class IResNet(nn.Module):
    """IResNet backbone: ``apply(variables, images (B, S, S, 3), train) -> (B, E) float32``.

    Attributes:
      layers: blocks per stage (4 stages).
      widths: channels per stage; the stem has ``widths[0]``.
      embedding_size: E.
      image_size: S, a multiple of 16 (the fc sees ``widths[-1] * (S/16)^2`` features).
      dropout: rate before the fc (insightface default 0; needs a 'dropout' rng if > 0).
      dtype: compute dtype of the convolutional trunk (params stay float32).
      conv_impl: name of the conv implementation (``layers.CONV_IMPLS``).
      remat: gradient checkpointing per IBasicBlock, a name in ``layers.REMAT_CHOICES``
        ("none", "blocks" or a ``jax.checkpoint_policies`` name); same parameters.
      batch_norm: training BatchNorm statistics over the "global" batch or per device ("local").
      batch_shards: devices the training batch is split over (the mesh's batch shards,
        set by ``ModelSpec.build``); with ``batch_norm="local"`` each BatchNorm takes its
        statistics per shard (:func:`bn_groups`); ignored with "global" and in evaluation.
      arch: name used in error messages.
    """

    layers: Sequence[int]
    widths: Sequence[int] = IRESNET_WIDTHS
    embedding_size: int = 512
    image_size: int = 112
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    remat: str = "none"
    batch_norm: str = "global"
    batch_shards: int = 1
    arch: str = "iresnet"

    @property
    def num_fixed_params(self) -> int:
        """Torch parameters with no Flax counterpart: the frozen BatchNorm1d weight (E)."""
        return self.embedding_size

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        check_image_size(self.image_size, self.arch)
        check_images(images, self.image_size, self.arch)
        if len(self.layers) != 4 or len(self.widths) != 4:
            raise ValueError(f"{self.arch}: layers and widths need 4 stages, got "
                             f"{tuple(self.layers)} and {tuple(self.widths)}")
        x = images.astype(self.dtype)
        groups = bn_groups(self.batch_norm, self.batch_shards, self.arch)
        x = Conv(self.widths[0], 3, 1, 1, conv_impl=self.conv_impl, dtype=self.dtype,
                 name="conv1")(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, groups=groups, name="bn1")(x)
        x = PReLU(dtype=self.dtype, name="prelu")(x)
        block = remat_block(IBasicBlock, self.remat)  # "none": IBasicBlock itself
        for stage, (num_blocks, planes) in enumerate(zip(self.layers, self.widths)):
            for i in range(num_blocks):
                x = block(planes, stride=2 if i == 0 else 1, downsample=i == 0,
                          conv_impl=self.conv_impl, dtype=self.dtype, bn_groups=groups,
                          name=f"layer{stage + 1}_{i}")(x, train)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, groups=groups, name="bn2")(x)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)  # NHWC flatten (see convert.py)
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        fan_in = x.shape[-1]
        bound = fan_in ** -0.5  # torch nn.Linear default init: U(-1/sqrt(fan_in), +)
        x = nn.Dense(self.embedding_size, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                     bias_init=lambda key, shape, dtype: jax.random.uniform(
                         key, shape, dtype, -bound, bound),
                     name="fc")(x)
        x = BatchNorm(use_running_average=not train, use_scale=False, dtype=jnp.float32, groups=groups,
                      name="features")(x)
        chex.assert_shape(x, (images.shape[0], self.embedding_size))
        chex.assert_type(x, jnp.float32)
        return x
