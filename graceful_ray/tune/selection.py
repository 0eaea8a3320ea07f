"""Picking one model from a search: rules a release process can state in one line.

* :func:`most_accurate_under_budget`: the most accurate trial whose negative
  flip rate is *credibly* within the budget, i.e. whose Wilson upper 95% bound
  is at most ``B``. The bound needs the counts (negative flips and validation
  rows), not the rate: 0 flips out of 50 rows is not evidence of a flip-free
  model, and the rule must not pick it over a measured 0.5% on 3,000 rows.
* :func:`lowest_nfr_at_accuracy`: the fewest flips among trials at least ``A``
  accurate.
* :func:`smallest_within`: the cheapest edge model whose cross-model mAP is
  within ``tolerance`` of a reference (``M(large, large)``).

Each returns a :class:`Selection`, or ``None`` when no trial qualifies; only
complete trials are ever considered. Pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from graceful_ray.errors import ConfigError
from graceful_ray.metrics import Rate
from graceful_ray.tune.trials import TrialRecord

NEGATIVE_FLIPS = "val_negative_flips"
ROWS = "val_rows"


@dataclass(frozen=True)
class Selection:
    record: TrialRecord
    rule: str  # human-readable rule that chose it
    nfr: Rate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"trial_id": self.record.trial_id, "rule": self.rule,
                "nfr": self.nfr.to_dict() if self.nfr else None}


def nfr_rate(record: TrialRecord, confidence: float = 0.95) -> Rate | None:
    """Negative flips / validation rows with its Wilson interval; ``None`` without the counts."""
    flips, rows = record.value(NEGATIVE_FLIPS), record.value(ROWS)
    if math.isnan(flips) or math.isnan(rows):
        return None
    return Rate.of(int(round(flips)), int(round(rows)), confidence)


def most_accurate_under_budget(records: Sequence[TrialRecord], budget: float, *, confidence: float = 0.95,
                               accuracy: str = "val_accuracy") -> Selection | None:
    """The most accurate complete trial whose NFR upper bound is ``<= budget``.

    Ties on accuracy go to the lower NFR upper bound, then to the trial id (so
    the choice is deterministic).
    """
    if not 0.0 <= budget <= 1.0:
        raise ConfigError(f"flip budget must be a rate in [0, 1], got {budget}")
    feasible: list[tuple[TrialRecord, Rate]] = []
    for r in records:
        if not r.complete or math.isnan(r.value(accuracy)):
            continue
        rate = nfr_rate(r, confidence)
        if rate is not None and rate.high <= budget:
            feasible.append((r, rate))
    if not feasible:
        return None
    best, rate = min(feasible, key=lambda t: (-t[0].value(accuracy), t[1].high, t[0].trial_id))
    return Selection(best, f"most accurate with NFR upper {confidence:.0%} bound <= {budget:g}", rate)


def lowest_nfr_at_accuracy(records: Sequence[TrialRecord], min_accuracy: float, *, confidence: float = 0.95,
                           accuracy: str = "val_accuracy", nfr: str = "val_nfr") -> Selection | None:
    """The complete trial with the lowest NFR among those with accuracy ``>= min_accuracy``.

    Ties on NFR go to the more accurate trial, then to the trial id.
    """
    pool = [r for r in records if r.complete and r.has(accuracy, nfr) and r.value(accuracy) >= min_accuracy]
    if not pool:
        return None
    best = min(pool, key=lambda r: (r.value(nfr), -r.value(accuracy), r.trial_id))
    return Selection(best, f"lowest NFR at accuracy >= {min_accuracy:g}", nfr_rate(best, confidence))


def smallest_within(records: Sequence[TrialRecord], reference: float, tolerance: float, *,
                    quality: str = "cross_map", cost: str = "flops_per_sample") -> Selection | None:
    """The cheapest complete trial with ``quality >= reference - tolerance``.

    Ties on cost go to the higher quality, then to the trial id.
    """
    if tolerance < 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
    pool = [r for r in records if r.complete and r.has(quality, cost) and r.value(quality) >= reference - tolerance]
    if not pool:
        return None
    best = min(pool, key=lambda r: (r.value(cost), -r.value(quality), r.trial_id))
    return Selection(best, f"smallest {cost} with {quality} >= {reference:.4f} - {tolerance:g}")


def plain_reference(records: Sequence[TrialRecord], method_param: str = "method") -> TrialRecord | None:
    """The search's plain trial (the complete one with the fewest flips when there are several)."""
    plain = [r for r in records if r.complete and r.params.get(method_param) == "plain"
             and not math.isnan(r.value(NEGATIVE_FLIPS)) and not math.isnan(r.value(ROWS))]
    return min(plain, key=lambda r: (r.value(NEGATIVE_FLIPS) / r.value(ROWS), r.trial_id), default=None)


def beats_plain(records: Sequence[TrialRecord], *, min_accuracy: float | None = None,
                max_accuracy_drop: float = 0.005, flip_budget: float | None = None, confidence: float = 0.95,
                accuracy: str = "val_accuracy", method_param: str = "method") -> tuple[Selection | None, str]:
    """A candidate only if it beats plain: its NFR interval lies wholly below plain's NFR.

    Among complete non-plain trials with accuracy at least ``min_accuracy``
    (default: plain's accuracy minus ``max_accuracy_drop``, i.e. plain's error +
    0.5 points) whose NFR upper ``confidence`` bound is below plain's measured
    NFR (and, with ``flip_budget``, at most it): the lowest NFR, or with a
    budget the most accurate. Returns ``(selection or None, the reason)``.
    """
    if max_accuracy_drop < 0:
        raise ConfigError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    plain = plain_reference(records, method_param)
    if plain is None:
        return None, "the plain trial did not complete, so no candidate can be shown to beat it"
    plain_nfr = nfr_rate(plain, confidence)
    assert plain_nfr is not None
    floor = min_accuracy if min_accuracy is not None else plain.value(accuracy) - max_accuracy_drop
    pool: list[tuple[TrialRecord, Rate]] = []
    for r in records:
        if not r.complete or r.params.get(method_param) == "plain" or math.isnan(r.value(accuracy)):
            continue
        rate = nfr_rate(r, confidence)
        if rate is None or r.value(accuracy) < floor or not rate.high < plain_nfr.value:
            continue
        if flip_budget is not None and rate.high > flip_budget:
            continue
        pool.append((r, rate))
    where = (f"accuracy >= {floor:.4f}" + ("" if min_accuracy is not None
                                             else f" (plain's {plain.value(accuracy):.4f} - {max_accuracy_drop:g})"))
    if not pool:
        return None, (f"no trial beats plain (trial {plain.trial_id}, NFR {plain_nfr}) at {where}: none has its NFR "
                      f"upper {confidence:.0%} bound below plain's NFR"
                      + (f" and <= {flip_budget:g}" if flip_budget is not None else ""))
    if flip_budget is not None:
        best, rate = min(pool, key=lambda t: (-t[0].value(accuracy), t[1].high, t[0].trial_id))
        rule = f"most accurate with NFR upper {confidence:.0%} bound <= {flip_budget:g} and below plain's"
    else:
        best, rate = min(pool, key=lambda t: (t[1].value, -t[0].value(accuracy), t[0].trial_id))
        rule = f"lowest NFR at {where}, its upper {confidence:.0%} bound below plain's {plain_nfr.value:.4f}"
    return Selection(best, rule, rate), rule
