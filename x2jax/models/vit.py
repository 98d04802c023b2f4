"""Vision Transformer of insightface ``arcface_torch/backbones/vit.py`` in Flax Linen, NHWC input.

Topology, for an image of S x S, patch p, crop c (insightface: S = 112, p = 9, c = 4),
grid G = (S - c) / p, N = G^2 tokens of width D, E = embedding size:

    patch_embed  conv p x p, stride p, bias (3 -> D) on the image less its last c rows
                 and columns (insightface's stride-9 conv covers 108 of 112 px)
                 -> (B, N, D) tokens in row-major grid order, + pos_embed (1, N, D)
    [training, mask_ratio r > 0] keep int(N (1 - r)) tokens per image, those of the
                 smallest uniform noise (the blocks see only these)
    blocks_i     x = x + drop_path(attn(norm1(x))); x = x + drop_path(mlp(norm2(x)))
                 attn: qkv Dense(D -> 3D, no bias), H heads, softmax(q k^T / sqrt(D/H)) v,
                 proj Dense(D -> D); mlp: fc1 Dense(D -> 4D) -> ReLU6 -> fc2 Dense(4D -> D);
                 LayerNorm eps 1e-5; drop path rate of block i = rate * i / (depth - 1)
    norm         LayerNorm
    [training, r > 0] the dropped tokens come back as the learned mask_token (after
                 ``norm``), each token at its grid position
    feature      flatten (B, N * D) -> feature_0 Dense(N D -> D, no bias) -> feature_1 BN1d
                 (eps 2e-5) -> feature_2 Dense(D -> E, no bias) -> feature_3 BN1d (eps 2e-5)

No class token. Evaluation (``train=False``) masks nothing and drops no path. In
training, the mask noise and the drop-path draws come from the ``"dropout"`` rng
stream (``rngs={"dropout": key}``, which the train step passes), so a run is a
function of its seed and resumes bitwise.

Submodule and variable names mirror the torch ``state_dict`` keys (``blocks_3/attn/qkv``
is ``blocks.3.attn.qkv``; ``pos_embed`` and ``mask_token`` keep their names), so
``convert.py`` maps them mechanically; the token order equals torch's
``proj(x).flatten(2).transpose(1, 2)``, so ``feature.0.weight`` needs only a transpose.

Precision, as insightface's fp16 autocast regions: the patch embedding, position
embedding, residual stream, LayerNorms and the head run in float32; qkv, attention,
proj, fc1 and fc2 in ``dtype``, with the attention logits and softmax in float32
(``jax.nn.dot_product_attention``). Embeddings are float32.

Initialisation as arcface_torch: Dense kernels and ``pos_embed`` truncated normal with
std 0.02 (timm's ``trunc_normal_``: cut at +-2 absolute, i.e. +-100 std), Dense biases 0,
``mask_token`` normal(0.02), LayerNorm 1 / 0, the patch conv as ``torch.nn.Conv2d``
(uniform +-1/sqrt(fan_in) for weight and bias), BatchNorm 1 / 0.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from x2jax.models.iresnet import bn_groups, check_images
from x2jax.models.layers import BatchNorm, conv2d, remat_block

LN_EPSILON = 1e-5  # torch.nn.LayerNorm default (arcface_torch keeps it)
HEAD_BN_EPSILON = 2e-5  # arcface_torch's feature BatchNorm1d layers

# timm trunc_normal_(std=0.02) truncates at -2 and 2 (absolute): 100 standard deviations.
_TRUNC_NORMAL = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
_TORCH_CONV_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # U(+-1/sqrt(fan_in))


def vit_grid(image_size: int, patch_size: int, crop: int) -> int:
    """Tokens per side: ``(image_size - crop) / patch_size`` (12 at insightface's 112, 9, 4)."""
    return (image_size - crop) // patch_size


def check_vit_image_size(image_size: int, patch_size: int, crop: int, model: str) -> None:
    """Raises ValueError unless ``image_size - crop`` is a positive multiple of ``patch_size``.

    insightface's rule: the stride-``patch_size`` patch conv drops the last ``crop``
    rows and columns (112 px, patch 9: 4 dropped, 108 = 12 x 9 px used).
    """
    if patch_size < 1 or crop < 0:
        raise ValueError(f"{model}: patch_size must be >= 1 and crop >= 0, got {patch_size}, {crop}")
    used = image_size - crop
    if used >= patch_size and used % patch_size == 0:
        return
    crop_rule = (f"the patch conv drops the last {crop} rows and columns (insightface: 112 -> 108 = "
                 f"12 x 9 px), and {image_size} - {crop} = {used} must then be a positive multiple of "
                 f"the patch {patch_size}" if crop else f"it must be a positive multiple of the patch {patch_size}")
    below = (used // patch_size) * patch_size + crop
    near = [s for s in (below, below + patch_size) if s - crop >= patch_size]
    hint = ", ".join(f"{s} ({vit_grid(s, patch_size, crop)}x{vit_grid(s, patch_size, crop)} tokens)"
                     for s in near)
    raise ValueError(f"{model}: image_size {image_size} does not fit {patch_size}-px patches: {crop_rule}; "
                     f"sizes that fit nearby: {hint}")


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: ``rate * i / (depth - 1)`` (``torch.linspace(0, rate, depth)``)."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


def random_masking(x: jax.Array, noise: jax.Array, len_keep: int) -> tuple[jax.Array, jax.Array]:
    """Keeps the ``len_keep`` tokens of smallest ``noise`` per example (arcface_torch / MAE).

    ``ids_shuffle = argsort(noise)``, ``ids_restore = argsort(ids_shuffle)``; the kept
    tokens are ``x[b, ids_shuffle[b, :len_keep]]``, in order of increasing noise.

    Args:
      x: (B, N, D) tokens.
      noise: (B, N) float, e.g. uniform in [0, 1).
      len_keep: tokens kept per example, ``int(N * (1 - mask_ratio))``.

    Returns:
      The kept tokens (B, len_keep, D) and ``ids_restore`` (B, N) int32 for
      :func:`restore_tokens`.
    """
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :len_keep, None], axis=1)
    return kept, ids_restore.astype(jnp.int32)


def restore_tokens(kept: jax.Array, mask_token: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Inverse of :func:`random_masking` with ``mask_token`` at the dropped positions.

    ``out[b, n] = concat(kept[b], mask_token ...)[ids_restore[b, n]]``.

    Args:
      kept: (B, K, D) tokens.
      mask_token: (1, 1, D).
      ids_restore: (B, N) from :func:`random_masking`.

    Returns:
      (B, N, D): token n is the processed token n if it was kept, else ``mask_token``.
    """
    batch, num_kept, dim = kept.shape
    fill = jnp.broadcast_to(mask_token.astype(kept.dtype), (batch, ids_restore.shape[1] - num_kept, dim))
    full = jnp.concatenate([kept, fill], axis=1)
    return jnp.take_along_axis(full, ids_restore[..., None], axis=1)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth (timm ``DropPath``): per example, ``x / (1 - rate)`` or 0.

    Args:
      x: (B, ...) a residual branch.
      rate: probability of dropping an example's branch, in [0, 1).
      rng: a PRNG key; one Bernoulli(1 - rate) draw per example.

    Returns:
      ``x * keep / (1 - rate)`` with ``keep`` (B, 1, ...) in {0, 1}.
    """
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: jnp.dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_TRUNC_NORMAL, bias_init=nn.initializers.zeros, name=name)


class Attention(nn.Module):
    """Multi-head self-attention: qkv (no bias) -> softmax(q k^T / sqrt(D/H)) v -> proj."""

    dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        # Feature index of qkv = s * D + h * D/H + j (s in q, k, v), as torch's reshape.
        qkv = _dense(3 * self.dim, self.dtype, "qkv", use_bias=False)(x.astype(self.dtype))
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, D/H)
        out = jax.nn.dot_product_attention(q, k, v)  # logits and softmax in float32
        return _dense(self.dim, self.dtype, "proj")(out.reshape(batch, tokens, self.dim))


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> ReLU6 -> fc2 (hidden -> D)."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.hidden, self.dtype, "fc1")(x.astype(self.dtype))
        return _dense(self.dim, self.dtype, "fc2")(jax.nn.relu6(x))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth ``drop_path`` on both branches."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32

    def _drop_path(self, y: jax.Array, train: bool) -> jax.Array:
        if not train or self.drop_path == 0.0:
            return y
        if not self.has_rng("dropout"):
            raise ValueError(f"{self.name}: training with drop path {self.drop_path:g} needs "
                             f"rngs={{'dropout': key}} in apply")
        return drop_path(y, self.drop_path, self.make_rng("dropout"))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = Attention(self.dim, self.num_heads, self.dtype, name="attn")(_layer_norm("norm1")(x))
        x = x + self._drop_path(y.astype(jnp.float32), train)
        y = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2")(x))
        return x + self._drop_path(y.astype(jnp.float32), train)


class PatchProj(nn.Module):
    """The patch conv (p x p, stride p, bias) through :func:`layers.conv2d`, float32."""

    embed_dim: int
    patch_size: int
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        kernel = self.param("kernel", _TORCH_CONV_INIT, (p, p, x.shape[-1], self.embed_dim), jnp.float32)
        bound = (p * p * x.shape[-1]) ** -0.5
        bias = self.param("bias", lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
                          (self.embed_dim,), jnp.float32)
        return conv2d(x, kernel, strides=p, padding=0, impl=self.conv_impl) + bias


class PatchEmbed(nn.Module):
    """(B, S, S, 3) -> (B, G*G, D): the last ``crop`` rows and columns dropped, then ``proj``."""

    embed_dim: int
    patch_size: int
    crop: int
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.crop:
            x = x[:, : x.shape[1] - self.crop, : x.shape[2] - self.crop]
        x = PatchProj(self.embed_dim, self.patch_size, self.conv_impl, name="proj")(x)
        return x.reshape(x.shape[0], -1, self.embed_dim)  # (B, G, G, D) -> row-major tokens


class VisionTransformer(nn.Module):
    """arcface_torch's ViT: ``apply(variables, images (B, S, S, 3), train) -> (B, E) float32``.

    Attributes:
      embed_dim: token width D.
      depth: number of blocks.
      num_heads: attention heads H (D divisible by H).
      drop_path_rate: stochastic depth of the last block (rising linearly from 0).
      mask_ratio: fraction of tokens dropped in training (the mask token takes their place).
      patch_size: p (9 for the arcface_torch variants).
      crop: rows and columns dropped at the bottom and right before the patch conv
        (4: insightface's 112 -> 108); ``image_size - crop`` must be a multiple of ``p``.
      mlp_ratio: MLP hidden width / D.
      embedding_size: E.
      image_size: S.
      dtype: compute dtype of the blocks' matmuls (see the module docstring).
      conv_impl: conv implementation of the patch embedding (``layers.CONV_IMPLS``).
      remat: gradient checkpointing per Block (``layers.REMAT_CHOICES``); same parameters.
      batch_norm: the head's BatchNorm1d training statistics over the "global" batch or
        per device ("local"); the trunk has no BatchNorm.
      batch_shards: devices the training batch is split over (``IResNet.batch_shards``).
      arch: name used in error messages.
    """

    embed_dim: int = 256
    depth: int = 12
    num_heads: int = 8
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.1
    patch_size: int = 9
    crop: int = 4
    mlp_ratio: float = 4.0
    embedding_size: int = 512
    image_size: int = 112
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "xla"
    remat: str = "none"
    batch_norm: str = "global"
    batch_shards: int = 1
    arch: str = "vit"

    num_fixed_params = 0

    @property
    def num_patches(self) -> int:
        """N = G^2 tokens."""
        return vit_grid(self.image_size, self.patch_size, self.crop) ** 2

    def num_kept(self) -> int:
        """Tokens the blocks see in training: ``int(N * (1 - mask_ratio))`` (arcface_torch's rule)."""
        return int(self.num_patches * (1 - self.mask_ratio))

    def _check(self) -> None:
        check_vit_image_size(self.image_size, self.patch_size, self.crop, self.arch)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.arch}: embed_dim {self.embed_dim} is not divisible by "
                             f"num_heads {self.num_heads}")
        if not 0.0 <= self.mask_ratio < 1.0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"{self.arch}: mask_ratio and drop_path_rate must be in [0, 1), got "
                             f"{self.mask_ratio} and {self.drop_path_rate}")
        if self.depth < 1:
            raise ValueError(f"{self.arch}: depth must be >= 1, got {self.depth}")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, *,
                 mask_noise: jax.Array | None = None) -> jax.Array:
        """Embeddings of ``images``.

        Args:
          images: (B, S, S, 3) float, normalised as (x/255 - 0.5)/0.5.
          train: batch statistics in the head, token masking and drop path.
          mask_noise: (B, N) noise that decides the masked tokens (the largest are
            masked) instead of a uniform draw from the "dropout" rng; training with
            ``mask_ratio > 0`` only (for tests against another implementation).

        Returns:
          (B, E) float32.
        """
        self._check()
        check_images(images, self.image_size, self.arch)
        groups = bn_groups(self.batch_norm, self.batch_shards, self.arch)
        batch, n, dim = images.shape[0], self.num_patches, self.embed_dim
        x = PatchEmbed(dim, self.patch_size, self.crop, self.conv_impl, name="patch_embed")(
            images.astype(jnp.float32))
        x = x + self.param("pos_embed", _TRUNC_NORMAL, (1, n, dim), jnp.float32)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, dim), jnp.float32)

        masking = train and self.mask_ratio > 0
        if mask_noise is not None and not masking:
            raise ValueError(f"{self.arch}: mask_noise is used only in training with mask_ratio > 0 "
                             f"(train={train}, mask_ratio={self.mask_ratio})")
        if masking:
            if mask_noise is None:
                if not self.has_rng("dropout"):
                    raise ValueError(f"{self.arch}: training with mask_ratio {self.mask_ratio:g} needs "
                                     f"rngs={{'dropout': key}} in apply")
                mask_noise = jax.random.uniform(self.make_rng("dropout"), (batch, n))
            if tuple(mask_noise.shape) != (batch, n):
                raise ValueError(f"{self.arch}: mask_noise must have shape {(batch, n)}, got "
                                 f"{tuple(mask_noise.shape)}")
            x, ids_restore = random_masking(x, mask_noise, self.num_kept())

        block = remat_block(Block, self.remat)  # "none": Block itself
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block(dim, self.num_heads, self.mlp_ratio, rate, self.dtype, name=f"blocks_{i}")(x, train)
        x = _layer_norm("norm")(x)
        if masking:
            x = restore_tokens(x, mask_token, ids_restore)

        x = x.reshape(batch, n * dim)
        bn = lambda name: BatchNorm(use_running_average=not train, epsilon=HEAD_BN_EPSILON,
                                    dtype=jnp.float32, groups=groups, name=name)
        x = bn("feature_1")(_dense(dim, jnp.float32, "feature_0", use_bias=False)(x))
        x = bn("feature_3")(_dense(self.embedding_size, jnp.float32, "feature_2", use_bias=False)(x))
        chex.assert_shape(x, (batch, self.embedding_size))
        chex.assert_type(x, jnp.float32)
        return x
