"""Prometheus metrics through ``ray.serve.metrics``.

Ray exports them with its own metrics (prefix ``ray_``) on every node's metrics
port, so the cluster's existing Prometheus/Grafana scrape them with no extra
server; Serve adds the deployment, replica and application tags. Our tags carry
the application and the model *reference*, so a dashboard keeps its series
apart across versions and cutovers. Every name is listed in the README
("Prometheus metrics"); the gate quantities (bounds, counts, verdicts) are what
an Argo Rollouts or Flagger analysis queries (``cluster/argo``,
``cluster/flagger``).

The router records per batch of rows rather than per row: a request of 32 rows
is one ``inc(32)``, keeping the metrics cost off the hot path.
"""

from __future__ import annotations

import logging

# Lazy imports: Ray Serve's metrics load only when a metric is made, so the module imports without
# Ray (and stands in a no-op metric where Serve's are unavailable).

log = logging.getLogger(__name__)

_LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class _Null:
    """Stands in for a metric where Ray's metrics are unavailable (unit tests)."""

    def inc(self, *a, **k) -> None: ...
    def observe(self, *a, **k) -> None: ...
    def set(self, *a, **k) -> None: ...


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kw):
    try:
        from ray.serve import metrics

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


#: The rates the gates judge, as they appear in the report.
GATE_RATES = ("nfr", "pfr", "agreement", "disagreement", "error_rate")


class ComparatorMetrics:
    """Comparison outcomes and the gates' quantities, recorded by the comparator."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.comparisons = _make("Counter", "graceful_ray_shadow_comparisons",
                                 "Rows both models answered, by agreement.", ("app", "agree"))
        self.flips = _make("Counter", "graceful_ray_shadow_flips",
                           "Labelled pairs by flip kind (negative, positive, none).",
                           ("app", "kind"))
        self.nfr_high = _make("Gauge", "graceful_ray_shadow_nfr_upper",
                              "Upper end of the NFR's anytime-valid confidence sequence (the "
                              "bound max_nfr judges).", ("app",))
        self.agreement_low = _make("Gauge", "graceful_ray_shadow_agreement_lower",
                                   "Lower end of the agreement's confidence sequence.", ("app",))
        self.bound = _make("Gauge", "graceful_ray_gate_bound",
                           "A gate rate's bound: interval=sequence (anytime-valid, what the "
                           "gates use) or wilson (fixed-sample); end=low or high.",
                           ("app", "rate", "interval", "end"))
        self.count = _make("Gauge", "graceful_ray_gate_count",
                           "A gate rate's counts: part=count (numerator) or total.",
                           ("app", "rate", "part"))
        self.check = _make("Gauge", "graceful_ray_gate_check_passed",
                           "1 when this cutover gate passes.", ("app", "check"))
        self.gates_passed = _make("Gauge", "graceful_ray_shadow_gates_passed",
                                  "1 when every cutover gate passes.", ("app",))
        self.primary_is_candidate = _make("Gauge", "graceful_ray_shadow_primary_is_candidate",
                                          "1 after cutover, 0 before or after rollback.",
                                          ("app",))
        self.slice_nfr_low = _make("Gauge", "graceful_ray_gate_slice_nfr_lower",
                                   "A slice's NFR lower bound at the Bonferroni level "
                                   "(max_slice_nfr refuses above its budget).", ("app", "slice"))
        self.watch_rollback = _make("Gauge", "graceful_ray_watch_rollback",
                                    "1 when the watch after cutover shows a regression.", ("app",))
        self.auto_rollbacks = _make("Counter", "graceful_ray_auto_rollbacks",
                                    "Automatic rollbacks by the watch after cutover.", ("app",))

    def compared(self, agree: int, disagree: int) -> None:
        if agree:
            self.comparisons.inc(agree, {"app": self.app, "agree": "true"})
        if disagree:
            self.comparisons.inc(disagree, {"app": self.app, "agree": "false"})

    def flip(self, kind: str) -> None:
        self.flips.inc(1, {"app": self.app, "kind": kind})

    def auto_rollback(self) -> None:
        self.auto_rollbacks.inc(1, {"app": self.app})

    def publish(self, report: dict) -> None:
        """Set every gauge from a report (the live report's document)."""
        tags = {"app": self.app}
        rates = {"nfr": report["nfr"], "pfr": report["pfr"], "agreement": report["agreement"],
                 "disagreement": report["disagreement"],
                 "error_rate": report["models"]["candidate"]["shadow_errors"]["rate"]}
        for name, r in rates.items():
            for end in ("low", "high"):
                self.bound.set(r["sequence"][end], {**tags, "rate": name, "interval": "sequence",
                                                    "end": end})
                self.bound.set(r[end], {**tags, "rate": name, "interval": "wilson", "end": end})
            self.count.set(r["count"], {**tags, "rate": name, "part": "count"})
            self.count.set(r["total"], {**tags, "rate": name, "part": "total"})
        self.nfr_high.set(report["nfr"]["sequence"]["high"], tags)
        self.agreement_low.set(report["agreement"]["sequence"]["low"], tags)
        gates = report["gates"]
        for c in gates["checks"]:
            self.check.set(1.0 if c["passed"] else 0.0, {**tags, "check": c["name"]})
        self.gates_passed.set(1.0 if gates["passed"] else 0.0, tags)
        for s in gates["slices"]["slices"]:
            self.slice_nfr_low.set(s["nfr_low"], {**tags, "slice": s["slice"]})
        self.primary_is_candidate.set(1.0 if report["primary"]["role"] == "candidate" else 0.0,
                                      tags)
        watch = report.get("watch")
        self.watch_rollback.set(1.0 if watch and watch["rollback"] else 0.0, tags)
