"""Input coercion shared by the metric modules.

Metrics are pure functions on numpy arrays, but callers hold torch tensors just
as often; converting here (without importing torch) lets every metric accept
both and fail with a message naming the argument instead of a numpy traceback.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graceful_ray.errors import MetricsError


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, duck-typed
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise MetricsError(f"{name} cannot be read as an array: {exc}") from exc


def int_labels(x: Any, name: str) -> np.ndarray:
    """A non-empty 1-D integer array, or a MetricsError saying what is wrong.

    Floats are refused rather than rounded: a float label array usually means
    probabilities or logits were passed where predicted classes were meant.
    """
    a = to_numpy(x, name)
    if a.ndim != 1:
        raise MetricsError(f"{name} must be 1-D (one label per sample), got shape {a.shape}")
    if a.size == 0:
        raise MetricsError(f"{name} is empty: metrics need at least one sample")
    if a.dtype.kind not in "iu":
        raise MetricsError(
            f"{name} must hold integer class labels, got dtype {a.dtype}; pass predicted "
            "classes (e.g. logits.argmax(1)), or cast with .astype(int)"
        )
    return a


def same_length(**arrays: np.ndarray) -> int:
    """The common length of ``arrays``, or a MetricsError listing every length."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise MetricsError(f"inputs must have the same length, got {detail}")
    return next(iter(lengths.values()))


def json_float(x: float) -> float | None:
    """``x`` as a plain float, with NaN/inf as ``None`` so ``json.dumps`` stays strict JSON."""
    x = float(x)
    return x if np.isfinite(x) else None
