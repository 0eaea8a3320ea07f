"""The running comparison of two models: counts, flips, latencies, errors.

One accumulator feeds both the live report (the comparator adds records as
they complete) and the offline replay (which adds the recorded traffic), so the
two reports are the same computation and can be compared number for number.

Everything is kept per *model* (baseline, candidate), not per role: after a
cutover the candidate answers callers, but its flips are still counted against
the baseline, which is what a rollback decision needs.
"""

from __future__ import annotations

import copy
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from graceful_ray.metrics import Rate
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, ROLES, GateConfig
from graceful_ray.serve.gates import evaluate

T = TypeVar("T")

ERROR_KINDS = ("timeout", "exception", "unavailable", "overloaded", "circuit_open",
               "incomplete")


@dataclass
class ModelStats:
    """What is known about one of the two models."""

    answered: int = 0                      # rows it produced a decision for
    as_shadow: int = 0                     # rows sent to it as the shadow
    shadow_errors: Counter = field(default_factory=Counter)
    latencies: deque = field(default_factory=deque)

    def error_count(self) -> int:
        return sum(self.shadow_errors.values())


class ShadowStats:
    """Incremental counts behind ``GET /v1/shadow/report``."""

    def __init__(self, latency_window: int = 10_000) -> None:
        self.requests = 0          # records (one per input row)
        self.compared = 0          # records with both decisions
        self.agreed = 0
        self.labelled = 0          # records with a true label
        self.labelled_pairs = 0    # ... and both decisions
        self.correct = {r: 0 for r in ROLES}       # over labelled pairs
        self.negative_flips = 0    # baseline right, candidate wrong
        self.positive_flips = 0    # baseline wrong, candidate right
        self.per_class: dict[int, list[int]] = {}  # label -> [pairs, negative, positive, agreed]
        # segment -> [compared, agreed, labelled pairs, negative, positive]
        self.per_segment: dict[str, list[int]] = {}
        self.models = {r: ModelStats(latencies=deque(maxlen=latency_window)) for r in ROLES}

    # --------------------------------------------------------------- adding
    def add_record(self, primary: str, decisions: dict[str, int | None],
                   latencies_ms: dict[str, float | None], shadowed: bool,
                   shadow_error: str | None, segment: str | None = None) -> None:
        """One completed record: the primary answered; the shadow maybe."""
        self.requests += 1
        shadow = CANDIDATE if primary == BASELINE else BASELINE
        if shadowed:
            self.models[shadow].as_shadow += 1
            if shadow_error is not None:
                self.models[shadow].shadow_errors[shadow_error] += 1
        for role in ROLES:
            if decisions.get(role) is not None:
                self.models[role].answered += 1
                ms = latencies_ms.get(role)
                if ms is not None:
                    self.models[role].latencies.append(float(ms))
        b, c = decisions.get(BASELINE), decisions.get(CANDIDATE)
        if b is not None and c is not None:
            self.compared += 1
            self.agreed += int(b == c)
            if segment is not None:
                row = self.per_segment.setdefault(segment, [0, 0, 0, 0, 0])
                row[0] += 1
                row[1] += int(b == c)

    def add_label(self, baseline: int | None, candidate: int | None, label: int,
                  segment: str | None = None) -> str | None:
        """A true label for a completed record; returns the flip it makes.

        ``"negative"`` (baseline right, candidate wrong), ``"positive"``, ``"none"``,
        or ``None`` when only one model answered and no pair exists.
        """
        self.labelled += 1
        if baseline is None or candidate is None:
            return None
        self.labelled_pairs += 1
        b_ok, c_ok = baseline == label, candidate == label
        self.correct[BASELINE] += int(b_ok)
        self.correct[CANDIDATE] += int(c_ok)
        flip = "none"
        if b_ok and not c_ok:
            self.negative_flips += 1
            flip = "negative"
        elif c_ok and not b_ok:
            self.positive_flips += 1
            flip = "positive"
        cls = self.per_class.setdefault(int(label), [0, 0, 0, 0])
        cls[0] += 1
        cls[1] += int(flip == "negative")
        cls[2] += int(flip == "positive")
        cls[3] += int(baseline == candidate)
        if segment is not None:
            seg = self.per_segment.setdefault(segment, [0, 0, 0, 0, 0])
            seg[2] += 1
            seg[3] += int(flip == "negative")
            seg[4] += int(flip == "positive")
        return flip

    # -------------------------------------------------------------- report
    def latency(self, role: str) -> dict[str, Any]:
        samples = self.models[role].latencies
        if not samples:
            return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
        a = np.fromiter(samples, dtype=np.float64, count=len(samples))
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
                "mean": float(a.mean())}

    def summary(self, confidence: float = 0.95) -> dict[str, Any]:
        """The numbers of the report (the router adds roles, gates, history)."""
        pairs = self.labelled_pairs
        models = {}
        for role in ROLES:
            m = self.models[role]
            models[role] = {
                "answered": m.answered,
                "accuracy": Rate.anytime(self.correct[role], pairs, confidence).to_dict(),
                "latency_ms": self.latency(role),
                "shadow_requests": m.as_shadow,
                "shadow_errors": {
                    "count": m.error_count(),
                    "rate": Rate.anytime(m.error_count(), m.as_shadow, confidence).to_dict(),
                    "by_kind": {k: int(m.shadow_errors.get(k, 0)) for k in ERROR_KINDS},
                },
            }
        # Per true class (over labelled pairs: agreement there is among them too).
        per_class = {
            str(label): {"labelled": n, "negative_flips": neg, "positive_flips": pos,
                         "nfr": Rate.anytime(neg, n, confidence).to_dict(),
                         "pfr": Rate.anytime(pos, n, confidence).to_dict(),
                         "agreement": Rate.anytime(agr, n, confidence).to_dict()}
            for label, (n, neg, pos, agr) in sorted(self.per_class.items())
        }
        per_segment = {
            seg: {"compared": cmp, "labelled": n, "negative_flips": neg, "positive_flips": pos,
                  "agreement": Rate.anytime(agr, cmp, confidence).to_dict(),
                  "nfr": Rate.anytime(neg, n, confidence).to_dict(),
                  "pfr": Rate.anytime(pos, n, confidence).to_dict()}
            for seg, (cmp, agr, n, neg, pos) in sorted(self.per_segment.items())
        }
        b99 = models[BASELINE]["latency_ms"]["p99"]
        c99 = models[CANDIDATE]["latency_ms"]["p99"]
        return {
            "requests": self.requests,
            "compared": self.compared,
            "agreement": Rate.anytime(self.agreed, self.compared, confidence).to_dict(),
            # Every negative flip is a disagreement: this bounds the NFR from
            # above with no label at all (see gates.py, "the label-free bound").
            "disagreement": Rate.anytime(self.compared - self.agreed, self.compared,
                                         confidence).to_dict(),
            "labelled": self.labelled,
            "labelled_pairs": pairs,
            "nfr": Rate.anytime(self.negative_flips, pairs, confidence).to_dict(),
            "pfr": Rate.anytime(self.positive_flips, pairs, confidence).to_dict(),
            "negative_flips": self.negative_flips,
            "positive_flips": self.positive_flips,
            "per_class": per_class,
            "per_segment": per_segment,
            "models": models,
            "latency_p99_ratio": (c99 / b99) if (b99 and c99 is not None) else None,
        }


def compose_report(stats: ShadowStats, gates: GateConfig, refs: dict[str, str],
                   primary: str, **extra: Any) -> dict[str, Any]:
    """The report document: who is primary, the summary, and the gate verdict.

    The live service and the offline replay both build their report here, so
    the two documents have the same shape and the same arithmetic.
    """

    summary = stats.summary(gates.confidence)
    shadow = CANDIDATE if primary == BASELINE else BASELINE
    return {
        "generated_at": time.time(),
        "baseline": refs[BASELINE],
        "candidate": refs[CANDIDATE],
        "primary": {"role": primary, "ref": refs[primary]},
        "shadow": {"role": shadow, "ref": refs[shadow]},
        **summary,
        "gates": evaluate(summary, gates),
        **extra,
    }


@dataclass
class SearchModelStats:
    """What is known about one model's searches."""

    answered: int = 0                      # query rows it returned a top-k for
    as_shadow: int = 0                     # query rows sent to it as the shadow
    shadow_errors: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (may not search)
    latencies: deque = field(default_factory=deque)
    hits_top1: int = 0                     # over labelled pairs
    hits_topk: int = 0


class RetrievalStats:
    """Incremental counts behind the report's ``retrieval`` section (``POST /v1/search``).

    Kept apart from :class:`ShadowStats`, so searches never change predict's
    agreement, flips or gates. A search *pair* is a query row both models
    answered; its overlap is ``|top-k(primary) & top-k(shadow)| / k``. With a
    feedback label (the query's true class), each model *hits at 1* when its
    first result carries that label in the gallery, and *hits at k* when any of
    its k results does. Hit rates are over labelled pairs, so both models are
    judged on the same queries.
    """

    def __init__(self, latency_window: int = 10_000) -> None:
        self.searches = 0          # query rows the primary answered
        self.compared = 0          # ... that the shadow answered too
        self.overlap_sum = 0.0
        self.identical = 0         # pairs with the same top-k set
        self.labelled = 0          # search rows with a true label
        self.labelled_pairs = 0    # ... and both top-k lists with gallery labels
        self.unscorable = 0        # labelled pairs whose hits carry no gallery label
        self.negative_flips = 0    # baseline's top-1 hit, candidate's top-1 miss
        self.positive_flips = 0
        self.models = {r: SearchModelStats(latencies=deque(maxlen=latency_window))
                       for r in ROLES}

    def add_record(self, primary: str, answered: dict[str, bool],
                   latencies_ms: dict[str, float | None], shadowed: bool,
                   shadow_error: str | None, skipped: str | None,
                   overlap: float | None) -> None:
        """One completed search row: the primary answered; the shadow maybe."""
        self.searches += 1
        shadow = CANDIDATE if primary == BASELINE else BASELINE
        if shadowed:
            m = self.models[shadow]
            m.as_shadow += 1
            if shadow_error is not None:
                m.shadow_errors[shadow_error] += 1
            if skipped is not None:
                m.skipped[skipped] += 1
        for role in ROLES:
            if answered.get(role):
                self.models[role].answered += 1
                ms = latencies_ms.get(role)
                if ms is not None:
                    self.models[role].latencies.append(float(ms))
        if overlap is not None:
            self.compared += 1
            self.overlap_sum += float(overlap)
            self.identical += int(overlap >= 1.0)

    def add_label(self, hit_labels: dict[str, Any], label: int) -> str | None:
        """A true label for a completed search row; returns its top-1 retrieval flip.

        ``hit_labels[role]``: the gallery labels of that model's top-k (None if it
        did not answer). ``"negative"`` (baseline's top-1 hit, candidate's
        miss), ``"positive"``, ``"none"``; ``"unscorable"`` when the gallery
        holds no labels; ``None`` when only one model answered.
        """
        self.labelled += 1
        b, c = hit_labels.get(BASELINE), hit_labels.get(CANDIDATE)
        if b is None or c is None:
            return None
        if len(b) == 0 or len(c) == 0 or (all(v is None or v < 0 for v in b)
                                          and all(v is None or v < 0 for v in c)):
            self.unscorable += 1
            return "unscorable"
        self.labelled_pairs += 1
        label = int(label)
        hits = {}
        for role, row in ((BASELINE, b), (CANDIDATE, c)):
            top1, topk = row[0] == label, label in list(row)
            self.models[role].hits_top1 += int(top1)
            self.models[role].hits_topk += int(topk)
            hits[role] = top1
        if hits[BASELINE] and not hits[CANDIDATE]:
            self.negative_flips += 1
            return "negative"
        if hits[CANDIDATE] and not hits[BASELINE]:
            self.positive_flips += 1
            return "positive"
        return "none"

    def latency(self, role: str) -> dict[str, Any]:
        samples = self.models[role].latencies
        if not samples:
            return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
        a = np.fromiter(samples, dtype=np.float64, count=len(samples))
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
                "mean": float(a.mean())}

    def summary(self, confidence: float = 0.95) -> dict[str, Any]:
        pairs = self.labelled_pairs
        models = {}
        for role in ROLES:
            m = self.models[role]
            errors = sum(m.shadow_errors.values())
            models[role] = {
                "answered": m.answered,
                "hit_top1": Rate.of(m.hits_top1, pairs, confidence).to_dict(),
                "hit_topk": Rate.of(m.hits_topk, pairs, confidence).to_dict(),
                "latency_ms": self.latency(role),
                "shadow_searches": m.as_shadow,
                "shadow_errors": {
                    "count": errors,
                    "rate": Rate.of(errors, m.as_shadow, confidence).to_dict(),
                    "by_kind": {k: int(m.shadow_errors.get(k, 0)) for k in ERROR_KINDS},
                },
                "skipped": {"count": sum(m.skipped.values()),
                            "reasons": [{"reason": r, "count": n}
                                        for r, n in m.skipped.most_common(5)]},
            }
        return {
            "searches": self.searches,
            "compared": self.compared,
            "mean_topk_overlap": (self.overlap_sum / self.compared) if self.compared else None,
            "identical_topk": Rate.of(self.identical, self.compared, confidence).to_dict(),
            "labelled": self.labelled,
            "labelled_pairs": pairs,
            "unscorable": self.unscorable,
            "top1_negative_flips": self.negative_flips,
            "top1_positive_flips": self.positive_flips,
            "top1_nfr": Rate.of(self.negative_flips, pairs, confidence).to_dict(),
            "models": models,
        }


def merged(parts: list[T]) -> T:
    """One accumulator holding what several comparator shards counted.

    Works for :class:`ShadowStats` and :class:`RetrievalStats` alike: every count
    is a sum, per-class and per-segment rows add up, latency samples are pooled
    (each shard keeps its own window, so past ``latency_window`` samples the pool
    holds more than one comparator would). Records are sharded by request id, so
    no record is in two parts and the sum is the whole traffic's count."""
    if len(parts) == 1:
        return parts[0]
    out = copy.deepcopy(parts[0])
    for part in parts[1:]:
        out = _add(out, part)
    return out


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, (Counter, deque)):
        a.update(b) if isinstance(a, Counter) else a.extend(b)
        return a
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a + b
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    if isinstance(a, dict):
        for k, v in b.items():
            a[k] = _add(a[k], v) if k in a else copy.deepcopy(v)
        return a
    for name, v in vars(b).items():
        setattr(a, name, _add(getattr(a, name), v))
    return a
