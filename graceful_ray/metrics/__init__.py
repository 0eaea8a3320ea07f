"""Metrics of a model update: flips, retrieval compatibility, confidence intervals.

Pure functions on numpy arrays (torch tensors are accepted and converted); every
rate carries its count and a Wilson interval so gates decide on evidence.
"""

from graceful_ray.metrics.compatibility import (
    CompatibilityMatrix,
    compatibility_matrix,
    compatibility_scores,
    is_compatible,
    update_gain,
)
from graceful_ray.metrics.flips import FlipMetrics, flip_metrics
from graceful_ray.metrics.intervals import Rate, wilson_interval
from graceful_ray.metrics.report import FlipReport, flip_report
from graceful_ray.metrics.retrieval import RetrievalMetrics, m_score, retrieval_metrics

__all__ = [
    "CompatibilityMatrix", "compatibility_matrix", "compatibility_scores", "is_compatible",
    "update_gain", "FlipMetrics", "flip_metrics", "Rate", "wilson_interval", "FlipReport",
    "flip_report", "RetrievalMetrics", "m_score", "retrieval_metrics",
]
