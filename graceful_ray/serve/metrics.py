"""Prometheus metrics through ``ray.util.metrics``.

Ray exports them with its own metrics (prefix ``ray_``) on every node's metrics
port, so the cluster's existing Prometheus/Grafana scrape them with no extra
server. Tags carry the application and the model *reference*, so a dashboard
keeps its series apart across versions and cutovers.

The router records per batch of rows rather than per row: a request of 32 rows
is one ``inc(32)``, keeping the metrics cost off the hot path.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class _Null:
    """Stands in for a metric where Ray's metrics are unavailable (unit tests)."""

    def inc(self, *a, **k) -> None: ...
    def observe(self, *a, **k) -> None: ...
    def set(self, *a, **k) -> None: ...


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kw):
    try:
        from ray.util import metrics

        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)
    except Exception as e:  # noqa: BLE001 - metrics must never break serving
        log.warning("metric %s unavailable: %s", name, e)
        return _Null()


class RouterMetrics:
    """Counters and histograms the router (ingress) records."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.rows = _make("Counter", "graceful_ray_shadow_rows",
                          "Input rows answered, per model and role.", ("app", "model", "role"))
        self.latency = _make("Histogram", "graceful_ray_shadow_model_latency_ms",
                             "Model latency per request (batch wait + compute), ms.",
                             ("app", "model", "role"), boundaries=_LATENCY_BOUNDARIES_MS)
        self.shadow_errors = _make("Counter", "graceful_ray_shadow_errors",
                                   "Shadow calls that failed, by kind.", ("app", "model", "kind"))
        self.bad_requests = _make("Counter", "graceful_ray_shadow_bad_requests",
                                  "Requests refused with a 4xx, by route.", ("app", "route"))

    def answered(self, model: str, role: str, rows: int, ms: float) -> None:
        tags = {"app": self.app, "model": model, "role": role}
        self.rows.inc(rows, tags)
        self.latency.observe(ms, tags)

    def shadow_error(self, model: str, kind: str, rows: int) -> None:
        self.shadow_errors.inc(rows, {"app": self.app, "model": model, "kind": kind})

    def bad_request(self, route: str) -> None:
        self.bad_requests.inc(1, {"app": self.app, "route": route})


class ComparatorMetrics:
    """Comparison outcomes and gate state, recorded by the comparator."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.comparisons = _make("Counter", "graceful_ray_shadow_comparisons",
                                 "Rows both models answered, by agreement.", ("app", "agree"))
        self.flips = _make("Counter", "graceful_ray_shadow_flips",
                           "Labelled pairs by flip kind (negative, positive, none).",
                           ("app", "kind"))
        self.nfr_high = _make("Gauge", "graceful_ray_shadow_nfr_upper",
                              "Upper Wilson bound of the negative flip rate.", ("app",))
        self.agreement_low = _make("Gauge", "graceful_ray_shadow_agreement_lower",
                                   "Lower Wilson bound of the agreement rate.", ("app",))
        self.gates_passed = _make("Gauge", "graceful_ray_shadow_gates_passed",
                                  "1 when every cutover gate passes.", ("app",))
        self.primary_is_candidate = _make("Gauge", "graceful_ray_shadow_primary_is_candidate",
                                          "1 after cutover, 0 before or after rollback.",
                                          ("app",))

    def compared(self, agree: int, disagree: int) -> None:
        if agree:
            self.comparisons.inc(agree, {"app": self.app, "agree": "true"})
        if disagree:
            self.comparisons.inc(disagree, {"app": self.app, "agree": "false"})

    def flip(self, kind: str) -> None:
        self.flips.inc(1, {"app": self.app, "kind": kind})

    def gauges(self, nfr_high: float, agreement_low: float, passed: bool,
               primary_is_candidate: bool) -> None:
        tags = {"app": self.app}
        self.nfr_high.set(nfr_high, tags)
        self.agreement_low.set(agreement_low, tags)
        self.gates_passed.set(1.0 if passed else 0.0, tags)
        self.primary_is_candidate.set(1.0 if primary_is_candidate else 0.0, tags)
