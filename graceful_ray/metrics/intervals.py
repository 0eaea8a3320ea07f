"""Rates with their counts and a Wilson confidence interval.

A release gate must decide on an interval, never on a point estimate from few
samples (DESIGN, "Metrics"): 0 negative flips out of 20 samples is not evidence
of a flip-free model. The Wilson score interval is used because, unlike the
normal ("Wald") interval, it stays inside [0, 1] and does not collapse to a
zero-width interval at 0 or n successes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from graceful_ray.errors import MetricsError
from graceful_ray.metrics._arrays import json_float
from graceful_ray.metrics.sequential import confidence_sequence


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``.

    ``n == 0`` gives ``(0.0, 1.0)``: with no observations every rate is possible,
    which is exactly what a gate should see.
    """
    successes, n = _count(successes, "successes"), _count(n, "n")
    if successes > n:
        raise MetricsError(f"successes ({successes}) cannot exceed n ({n})")
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    denom = 1.0 + z2n
    center = (p + z2n / 2.0) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; pin it so rounding noise
    # never yields a tiny negative lower bound or an upper bound above 1.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """``count / total`` with the counts kept, plus its 95% Wilson interval.

    ``value`` is NaN when ``total == 0`` (the rate is undefined, not zero);
    ``to_dict`` turns that NaN into ``None``. :meth:`anytime` adds the
    confidence sequence (:mod:`graceful_ray.metrics.sequential`), valid under
    continuous monitoring, in ``seq_low`` / ``seq_high``; ``low`` / ``high``
    stay the fixed-sample Wilson interval, valid at one look only.
    """

    count: int
    total: int
    value: float
    low: float
    high: float
    seq_low: float | None = None
    seq_high: float | None = None

    @classmethod
    def of(cls, count: int, total: int, confidence: float = 0.95) -> "Rate":
        count, total = _count(count, "count"), _count(total, "total")
        low, high = wilson_interval(count, total, confidence)
        value = count / total if total else math.nan
        return cls(count=count, total=total, value=value, low=low, high=high)

    @classmethod
    def anytime(cls, count: int, total: int, confidence: float = 0.95) -> "Rate":
        """:meth:`of` plus the anytime-valid confidence sequence at the same confidence."""
        r = cls.of(count, total, confidence)
        low, high = confidence_sequence(r.count, r.total, confidence)
        return cls(r.count, r.total, r.value, r.low, r.high, seq_low=low, seq_high=high)

    def to_dict(self) -> dict:
        d = {"count": self.count, "total": self.total, "value": json_float(self.value),
             "low": self.low, "high": self.high}
        if self.seq_high is not None:
            d["interval"] = "wilson, fixed-sample: valid for one look at a planned n"
            d["sequence"] = {"low": self.seq_low, "high": self.seq_high,
                             "method": "beta-mixture confidence sequence: valid at every n"}
        return d

    def __str__(self) -> str:
        if not self.total:
            return "n/a (0/0)"
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}] ({self.count}/{self.total})"


def _count(x: int, name: str) -> int:
    """A non-negative int; numpy integers are accepted, floats and bools are not."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        raise MetricsError(f"{name} must be an integer count, got {x!r}")
    x = int(x)
    if x < 0:
        raise MetricsError(f"{name} must be >= 0, got {x}")
    return x
