"""Backward compatibility of embedding models, from ``M(Q, G)`` retrieval scores.

An update is compatible when new queries searched against the *old* gallery do
better than the old model did on its own gallery, ``M(new, old) > M(old, old)``
(Shen et al., BCT, CVPR 2020): only then can the gallery be left un-backfilled
without users losing anything. Update gain says how much of the possible gain
(that of a new model trained without the constraint, ``new*``) that delivers.

Across generations v1..vT (CoReS, Biondi et al. 2023), ``M(v_i, v_j)`` with
query model ``v_i`` and gallery model ``v_j`` forms a matrix; only ``i >= j``
(a newer or same model querying an older gallery) is a deployment that can
happen, so that lower triangle is what the summary numbers use:

- AC (empirical compatibility criterion) = share of pairs ``i > j`` with
  ``M(v_i, v_j) > M(v_j, v_j)``, i.e. ``2 / (T (T - 1)) * sum 1[...]``;
- AM (average multi-model accuracy) = mean of the lower triangle *including*
  the diagonal, i.e. ``2 / (T (T + 1)) * sum_{i >= j} M(v_i, v_j)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graceful_ray.errors import MetricsError
from graceful_ray.metrics._arrays import json_float, to_numpy
from graceful_ray.metrics.retrieval import m_score


def is_compatible(m_new_old: float, m_old_old: float) -> bool:
    """The compatibility criterion ``M(new, old) > M(old, old)``, strictly.

    Strict because equality means the new model added nothing on the old
    gallery; NaN on either side is never compatible.
    """
    return bool(_score(m_new_old, "m_new_old") > _score(m_old_old, "m_old_old"))


def update_gain(m_new_old: float, m_old_old: float, m_newstar_newstar: float) -> float:
    """``(M(new, old) - M(old, old)) / (M(new*, new*) - M(old, old))``.

    1 means the compatible update recovers all the gain an unconstrained
    retrain would bring; 0 none; negative, a regression. NaN when
    ``M(new*, new*) == M(old, old)``: with no gain to recover the ratio is
    undefined (and a NaN makes any threshold check fail rather than pass).
    """
    new_old, old_old = _score(m_new_old, "m_new_old"), _score(m_old_old, "m_old_old")
    denom = _score(m_newstar_newstar, "m_newstar_newstar") - old_old
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    return (new_old - old_old) / denom


def _score(x: Any, name: str) -> float:
    """A retrieval score as a float: numbers and 0-d arrays, not strings or bools."""
    if isinstance(x, (str, bytes, bool)) or np.ndim(x) != 0:
        raise MetricsError(f"{name} must be a number (an M(Q, G) score), got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise MetricsError(f"{name} must be a number (an M(Q, G) score), got {x!r}") from None


@dataclass(frozen=True)
class CompatibilityMatrix:
    """``matrix[i, j] = M(v_i query, v_j gallery)`` for generations in training order.

    Entries above the diagonal are NaN unless computed with ``full=True``; AC
    and AM never use them. ``ac`` is NaN for a single generation (no pairs).
    """

    matrix: np.ndarray
    ac: float
    am: float
    metric: str

    @property
    def generations(self) -> int:
        return int(self.matrix.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ac": json_float(self.ac), "am": json_float(self.am),
                "matrix": [[json_float(v) for v in row] for row in self.matrix]}


def compatibility_scores(matrix: Any) -> tuple[float, float]:
    """``(AC, AM)`` of a square ``M(v_i, v_j)`` matrix; see the module docstring."""
    m = to_numpy(matrix, "matrix").astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise MetricsError(f"a compatibility matrix must be square and non-empty, got {m.shape}")
    t = m.shape[0]
    am = float(m[np.tril_indices(t)].mean())
    i, j = np.tril_indices(t, k=-1)
    ac = float((m[i, j] > m[j, j]).mean()) if len(i) else math.nan
    return ac, am


def compatibility_matrix(embeddings_by_generation: Sequence[Any], labels: Any, *,
                         metric: str = "top1", full: bool = False,
                         **retrieval_kwargs: Any) -> CompatibilityMatrix:
    """Evaluate every generation pair under the leave-one-out ``M(Q, G)`` protocol.

    ``embeddings_by_generation[t]`` is the evaluation set embedded by model
    v_{t+1} (same samples, same order, same dimension for all). ``metric`` is
    ``"top1"``, ``"top5"``, ``"top<k>"`` or ``"map"``. ``full=True`` also fills
    the upper triangle (old queries against newer galleries), which AC/AM ignore
    but a forward-compatibility study may want.
    """
    embs = list(embeddings_by_generation)
    if not embs:
        raise MetricsError("embeddings_by_generation is empty: give at least one generation")
    kwargs = dict(retrieval_kwargs)
    if metric.startswith("top") and metric[3:].isdigit():
        kwargs["topk"] = sorted({*kwargs.get("topk", (1, 5)), int(metric[3:])})
    elif metric != "map":
        raise MetricsError(f"unknown metric {metric!r}; use 'top1', 'top5', 'top<k>' or 'map'")
    t = len(embs)
    matrix = np.full((t, t), np.nan)
    for i in range(t):
        for j in range(t):
            if j <= i or full:
                matrix[i, j] = m_score(embs[i], embs[j], labels, **kwargs).metric(metric)
    ac, am = compatibility_scores(matrix)
    return CompatibilityMatrix(matrix=matrix, ac=ac, am=am, metric=metric)
