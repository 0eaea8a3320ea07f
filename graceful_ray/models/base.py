"""The one shape every graceful-ray model has: a backbone and a linear head.

Compatibility losses reach into either part (BCT feeds the new embedding through
the old head; the L2 baseline compares embeddings; focal distillation compares
logits), so the split is part of the contract, not an implementation detail.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from graceful_ray.errors import ModelError


class ModelOutput(NamedTuple):
    embedding: torch.Tensor  # (B, d)
    logits: torch.Tensor  # (B, K)


class EmbeddingClassifier(nn.Module):
    """``backbone(x) -> embedding (B, d)``, ``head(embedding) -> logits (B, K)``.

    ``input_shape`` is the shape of one sample without the batch dimension; it is
    checked on every call so a wrong input fails with a message naming both
    shapes instead of a matmul error deep inside torch.
    """

    def __init__(self, backbone: nn.Module, embedding_dim: int, num_classes: int,
                 input_shape: tuple[int, ...], head: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        # ``head`` is given when an existing network is split (models/wrapped.py).
        self.head = nn.Linear(embedding_dim, num_classes) if head is None else head
        self.embedding_dim = int(embedding_dim)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            # Accept flat features for a model declared on a reshaped input.
            if x.dim() == 2 and x.shape[1] == _numel(self.input_shape):
                return x.reshape(x.shape[0], *self.input_shape)
            raise ModelError(
                f"input of shape {tuple(x.shape)} does not fit this model: it expects "
                f"(batch, {', '.join(map(str, self.input_shape))})"
            )
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._check(x))

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        z = self.embed(x)
        return ModelOutput(z, self.head(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
