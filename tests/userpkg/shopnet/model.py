"""The team's product classifier: an MLP over tabular features whose last layer is ``fc``.

Plain PyTorch; it knows nothing of graceful-ray (the head is simply the module
named ``fc``, as in torchvision's ResNets).
"""

from __future__ import annotations

import torch
from torch import nn


class ShopNet(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int, embedding_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, embedding_dim), nn.ReLU(),
        )
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


def build(in_features: int = 12, num_classes: int = 5, hidden: int = 32,
          embedding_dim: int = 16) -> ShopNet:
    return ShopNet(in_features, num_classes, hidden, embedding_dim)
