"""The backfilling curve: retrieval quality against the share of the gallery re-embedded.

DESIGN "Metrics": queries are embedded by the new model; at fraction ``f`` the
first ``f`` of the gallery, in the backfill order, holds new-model embeddings
and the rest what was there before (old-model embeddings, or their
transformation). ``M`` (top-1, top-5 or mAP, leave-one-out on one evaluation
set) is measured at each fraction, and the area under the curve over
``f in [0, 1]`` -- the mean quality a user sees while the backfill runs --
summarises a policy (FastFill, Jaeckle et al. ICLR 2023, compares orders by it).

The area is the trapezoid integral over ``[0, 1]``, so it is in the metric's own
units (an AUC of 0.80 top-1 = 80% on average during the backfill). The
*normalised* area, ``(AUC - M_0) / (M_1 - M_0)``, says which share of the
possible improvement the order delivered on average (0.5 = a straight line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from graceful_ray.errors import MetricsError
from graceful_ray.metrics import m_score

DEFAULT_FRACTIONS = tuple(np.round(np.linspace(0.0, 1.0, 11), 4))


@dataclass
class BackfillCurve:
    name: str
    metric: str
    fractions: np.ndarray
    values: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def auc(self) -> float:
        return curve_auc(self.fractions, self.values)

    @property
    def normalized_auc(self) -> float:
        lo, hi = float(self.values[0]), float(self.values[-1])
        if hi == lo:
            return float("nan")
        return (self.auc - lo) / (hi - lo)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "fractions": self.fractions.tolist(),
                "values": [float(v) for v in self.values], "auc": self.auc,
                "normalized_auc": self.normalized_auc, **self.extra}


def curve_auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions`` (which must span [0, 1])."""
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if f.ndim != 1 or f.shape != v.shape or len(f) < 2:
        raise MetricsError("a curve needs at least two (fraction, value) points of equal count")
    if np.any(np.diff(f) <= 0) or f[0] != 0.0 or f[-1] != 1.0:
        raise MetricsError("fractions must increase strictly from 0 to 1")
    return float(np.sum((f[1:] - f[:-1]) * (v[1:] + v[:-1]) / 2.0))


def mixed_gallery(before: np.ndarray, after: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
    """The gallery once the first ``fraction`` of ``order`` is re-embedded."""
    g = np.array(before, dtype=np.float32, copy=True)
    m = int(round(fraction * len(order)))
    idx = np.asarray(order[:m], dtype=np.int64)
    g[idx] = after[idx]
    return g


def backfill_curve(query_emb: np.ndarray, before: np.ndarray, after: np.ndarray, labels: np.ndarray,
                   order: np.ndarray, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   metric: str = "top1", name: str = "") -> BackfillCurve:
    """``M(new queries, gallery at fraction f)`` for each ``f`` (leave-one-out on one set).

    ``before``: the gallery's vectors before the backfill (old embeddings, or
    transformed ones), ``after``: the new model's; row ``i`` of every array is
    sample ``i``; ``order`` is a permutation of the rows (first re-embedded first).
    """
    n = len(labels)
    if not (len(query_emb) == len(before) == len(after) == n):
        raise MetricsError("query, before, after and labels must be the same samples")
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(n)):
        raise MetricsError("order must be a permutation of the gallery rows")
    if before.shape[1] != after.shape[1] or query_emb.shape[1] != after.shape[1]:
        raise MetricsError("a backfill curve needs one dimension for queries and both galleries")
    vals = [m_score(query_emb, mixed_gallery(before, after, order, f), labels).metric(metric)
            for f in fractions]
    return BackfillCurve(name=name, metric=metric, fractions=np.asarray(fractions, dtype=np.float64),
                         values=np.asarray(vals))
