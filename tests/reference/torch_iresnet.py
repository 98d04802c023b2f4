"""PyTorch reference backbones following insightface ``arcface_torch/backbones``.

Written for the tests (and benchmarks) as an independent reference: the module
structure and therefore the ``state_dict`` keys are insightface's
(``conv1``, ``bn1``, ``prelu``, ``layer{k}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}``,
``bn2``, ``fc``, ``features``; MobileFaceNet ``layers.{i}...``, ``conv_sep``,
``features.layers...``). Generalised over stage widths and image size.
Import needs torch (an optional extra).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6),
}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    def __init__(self, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256, 512),
                 num_features: int = 512, image_size: int = 112, dropout: float = 0.0):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        for k, (blocks, planes) in enumerate(zip(layers, widths)):
            setattr(self, f"layer{k + 1}", self._make_layer(planes, blocks, stride=2))
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        side = image_size // 16
        self.fc = nn.Linear(widths[-1] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet(name: str, **kwargs) -> IResNet:
    return IResNet(IRESNET_LAYERS[name], **kwargs)


# ---------------------------------------------------------------- MobileFaceNet
class ConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1, linear=False):
        super().__init__()
        mods = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                nn.BatchNorm2d(cout)]
        if not linear:
            mods.append(nn.PReLU(cout))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, cin, cout, residual=False, stride=2, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups, 1),
            ConvBlock(groups, groups, 3, stride, 1, groups=groups),
            ConvBlock(groups, cout, 1, linear=True))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size, side=7):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, side, groups=512, linear=True),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2, image_size=112):
        super().__init__()
        c = 64 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c, 3, 2, 1))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c, c, 3, 1, 1, groups=64))
        else:
            self.layers.append(Residual(c, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c, c, stride=2, groups=128), Residual(c, blocks[1], groups=128),
            DepthWise(c, 2 * c, stride=2, groups=256), Residual(2 * c, blocks[2], groups=256),
            DepthWise(2 * c, 2 * c, stride=2, groups=512), Residual(2 * c, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(2 * c, 512, 1)
        self.features = GDC(num_features, side=image_size // 16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


# ---------------------------------------------------------------- helpers
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, incl. non-trivial BN running stats and PReLU slopes.

    Conv weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through deep nets
    (the comparison is then meaningful at a 1e-4 tolerance). A frozen BN1d weight
    (``requires_grad`` False, IResNet ``features``) stays at ones.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            if m.weight.requires_grad:
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.num_batches_tracked.fill_(1234)
        elif isinstance(m, nn.PReLU):
            m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=g))
    return model


def num_params(model: nn.Module) -> int:
    """All torch parameters, frozen ones included (as insightface reports)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def calibrate_bn_(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Sets every BN's running statistics to those of ``images`` (one train-mode pass with
    a cumulative average), then switches to eval: activations stay O(1) through deep
    nets, so an absolute tolerance on the embeddings is meaningful."""
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(images)
    for m in bns:
        m.momentum = 0.1
    return model.eval()
