"""What a model costs: parameters and FLOPs per sample.

FLOPs are counted by torch's own ``FlopCounterMode`` on one sample, so a user's
model is measured the same way as the zoo's. (Counts matmuls and convolutions,
the operations that dominate; element-wise ops are ignored as usual.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from graceful_ray.models.base import EmbeddingClassifier


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    flops_per_sample: int


def model_cost(model: EmbeddingClassifier) -> ModelCost:
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *model.input_shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        flops = int(counter.get_total_flops())
    finally:
        model.train(was_training)
    return ModelCost(parameters=int(params), flops_per_sample=flops)
