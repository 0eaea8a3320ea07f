"""Test-only model factories that misbehave on purpose, for shadow isolation tests.

They are published to a test registry like any model (``ModelSpec`` factory
``tests.test_serve_faults:slow_mlp``), so the service runs them through its
normal loading path: fault injection needs no hook in the service itself.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from graceful_ray.models.base import EmbeddingClassifier
from graceful_ray.models.zoo import mlp


class _Delayed(nn.Module):
    """A backbone that sleeps before computing (a slow model)."""

    def __init__(self, inner: nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = float(delay_s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(x)


class _Failing(nn.Module):
    """A backbone that always raises (a broken model)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected failure: this test model always raises")


class _Switching(EmbeddingClassifier):
    """A model that regresses on one class once ``switch_file`` exists: where it
    would answer ``cls`` it answers ``cls + 1`` instead. Until then it gives
    exactly the base model's answers (a candidate fine on the first traffic)."""

    def __init__(self, base: EmbeddingClassifier, cls: int, switch_file: str) -> None:
        super().__init__(base.backbone, base.embedding_dim, base.num_classes, base.input_shape)
        self.head = base.head
        self.cls = int(cls)
        self.switch_file = switch_file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not os.path.exists(self.switch_file):
            return logits
        hit = logits.argmax(dim=1) == self.cls
        nxt = (self.cls + 1) % self.num_classes
        out = logits.clone()
        out[hit, self.cls], out[hit, nxt] = logits[hit, nxt], logits[hit, self.cls]
        return out


def switching_mlp(input_shape, num_classes, *, switch_file: str, wrong_class: int = 7,
                  **kwargs) -> EmbeddingClassifier:
    return _Switching(mlp(input_shape, num_classes, **kwargs), wrong_class, switch_file)


def _wrap(base: EmbeddingClassifier, backbone: nn.Module) -> EmbeddingClassifier:
    model = EmbeddingClassifier(backbone, base.embedding_dim, base.num_classes, base.input_shape)
    model.head = base.head
    return model


def slow_mlp(input_shape, num_classes, *, delay_s: float = 1.0, **kwargs) -> EmbeddingClassifier:
    base = mlp(input_shape, num_classes, **kwargs)
    return _wrap(base, _Delayed(base.backbone, delay_s))


def failing_mlp(input_shape, num_classes, **kwargs) -> EmbeddingClassifier:
    base = mlp(input_shape, num_classes, **kwargs)
    return _wrap(base, _Failing(base.backbone))


KW = {"width": 16, "depth": 1, "embedding_dim": 8}


def test_slow_mlp_sleeps_then_answers():
    model = slow_mlp((40,), 10, delay_s=0.2, **KW)
    t0 = time.perf_counter()
    out = model(torch.zeros(2, 40))
    assert out.shape == (2, 10) and time.perf_counter() - t0 >= 0.2


def test_failing_mlp_raises():
    with pytest.raises(RuntimeError, match="injected failure"):
        failing_mlp((40,), 10, **KW)(torch.zeros(1, 40))


def test_switching_mlp_is_the_base_model_until_the_switch(tmp_path):
    torch.manual_seed(0)
    flag = tmp_path / "regress"
    model = switching_mlp((40,), 10, switch_file=str(flag), **KW)
    base = EmbeddingClassifier(model.backbone, model.embedding_dim, 10, (40,))
    base.head = model.head
    x = torch.randn(4000, 40)
    with torch.inference_mode():
        before = base(x).argmax(1)
        model.cls = c = int(before.mode().values)  # a class this untrained model answers
        assert torch.equal(model(x).argmax(1), before)
        flag.touch()
        after = model(x).argmax(1)
    hit = before == c
    assert torch.equal(after[hit], torch.full_like(after[hit], (c + 1) % 10))
    assert torch.equal(after[~hit], before[~hit])
