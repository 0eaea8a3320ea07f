"""Prediction flips between an old and a new classifier.

A model update that lowers the error rate can still break samples the old model
got right ("negative flips"); users notice those regressions more than the
average gain. These metrics count them, per DESIGN "Metrics":

- ``nfr`` (negative flip rate): old right and new wrong, over all samples;
- ``pfr`` (positive flip rate): old wrong and new right, over all samples;
- ``nfi``: negative flips over the new model's errors (what share of the new
  errors are regressions); ``pfi``: positive flips over the new model's corrects;
- ``btc`` / ``bec`` (Bansal et al. 2019): of the samples the old model got
  right, the share the new one also gets right; of the old model's errors, the
  share the new one also makes;
- ``relative_nfr = NFR / ((1 - ER_old) * ER_new)``: NFR relative to what two
  models with independent errors would produce, so models of different accuracy
  can be compared.

Every rate is a :class:`Rate` (count, total, Wilson interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from graceful_ray.metrics._arrays import int_labels, json_float, same_length
from graceful_ray.metrics.intervals import Rate


@dataclass(frozen=True)
class FlipMetrics:
    """Flip statistics of one old/new pair on one labelled evaluation set.

    ``relative_nfr`` is NaN when its denominator is 0 (old model always wrong or
    new model never wrong): the ratio is undefined there, and NaN keeps a
    comparison such as ``relative_nfr < 1`` False instead of silently passing.
    """

    n: int
    error_rate_old: Rate
    error_rate_new: Rate
    nfr: Rate
    pfr: Rate
    nfi: Rate
    pfi: Rate
    btc: Rate
    bec: Rate
    relative_nfr: float

    @property
    def negative_flips(self) -> int:
        return self.nfr.count

    @property
    def positive_flips(self) -> int:
        return self.pfr.count

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: rates as dicts, NaN as ``None``."""
        out: dict[str, Any] = {"n": self.n}
        for name in ("error_rate_old", "error_rate_new", "nfr", "pfr", "nfi", "pfi", "btc", "bec"):
            out[name] = getattr(self, name).to_dict()
        out["relative_nfr"] = json_float(self.relative_nfr)
        return out


def validate_predictions(y: Any, old_pred: Any,
                         new_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, old_pred, new_pred)`` as 1-D integer arrays of one non-zero length, or MetricsError."""
    y = int_labels(y, "y")
    old_pred = int_labels(old_pred, "old_pred")
    new_pred = int_labels(new_pred, "new_pred")
    same_length(y=y, old_pred=old_pred, new_pred=new_pred)
    return y, old_pred, new_pred


def flip_metrics(y: Any, old_pred: Any, new_pred: Any) -> FlipMetrics:
    """Flip metrics of ``new_pred`` against ``old_pred`` on ground truth ``y``.

    All three are 1-D integer class labels of equal, non-zero length (numpy
    arrays, lists or torch tensors); anything else raises ``MetricsError``.
    """
    y, old_pred, new_pred = validate_predictions(y, old_pred, new_pred)
    old_ok, new_ok = old_pred == y, new_pred == y
    n = int(y.size)
    n_old_ok, n_new_ok = int(old_ok.sum()), int(new_ok.sum())
    nf = int(np.count_nonzero(old_ok & ~new_ok))
    pf = int(np.count_nonzero(~old_ok & new_ok))
    both_wrong = int(np.count_nonzero(~old_ok & ~new_ok))

    err_old, err_new = n - n_old_ok, n - n_new_ok
    # relative NFR in counts: (nf/n) / ((n_old_ok/n) * (err_new/n)) = nf*n / (n_old_ok*err_new);
    # integer products avoid rounding and make the zero-denominator case exact.
    denom = n_old_ok * err_new
    relative_nfr = nf * n / denom if denom else math.nan

    return FlipMetrics(
        n=n,
        error_rate_old=Rate.of(err_old, n),
        error_rate_new=Rate.of(err_new, n),
        nfr=Rate.of(nf, n),
        pfr=Rate.of(pf, n),
        nfi=Rate.of(nf, err_new),
        pfi=Rate.of(pf, n_new_ok),
        btc=Rate.of(n_old_ok - nf, n_old_ok),
        bec=Rate.of(both_wrong, err_old),
        relative_nfr=relative_nfr,
    )
