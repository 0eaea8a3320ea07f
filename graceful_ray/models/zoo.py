"""The built-in model zoo: an MLP, a 1-D CNN (MNIST-1D), a small ResNet and ResNet-18/50 (images).

Every factory takes ``input_shape`` and ``num_classes`` plus its own knobs and
returns an :class:`EmbeddingClassifier`. ``activation`` is configurable because
LQF linearizes networks with leaky-ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from graceful_ray.errors import ModelError
from graceful_ray.models.base import EmbeddingClassifier, _numel

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": lambda: nn.GELU(),
}


def _act(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ModelError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def mlp(input_shape: tuple[int, ...], num_classes: int, *, width: int = 256, depth: int = 2,
        embedding_dim: int = 64, activation: str = "relu") -> EmbeddingClassifier:
    """A plain MLP: ``depth`` hidden layers of ``width``, then a linear embedding."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = _numel(tuple(input_shape))
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), _act(activation)]
        fan_in = width
    layers.append(nn.Linear(fan_in, embedding_dim))
    return EmbeddingClassifier(nn.Sequential(*layers), embedding_dim, num_classes, input_shape)


class _Cnn1dBackbone(nn.Module):
    def __init__(self, length: int, channels: int, depth: int, embedding_dim: int, activation: str):
        super().__init__()
        convs: list[nn.Module] = []
        c_in = 1
        for i in range(depth):
            # stride 2 after the first layer halves the sequence, as in MNIST-1D's CNN
            convs += [nn.Conv1d(c_in, channels, kernel_size=5, stride=1 if i == 0 else 2, padding=2),
                      _act(activation)]
            c_in = channels
        self.convs = nn.Sequential(*convs)
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, 1, length)).numel()
        self.proj = nn.Linear(flat, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x.reshape(x.shape[0], 1, -1))
        return self.proj(h.flatten(1))


def cnn1d(input_shape: tuple[int, ...], num_classes: int, *, channels: int = 32, depth: int = 3,
          embedding_dim: int = 64, activation: str = "relu") -> EmbeddingClassifier:
    """A 1-D CNN for sequence features such as MNIST-1D (length 40)."""
    length = _numel(tuple(input_shape))
    backbone = _Cnn1dBackbone(length, channels, depth, embedding_dim, activation)
    return EmbeddingClassifier(backbone, embedding_dim, num_classes, input_shape)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = _act(activation)
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class _ResNetBackbone(nn.Module):
    def __init__(self, in_channels: int, width: int, blocks: tuple[int, ...], embedding_dim: int,
                 activation: str):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), _act(activation))
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            for j in range(n):
                stages.append(_BasicBlock(c, c_out, 2 if (j == 0 and i > 0) else 1, activation))
                c = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(c, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet(input_shape: tuple[int, ...], num_classes: int, *, width: int = 32,
           blocks: tuple[int, ...] | list[int] = (2, 2, 2), embedding_dim: int = 128,
           activation: str = "relu") -> EmbeddingClassifier:
    """A CIFAR-style ResNet (BasicBlocks) for (C, H, W) images; meant for GPU clusters."""

    if len(input_shape) != 3:
        raise ModelError(f"resnet expects (channels, height, width) inputs, got shape {tuple(input_shape)}")
    backbone = _ResNetBackbone(int(input_shape[0]), width, tuple(blocks), embedding_dim, activation)
    return EmbeddingClassifier(backbone, embedding_dim, num_classes, input_shape)


class _Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), stride on the 3x3."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, activation: str):
        super().__init__()
        c_out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes), _act(activation),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), _act(activation),
            nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.act = _act(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _StandardResNet(nn.Module):
    """ResNet-18/50 (He et al. 2016): four stages of widths w, 2w, 4w, 8w.

    Inputs up to 64 pixels get the CIFAR stem (3x3 conv, no max-pool), which keeps
    the spatial size a 32x32 image needs; larger ones the ImageNet stem (7x7/2
    conv and a 3x3/2 max-pool).
    """

    def __init__(self, in_channels: int, side: int, bottleneck: bool, layers: tuple[int, ...], width: int,
                 embedding_dim: int, activation: str):
        super().__init__()
        if side <= 64:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      _act(activation))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      _act(activation), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                stride = 2 if (j == 0 and i > 0) else 1
                if bottleneck:
                    blocks.append(_Bottleneck(c, planes, stride, activation))
                    c = planes * _Bottleneck.expansion
                else:
                    blocks.append(_BasicBlock(c, planes, stride, activation))
                    c = planes
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(c, embedding_dim)
        for m in self.modules():  # He init; the last BN of each block at 0 (Goyal et al.), so blocks start as identity
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.stages:
            last_bn = m.body[-1] if isinstance(m, _Bottleneck) else m.bn2
            nn.init.zeros_(last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stages(self.stem(x))).flatten(1))


def _standard_resnet(input_shape, num_classes, bottleneck, layers, width, embedding_dim, activation):
    if len(input_shape) != 3:
        raise ModelError(f"resnet expects (channels, height, width) inputs, got shape {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    backbone = _StandardResNet(c, max(h, w), bottleneck, layers, width, embedding_dim, activation)
    return EmbeddingClassifier(backbone, embedding_dim, num_classes, input_shape)


def resnet18(input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, embedding_dim: int = 512,
             activation: str = "relu") -> EmbeddingClassifier:
    """ResNet-18: BasicBlocks (2, 2, 2, 2), 11M parameters at width 64."""
    return _standard_resnet(input_shape, num_classes, False, (2, 2, 2, 2), width, embedding_dim, activation)


def resnet50(input_shape: tuple[int, ...], num_classes: int, *, width: int = 64, embedding_dim: int = 2048,
             activation: str = "relu") -> EmbeddingClassifier:
    """ResNet-50: Bottlenecks (3, 4, 6, 3), 23M parameters (backbone) at width 64."""
    return _standard_resnet(input_shape, num_classes, True, (3, 4, 6, 3), width, embedding_dim, activation)
