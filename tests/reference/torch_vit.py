"""PyTorch reference of arcface_torch's ViT (``backbones/vit.py``), written from its description.

An independent definition for the tests and benchmarks: the module tree, and so the
``state_dict`` keys, are arcface_torch's (``patch_embed.proj``, ``pos_embed``,
``mask_token``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
``feature.{0,1,2,3}``). Generalised over patch size and crop (pixels dropped at the bottom
and right; arcface_torch: patch 9 on 112 px, 4 dropped) so that small variants run fast.
``forward(x, noise=None)`` takes the masking noise as an argument (default: ``torch.rand``),
so a test can feed the Flax model the same one. Import needs torch.
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = {  # embed dim, depth, heads, drop path, mask ratio (arcface_torch get_model)
    "vit_t": (256, 12, 8, 0.1, 0.1),
    "vit_s": (512, 12, 8, 0.1, 0.1),
    "vit_b": (512, 24, 8, 0.1, 0.1),
    "vit_l": (768, 24, 8, 0.05, 0.05),  # vit_l_dp005_mask_005
}


class DropPath(nn.Module):
    """Per-example stochastic depth: the branch times Bernoulli(1 - p) / (1 - p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep) / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).float()
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # float32
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, G, G) -> (B, G*G, D)


class VisionTransformer(nn.Module):
    def __init__(self, embed_dim: int = 256, depth: int = 12, heads: int = 8, drop_path_rate: float = 0.1,
                 mask_ratio: float = 0.1, num_features: int = 512, image_size: int = 112, patch: int = 9,
                 crop: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed_dim, self.mask_ratio, self.crop = embed_dim, mask_ratio, crop
        grid = (image_size - crop) // patch
        self.num_patches = grid * grid
        self.patch_embed = PatchEmbed(patch, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, heads, r, mlp_ratio) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        with torch.no_grad():
            nn.init.normal_(self.mask_token, std=0.02)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        m.bias.zero_()

    def forward(self, x, noise: torch.Tensor | None = None):
        b = x.shape[0]
        if self.crop:  # the stride-p conv would drop these rows and columns anyway
            x = x[:, :, : x.shape[2] - self.crop, : x.shape[3] - self.crop]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            n = x.shape[1]
            keep = int(n * (1 - self.mask_ratio))
            noise = torch.rand(b, n, device=x.device) if noise is None else noise
            order = noise.argsort(dim=1)  # smallest noise first: kept
            inverse = order.argsort(dim=1)
            x = x.gather(1, order[:, :keep, None].expand(-1, -1, self.embed_dim))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        if masking:
            fill = self.mask_token.expand(b, n - keep, -1)
            x = torch.cat([x, fill], dim=1).gather(1, inverse[..., None].expand(-1, -1, self.embed_dim))
        return self.feature(x.reshape(b, self.num_patches * self.embed_dim))


def vit(name: str, **kwargs) -> VisionTransformer:
    """An arcface_torch variant by name (``VARIANTS``); keywords override."""
    dim, depth, heads, dp, mask = VARIANTS[name]
    args = dict(embed_dim=dim, depth=depth, heads=heads, drop_path_rate=dp, mask_ratio=mask)
    return VisionTransformer(**{**args, **kwargs})


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of O(1) activations: Linear/conv ~ N(0, 1/fan_in), biases, LayerNorm
    and BatchNorm affine parameters and BatchNorm running statistics all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.num_batches_tracked.fill_(1234)
    if isinstance(model, VisionTransformer):
        model.pos_embed.copy_(0.5 * torch.randn(model.pos_embed.shape, generator=g))
        model.mask_token.copy_(torch.randn(model.mask_token.shape, generator=g))
    return model
