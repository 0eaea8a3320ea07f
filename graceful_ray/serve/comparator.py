"""The comparator: one actor that owns the comparison and the routing state.

Routers (the HTTP ingress, any number of replicas) send it events in small
batches: "the primary answered these rows" and, later, "the shadow answered (or
failed on) them". It pairs them into records, keeps the running statistics,
applies feedback labels, writes the records to Parquet, and decides cutover and
rollback. Keeping this state out of the router is what lets the router scale
out; keeping it in one place is what makes a cutover one decision rather than a
vote among replicas.

Routers learn the routing state (which model is primary, the shadow fraction)
from the answer to every event batch, so a cutover reaches every router
replica within one sync interval and never needs a replica restart.

Searches (``POST /v1/search``) follow the same life cycle in their own records
(``searches/`` in the log) and statistics (the report's ``retrieval`` section:
top-k overlap, and with feedback labels each model's top-1 / top-k hits), so they
never change predict's agreement, flips or gates.

All methods return plain dicts (``{"status": 409, "detail": ...}`` for refusals)
instead of raising, so the router can pass the status straight to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import numpy as np
from ray import serve

from graceful_ray.errors import ConfigError, GracefulRayError
from graceful_ray.serve.config import BASELINE, CANDIDATE, GateConfig, ShadowConfig
from graceful_ray.serve.gates import evaluate, explain, watch
from graceful_ray.serve.logs import to_serve_logs
from graceful_ray.serve.metrics import ComparatorMetrics
from graceful_ray.serve.records import LABELS_DIR, RECORDS_DIR, SEARCHES_DIR, RecordLog
from graceful_ray.serve.runner import lower_priority
from graceful_ray.serve.search import overlap as topk_overlap
from graceful_ray.serve.stats import RetrievalStats, ShadowStats, compose_report

log = logging.getLogger(__name__)

_HISTORY = 100
_MAX_ORPHANS = 100_000


class Tracked:
    """One served input row, from the primary's answer to its label."""

    __slots__ = ("request_id", "time_ms", "epoch", "primary", "primary_ref", "shadow_ref",
                 "shadowed", "decisions", "ms", "error", "label", "features", "done", "segment")

    def __init__(self, request_id: str, time_ms: int, epoch: int, primary: str,
                 primary_ref: str, shadow_ref: str | None, shadowed: bool,
                 segment: str | None = None) -> None:
        self.segment = segment
        self.request_id = request_id
        self.time_ms = time_ms
        self.epoch = epoch
        self.primary = primary
        self.primary_ref = primary_ref
        self.shadow_ref = shadow_ref
        self.shadowed = shadowed
        self.decisions: dict[str, int | None] = {BASELINE: None, CANDIDATE: None}
        self.ms: dict[str, float | None] = {BASELINE: None, CANDIDATE: None}
        self.error: str | None = None
        self.label: int | None = None
        self.features = None
        self.done = False


class SearchTracked:
    """One searched input row (``POST /v1/search``), from the primary's top-k to its label."""

    __slots__ = ("request_id", "time_ms", "epoch", "primary", "primary_ref", "shadow_ref",
                 "shadowed", "k", "snapshot", "ids", "scores", "hit_labels", "ms", "error",
                 "skipped", "overlap", "label", "features", "done")

    def __init__(self, request_id: str, time_ms: int, epoch: int, primary: str,
                 primary_ref: str, shadow_ref: str | None, shadowed: bool, k: int,
                 snapshot: int | None) -> None:
        self.request_id = request_id
        self.time_ms = time_ms
        self.epoch = epoch
        self.primary = primary
        self.primary_ref = primary_ref
        self.shadow_ref = shadow_ref
        self.shadowed = shadowed
        self.k = k
        self.snapshot = snapshot
        self.ids: dict[str, list | None] = {BASELINE: None, CANDIDATE: None}
        self.scores: dict[str, list | None] = {BASELINE: None, CANDIDATE: None}
        self.hit_labels: dict[str, list | None] = {BASELINE: None, CANDIDATE: None}
        self.ms: dict[str, float | None] = {BASELINE: None, CANDIDATE: None}
        self.error: str | None = None
        self.skipped: str | None = None
        self.overlap: float | None = None
        self.label: int | None = None
        self.features = None
        self.done = False


def _rows(a: Any, i: int) -> list | None:
    return None if a is None else a[i].tolist()


class ComparatorCore:
    """The comparator's logic without Ray, so it can be unit-tested directly."""

    def __init__(self, config: ShadowConfig, refs: dict[str, str], classes: list[int]) -> None:
        self.cfg = config
        self.refs = dict(refs)
        self.classes = set(int(c) for c in classes)
        self.log = RecordLog(config.storage)
        self.stats = ShadowStats(config.latency_window)
        # The watch after cutover: only records the candidate answered as primary
        # in the current epoch (reset by every switch; see gates.watch).
        self.watch = ShadowStats(config.latency_window)
        self.metrics = ComparatorMetrics(config.app_name)
        self.index: OrderedDict[str, Tracked] = OrderedDict()
        self.open: dict[str, Tracked] = {}
        self.orphans: dict[str, tuple] = {}
        self.pending: list[Tracked] = []
        self.pending_labels: list[tuple[str, int, int]] = []
        self.state = {"baseline": refs[BASELINE], "candidate": refs[CANDIDATE],
                      "primary": BASELINE, "shadow_fraction": float(config.shadow_fraction),
                      "epoch": 0, "revision": 0, "gates": config.gates.to_dict(),
                      "history": []}
        self.gates = config.gates
        # Which start of the comparator this is: a router takes any state from a
        # new incarnation, whose revision may restart lower (a lost state file).
        self.incarnation = uuid.uuid4().hex
        self.written = 0
        self.failed_cols: dict[str, list] | None = None  # a batch whose write failed
        # Searches (POST /v1/search): the same life cycle, kept apart from predict's.
        self.search_stats = RetrievalStats(config.latency_window)
        self.search_index: OrderedDict[str, SearchTracked] = OrderedDict()
        self.search_open: dict[str, SearchTracked] = {}
        self.search_orphans: dict[str, tuple] = {}
        self.pending_searches: list[SearchTracked] = []
        self.searches_written = 0
        self.failed_search_cols: dict[str, list] | None = None
        # Events for a request id already recorded (a router re-sends a batch whose
        # ingest raised part-way): ignored, so an id is never counted twice.
        self.duplicates = 0
        self._restore()

    # ------------------------------------------------------------- restore
    def _restore(self) -> None:
        """Resume a log this storage path already holds (same two models only)."""
        saved = self.log.read_state()
        if saved is not None:
            if (saved.get("baseline"), saved.get("candidate")) != (self.refs[BASELINE],
                                                                   self.refs[CANDIDATE]):
                raise ConfigError(
                    f"storage {self.log.root.uri} already holds the comparison of "
                    f"{saved.get('baseline')} vs {saved.get('candidate')}, not "
                    f"{self.refs[BASELINE]} vs {self.refs[CANDIDATE]}: give a fresh storage path")
            self.state.update({k: saved[k] for k in ("primary", "shadow_fraction", "epoch",
                                                     "history", "gates") if k in saved})
            # A state saved before revisions existed: its epoch counted every switch.
            self.state["revision"] = int(saved.get("revision", self.state["epoch"]))
            self.gates = GateConfig.from_dict(self.state["gates"])
        records = self.log.read_table(RECORDS_DIR, columns=[
            "request_id", "time", "epoch", "primary", "primary_ref", "shadow_ref", "shadowed",
            "baseline_decision", "candidate_decision", "baseline_ms", "candidate_ms",
            "shadow_error", "label", "segment"])
        labels: dict[str, int] = {}
        label_table = self.log.read_table(LABELS_DIR, ["request_id", "label"])
        if label_table is not None:
            labels = dict(zip(label_table.column("request_id").to_pylist(),
                              label_table.column("label").to_pylist()))
        self._restore_searches(labels)
        if records is not None:
            for row in records.to_pylist():
                t = Tracked(row["request_id"], 0, row["epoch"], row["primary"],
                            row["primary_ref"], row["shadow_ref"], row["shadowed"],
                            row.get("segment"))
                t.decisions = {BASELINE: row["baseline_decision"],
                               CANDIDATE: row["candidate_decision"]}
                t.ms = {BASELINE: row["baseline_ms"], CANDIDATE: row["candidate_ms"]}
                t.error = row["shadow_error"]
                t.label = labels.get(t.request_id, row["label"])
                t.done = True
                self._account(t)
                self._track(t)
            self.written = records.num_rows
            log.info("resumed comparison log %s: %d records", self.log.root.uri,
                     records.num_rows)
        self.log.write_state(self.state)

    def _restore_searches(self, labels: dict[str, int]) -> None:
        searches = self.log.read_table(SEARCHES_DIR, columns=[
            "request_id", "epoch", "primary", "primary_ref", "shadow_ref", "shadowed", "k",
            "snapshot", "baseline_ids", "candidate_ids", "baseline_scores", "candidate_scores",
            "baseline_hit_labels", "candidate_hit_labels", "baseline_ms", "candidate_ms",
            "overlap", "shadow_error", "shadow_skipped", "label"])
        if searches is None:
            return
        for row in searches.to_pylist():
            t = SearchTracked(row["request_id"], 0, row["epoch"], row["primary"],
                              row["primary_ref"], row["shadow_ref"], row["shadowed"], row["k"],
                              row["snapshot"])
            for role in (BASELINE, CANDIDATE):
                t.ids[role] = row[f"{role}_ids"]
                t.scores[role] = row[f"{role}_scores"]
                t.hit_labels[role] = row[f"{role}_hit_labels"]
                t.ms[role] = row[f"{role}_ms"]
            t.error, t.skipped, t.overlap = row["shadow_error"], row["shadow_skipped"], row["overlap"]
            t.label = labels.get(t.request_id, row["label"])
            t.done = True
            self._account_search(t)
            self._track_search(t)
        self.searches_written = searches.num_rows
        log.info("resumed search log %s: %d search records", self.log.root.uri,
                 searches.num_rows)

    # ------------------------------------------------------------- records
    def _track(self, t: Tracked) -> None:
        self.index[t.request_id] = t
        while len(self.index) > self.cfg.max_tracked_records:
            self.index.popitem(last=False)

    def _account(self, t: Tracked) -> None:
        for stats in self._stats_of(t):
            stats.add_record(t.primary, t.decisions, t.ms, t.shadowed, t.error, t.segment)
            if t.label is not None:
                stats.add_label(t.decisions[BASELINE], t.decisions[CANDIDATE], t.label, t.segment)

    def _stats_of(self, t: Tracked) -> list[ShadowStats]:
        """The whole comparison, and the watch's when ``t`` was served since the cutover."""
        if t.primary == CANDIDATE and t.epoch == self.state["epoch"]:
            return [self.stats, self.watch]
        return [self.stats]

    def _complete(self, t: Tracked) -> None:
        t.done = True
        self._account(t)
        b, c = t.decisions[BASELINE], t.decisions[CANDIDATE]
        if b is not None and c is not None:
            self.metrics.compared(int(b == c), int(b != c))
        self.pending.append(t)

    def ingest(self, events: list[tuple]) -> None:
        """Apply a router's batch of events (see ``ShadowRouter._record_*``).

        Idempotent per request id: a router keeps a batch whose ``ingest`` call
        raised and sends it again, and the part applied before the error must not
        be counted a second time."""
        for ev in events:
            if ev[0] == "p":
                self._primary_event(*ev[1:])
            elif ev[0] == "s":
                self._shadow_event(*ev[1:])
            elif ev[0] == "q":
                self._search_event(*ev[1:])
            elif ev[0] == "r":
                self._search_shadow_event(*ev[1:])
            else:  # pragma: no cover - routers only send these four
                log.warning("unknown event kind %r ignored", ev[0])

    def _primary_event(self, ids: list[str], time_ms: int, epoch: int, role: str,
                       decisions: np.ndarray, ms: float, shadowed: bool,
                       features: np.ndarray | None, segment: str | None = None) -> None:
        shadow_role = CANDIDATE if role == BASELINE else BASELINE
        primary_ref, shadow_ref = self.refs[role], self.refs[shadow_role] if shadowed else None
        decisions = decisions.tolist()
        for i, rid in enumerate(ids):
            if rid in self.index:
                self._duplicate(rid)
                continue
            t = Tracked(rid, time_ms, epoch, role, primary_ref, shadow_ref, shadowed, segment)
            t.decisions[role] = decisions[i]
            t.ms[role] = ms
            if features is not None and self.cfg.log_inputs:
                t.features = features[i]
            self._track(t)
            if not shadowed:
                self._complete(t)
                continue
            orphan = self.orphans.pop(rid, None)
            if orphan is not None:
                self._apply_shadow(t, *orphan)
            else:
                self.open[rid] = t

    def _shadow_event(self, ids: list[str], role: str, decisions: np.ndarray | None,
                      ms: float | None, error: str | None) -> None:
        decisions = decisions.tolist() if decisions is not None else None
        for i, rid in enumerate(ids):
            d = decisions[i] if decisions is not None else None
            t = self.open.pop(rid, None)
            if t is None and rid in self.index:  # its record is complete: a re-sent event
                self._duplicate(rid)
                continue
            if t is None:  # shadow answered before the primary's event arrived
                self.orphans[rid] = (role, d, ms, error)
                if len(self.orphans) > _MAX_ORPHANS:  # primary events lost (a restart)
                    self.orphans.pop(next(iter(self.orphans)))
                continue
            self._apply_shadow(t, role, d, ms, error)

    def _duplicate(self, rid: str) -> None:
        self.duplicates += 1
        if self.duplicates == 1 or self.duplicates % 1000 == 0:
            log.warning("ignored a repeated event for request id %s (%d so far)", rid,
                        self.duplicates)

    def _apply_shadow(self, t: Tracked, role: str, decision: int | None, ms: float | None,
                      error: str | None) -> None:
        if error is None:
            t.decisions[role] = decision
            t.ms[role] = ms
        t.error = error
        self._complete(t)

    # ------------------------------------------------------------ searches
    def _track_search(self, t: SearchTracked) -> None:
        self.search_index[t.request_id] = t
        while len(self.search_index) > self.cfg.max_tracked_records:
            self.search_index.popitem(last=False)

    def _account_search(self, t: SearchTracked) -> None:
        self.search_stats.add_record(
            t.primary, {r: t.ids[r] is not None for r in (BASELINE, CANDIDATE)}, t.ms,
            t.shadowed, t.error, t.skipped, t.overlap)
        if t.label is not None:
            self.search_stats.add_label(t.hit_labels, t.label)

    def _complete_search(self, t: SearchTracked) -> None:
        t.done = True
        t.overlap = topk_overlap(t.ids[t.primary], t.ids[CANDIDATE if t.primary == BASELINE
                                                          else BASELINE])
        self._account_search(t)
        self.pending_searches.append(t)

    def _search_event(self, ids: list[str], time_ms: int, epoch: int, role: str, k: int,
                      top_ids: np.ndarray, scores: np.ndarray, hit_labels: np.ndarray | None,
                      snapshot: int | None, ms: float, shadowed: bool,
                      features: np.ndarray | None) -> None:
        shadow_role = CANDIDATE if role == BASELINE else BASELINE
        primary_ref, shadow_ref = self.refs[role], self.refs[shadow_role] if shadowed else None
        for i, rid in enumerate(ids):
            if rid in self.search_index:
                self._duplicate(rid)
                continue
            t = SearchTracked(rid, time_ms, epoch, role, primary_ref, shadow_ref, shadowed,
                              int(k), snapshot)
            t.ids[role], t.scores[role] = _rows(top_ids, i), _rows(scores, i)
            t.hit_labels[role] = _rows(hit_labels, i)
            t.ms[role] = ms
            if features is not None and self.cfg.log_inputs:
                t.features = features[i]
            self._track_search(t)
            if not shadowed:
                self._complete_search(t)
                continue
            orphan = self.search_orphans.pop(rid, None)
            if orphan is not None:
                self._apply_search_shadow(t, orphan)
            else:
                self.search_open[rid] = t

    def _search_shadow_event(self, ids: list[str], role: str, top_ids: np.ndarray | None,
                             scores: np.ndarray | None, hit_labels: np.ndarray | None,
                             ms: float | None, error: str | None, skipped: str | None) -> None:
        for i, rid in enumerate(ids):
            row = (role, _rows(top_ids, i), _rows(scores, i), _rows(hit_labels, i), ms, error,
                   skipped)
            t = self.search_open.pop(rid, None)
            if t is None and rid in self.search_index:  # complete already: a re-sent event
                self._duplicate(rid)
                continue
            if t is None:  # the shadow's event came first
                self.search_orphans[rid] = row
                if len(self.search_orphans) > _MAX_ORPHANS:
                    self.search_orphans.pop(next(iter(self.search_orphans)))
                continue
            self._apply_search_shadow(t, row)

    def _apply_search_shadow(self, t: SearchTracked, row: tuple) -> None:
        role, top_ids, scores, hit_labels, ms, error, skipped = row
        if error is None and skipped is None and top_ids is not None:
            t.ids[role], t.scores[role], t.hit_labels[role] = top_ids, scores, hit_labels
            t.ms[role] = ms
        t.error, t.skipped = error, skipped
        self._complete_search(t)

    # ------------------------------------------------------------ feedback
    def settled(self, request_id: str) -> bool:
        """True when a request id's record exists and is complete (feedback may name its result)."""
        if request_id in self.index:
            return request_id not in self.open
        if request_id in self.search_index:
            return request_id not in self.search_open
        return False

    def label(self, request_id: str, label: int) -> dict[str, Any]:
        if label not in self.classes:
            return {"status": 422, "request_id": request_id,
                    "detail": f"label {label} is not one of the models' classes "
                              f"{sorted(self.classes)}"}
        t = self.index.get(request_id)
        if t is None and request_id in self.search_index:
            return self._label_search(self.search_index[request_id], label)
        if t is None:
            return {"status": 404, "request_id": request_id,
                    "detail": f"unknown request id {request_id!r}: it was never served here, or "
                              f"is older than the last {self.cfg.max_tracked_records} requests"}
        if t.label is not None:
            if t.label == label:
                return self._label_result(t, "duplicate")
            return {"status": 409, "request_id": request_id,
                    "detail": f"request {request_id!r} already has label {t.label}; a label "
                              "cannot be changed"}
        t.label = label
        self.pending_labels.append((request_id, label, int(time.time() * 1000)))
        flip = "pending"
        if t.done:
            for stats in self._stats_of(t):
                flip = stats.add_label(t.decisions[BASELINE], t.decisions[CANDIDATE], label,
                                       t.segment)
            flip = "unpaired" if flip is None else flip
            if flip != "unpaired":
                self.metrics.flip(flip)
        return self._label_result(t, flip)

    def _label_result(self, t: Tracked, flip: str) -> dict[str, Any]:
        b, c = t.decisions[BASELINE], t.decisions[CANDIDATE]
        return {"status": 200, "request_id": t.request_id, "label": t.label,
                "baseline_decision": b, "candidate_decision": c,
                "baseline_correct": None if b is None else b == t.label,
                "candidate_correct": None if c is None else c == t.label,
                "flip": flip}

    def _label_search(self, t: SearchTracked, label: int) -> dict[str, Any]:
        """A search request's true label: scores both models' retrieval hits."""
        if t.label is not None:
            if t.label == label:
                return self._search_label_result(t, "duplicate")
            return {"status": 409, "request_id": t.request_id,
                    "detail": f"request {t.request_id!r} already has label {t.label}; a label "
                              "cannot be changed"}
        t.label = label
        self.pending_labels.append((t.request_id, label, int(time.time() * 1000)))
        flip = "pending"
        if t.done:
            flip = self.search_stats.add_label(t.hit_labels, label)
            flip = "unpaired" if flip is None else flip
        return self._search_label_result(t, flip)

    def _search_label_result(self, t: SearchTracked, flip: str) -> dict[str, Any]:
        """``flip`` is the *top-1 retrieval* flip: negative when the baseline's first
        result has the query's label and the candidate's does not."""
        out: dict[str, Any] = {"status": 200, "request_id": t.request_id, "label": t.label,
                               "kind": "search", "k": t.k, "flip": flip}
        for role in (BASELINE, CANDIDATE):
            hl = t.hit_labels[role]
            out[f"{role}_hit"] = None if not hl else hl[0] == t.label
            out[f"{role}_hit_at_k"] = None if not hl else t.label in hl
        return out

    def retrieval_report(self) -> dict[str, Any]:
        """The report's ``retrieval`` section: search pairs, top-k overlap, hits."""
        return {"gallery": self.cfg.gallery, "search_k": self.cfg.search_k,
                "max_search_k": self.cfg.max_search_k,
                **self.search_stats.summary(self.gates.confidence),
                "in_flight": len(self.search_open), "records_written": self.searches_written,
                "records_pending": len(self.pending_searches)}

    # -------------------------------------------------------------- report
    def routing(self) -> dict[str, Any]:
        return {"primary": self.state["primary"], "shadow_fraction": self.state["shadow_fraction"],
                "epoch": self.state["epoch"], "revision": self.state["revision"],
                "incarnation": self.incarnation}

    def report(self) -> dict[str, Any]:
        primary = self.state["primary"]
        report = compose_report(
            self.stats, self.gates, self.refs, primary, app=self.cfg.app_name,
            mode="live", shadow_fraction=self.state["shadow_fraction"],
            epoch=self.state["epoch"], in_flight=len(self.open), records_written=self.written,
            records_pending=len(self.pending), duplicate_events=self.duplicates,
            history=self.state["history"][-20:],
            storage=self.log.root.uri, retrieval=self.retrieval_report(),
            watch=self.watch_report())
        self.metrics.publish(report)
        return report

    def watch_report(self) -> dict[str, Any] | None:
        """The report's ``watch``: the comparison since the cutover and its verdict."""
        verdict = self.watch_verdict()
        if verdict is None:
            return None
        w = self.watch.summary(self.gates.confidence)
        return {**verdict, "since_epoch": self.state["epoch"], "compared": w["compared"],
                "labelled_pairs": w["labelled_pairs"], "nfr": w["nfr"],
                "disagreement": w["disagreement"], "per_class": w["per_class"],
                "per_segment": w["per_segment"]}

    # -------------------------------------------------------------- flush
    def take_pending(self, include_open: bool = False) -> tuple[dict[str, list] | None, list]:
        """Detach the completed records (and labels) to write; ``None`` if there are none."""
        if include_open:
            for t in list(self.open.values()):
                t.error = "incomplete"
                self._complete(t)
            self.open.clear()
        batch, self.pending = self.pending, []
        labels, self.pending_labels = self.pending_labels, []
        if not batch:
            return None, labels
        with_features = self.cfg.log_inputs
        cols: dict[str, list] = {k: [] for k in (
            "request_id", "time", "epoch", "primary", "primary_ref", "shadow_ref", "shadowed",
            "baseline_decision", "candidate_decision", "baseline_ms", "candidate_ms", "agree",
            "shadow_error", "label", "segment", "features")}
        for t in batch:
            b, c = t.decisions[BASELINE], t.decisions[CANDIDATE]
            cols["request_id"].append(t.request_id)
            cols["time"].append(t.time_ms)
            cols["epoch"].append(t.epoch)
            cols["primary"].append(t.primary)
            cols["primary_ref"].append(t.primary_ref)
            cols["shadow_ref"].append(t.shadow_ref)
            cols["shadowed"].append(t.shadowed)
            cols["baseline_decision"].append(b)
            cols["candidate_decision"].append(c)
            cols["baseline_ms"].append(t.ms[BASELINE])
            cols["candidate_ms"].append(t.ms[CANDIDATE])
            cols["agree"].append(None if b is None or c is None else b == c)
            cols["shadow_error"].append(t.error)
            cols["label"].append(t.label)
            cols["segment"].append(t.segment)
            if with_features:
                cols["features"].append(None if t.features is None
                                        else np.asarray(t.features, np.float32).reshape(-1))
            t.features = None  # written: free the memory
        return cols, labels

    def write(self, cols: dict[str, list] | None, labels: list) -> int:
        """Write what :meth:`take_pending` detached (runs on a worker thread)."""
        n = 0
        if cols is not None:
            self.log.write_records(cols, self.cfg.log_inputs, {
                "graceful_ray.baseline": self.refs[BASELINE],
                "graceful_ray.candidate": self.refs[CANDIDATE]})
            n = len(cols["request_id"])
        if labels:
            ids, values, times = zip(*labels)
            self.log.write_labels(list(ids), list(values), list(times))
        return n

    def take_pending_searches(self, include_open: bool = False) -> dict[str, list] | None:
        """Detach the completed search records to write; ``None`` if there are none."""
        if include_open:
            for t in list(self.search_open.values()):
                t.error = "incomplete"
                self._complete_search(t)
            self.search_open.clear()
        batch, self.pending_searches = self.pending_searches, []
        if not batch:
            return None
        names = ["request_id", "time", "epoch", "primary", "primary_ref", "shadow_ref",
                 "shadowed", "k", "snapshot", "overlap", "shadow_error", "shadow_skipped", "label"]
        for role in (BASELINE, CANDIDATE):
            names += [f"{role}_ids", f"{role}_scores", f"{role}_hit_labels", f"{role}_ms"]
        cols: dict[str, list] = {k: [] for k in names + ["features"]}
        for t in batch:
            for name, value in (("request_id", t.request_id), ("time", t.time_ms),
                                ("epoch", t.epoch), ("primary", t.primary),
                                ("primary_ref", t.primary_ref), ("shadow_ref", t.shadow_ref),
                                ("shadowed", t.shadowed), ("k", t.k), ("snapshot", t.snapshot),
                                ("overlap", t.overlap), ("shadow_error", t.error),
                                ("shadow_skipped", t.skipped), ("label", t.label)):
                cols[name].append(value)
            for role in (BASELINE, CANDIDATE):
                cols[f"{role}_ids"].append(t.ids[role])
                cols[f"{role}_scores"].append(t.scores[role])
                cols[f"{role}_hit_labels"].append(t.hit_labels[role])
                cols[f"{role}_ms"].append(t.ms[role])
            if self.cfg.log_inputs:
                cols["features"].append(None if t.features is None
                                        else np.asarray(t.features, np.float32).reshape(-1))
            # Written: keep only what a late label needs (the hits' gallery labels).
            t.features = None
            t.scores = {BASELINE: None, CANDIDATE: None}
        return cols

    def write_searches(self, cols: dict[str, list] | None) -> int:
        """Write what :meth:`take_pending_searches` detached (runs on a worker thread)."""
        if cols is None:
            return 0
        self.log.write_searches(cols, self.cfg.log_inputs, {
            "graceful_ray.baseline": self.refs[BASELINE],
            "graceful_ray.candidate": self.refs[CANDIDATE],
            "graceful_ray.gallery": self.cfg.gallery or ""})
        return len(cols["request_id"])

    def restore_pending(self, cols: dict[str, list] | None, labels: list) -> None:
        """Put back what a failed write detached, so the next flush retries it."""
        if cols is not None:
            self.failed_cols = cols  # kept as columns: the next flush writes them first
        self.pending_labels = list(labels) + self.pending_labels

    # ------------------------------------------------------------ routing
    def change_routing(self, **changes: Any) -> None:
        """Apply ``changes`` to the state as one new revision, saved before anyone sees it.

        Routers learn the state from every answer, so a change must not be
        visible before it is stored (a failed write would leave routers ahead of
        what a restarted comparator restores): the new state is written first
        and only then replaces the one in memory. A failed write raises and
        changes nothing.
        """
        state = {**self.state, **changes, "revision": self.state["revision"] + 1}
        self.log.write_state(state)
        self.state = state

    def switch(self, to: str, *, action: str, forced: bool, reason: str,
               gates: dict[str, Any] | None) -> None:
        previous, epoch = self.state["primary"], self.state["epoch"] + 1
        history = (self.state["history"] + [{
            "action": action, "at": time.time(), "from": self.refs[previous],
            "to": self.refs[to], "forced": forced, "reason": reason,
            "failing_gates": gates["failing"] if gates else [],
            "epoch": epoch}])[-_HISTORY:]
        self.change_routing(primary=to, epoch=epoch, history=history)
        self.watch = ShadowStats(self.cfg.latency_window)  # the watch starts afresh

    def watch_verdict(self) -> dict[str, Any] | None:
        """After a cutover with ``auto_rollback``: :func:`gates.watch` on the records
        since; ``None`` when there is nothing to watch."""
        if self.state["primary"] != CANDIDATE:
            return None
        verdict = watch(self.watch.summary(self.gates.confidence), self.gates)
        return {**verdict, "auto_rollback": self.gates.auto_rollback}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=1000)
class Comparator:
    """The Serve deployment around :class:`ComparatorCore` (one replica)."""

    def __init__(self, config: ShadowConfig, refs: dict[str, str], classes: list[int]) -> None:
        to_serve_logs()
        lower_priority(config.background_nice)  # bookkeeping never competes with callers
        self._core = ComparatorCore(config, refs, classes)
        self._cfg = config
        self._lock: asyncio.Lock | None = None
        self._arrived: asyncio.Condition | None = None
        self._loop_task: asyncio.Task | None = None
        self._registry = None
        if config.production_alias:
            # Import (and open) the registry now: on the first cutover it would
            # otherwise cost seconds of torch import while traffic waits.
            from graceful_ray.registry import Registry

            self._registry = Registry(config.registry)

    # -------------------------------------------------------------- plumbing
    def _primitives(self) -> None:
        """asyncio objects are made on the replica's loop, at first use."""
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._arrived = asyncio.Condition()

    def _start(self) -> None:
        self._primitives()
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.flush_interval_s)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - keep flushing; the error is logged
                log.exception("periodic flush failed; will retry")
            try:  # the gauges stay current for Prometheus without anyone reading the report
                self._core.report()
            except Exception:  # noqa: BLE001 - metrics must never stop the flushing
                log.exception("could not publish the gate metrics")

    async def flush(self, include_open: bool = False) -> dict[str, Any]:
        """Write completed records (predict and search) and labels to Parquet now."""
        self._primitives()
        core = self._core
        async with self._lock:
            failed, core.failed_cols = core.failed_cols, None
            cols, labels = core.take_pending(include_open)
            if failed is not None:
                cols = failed if cols is None else {k: failed[k] + cols[k] for k in cols}
            sfailed, core.failed_search_cols = core.failed_search_cols, None
            scols = core.take_pending_searches(include_open)
            if sfailed is not None:
                scols = sfailed if scols is None else {k: sfailed[k] + scols[k] for k in scols}
            try:
                n = await asyncio.to_thread(core.write, cols, labels)
            except Exception as e:
                core.restore_pending(cols, labels)
                core.failed_search_cols = scols
                log.error("could not write the comparison log (%s); records are kept in "
                          "memory and retried", e)
                return {"status": 503, "detail": f"cannot write the comparison log: {e}"}
            core.written += n
            try:
                ns = await asyncio.to_thread(core.write_searches, scols)
            except Exception as e:
                core.failed_search_cols = scols
                log.error("could not write the search log (%s); search records are kept in "
                          "memory and retried", e)
                return {"status": 503, "detail": f"cannot write the search log: {e}"}
            core.searches_written += ns
            return {"status": 200, "written": n, "records_written": core.written,
                    "searches_written": ns, "search_records_written": core.searches_written}

    # ----------------------------------------------------------------- API
    async def ingest(self, events: list[tuple]) -> dict[str, Any]:
        self._start()
        self._core.ingest(events)
        async with self._arrived:
            self._arrived.notify_all()
        if len(self._core.pending) + len(self._core.pending_searches) >= self._cfg.flush_records \
                and not self._lock.locked():
            asyncio.get_running_loop().create_task(self.flush())
        return self._core.routing()

    async def sync(self) -> dict[str, Any]:
        self._start()
        return self._core.routing()

    async def feedback(self, items: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Labels for request ids.

        A record may still be on its way from a router (events are batched), or
        waiting for its shadow's answer; an id in either state waits up to
        ``feedback_grace_s`` so the answer can name the flip the label makes.
        """
        self._start()
        core = self._core

        def settled() -> bool:
            return all(core.settled(rid) for rid, _ in items)

        if not settled() and self._cfg.feedback_grace_s > 0:
            try:
                async with self._arrived:
                    await asyncio.wait_for(self._arrived.wait_for(settled),
                                           self._cfg.feedback_grace_s)
            except asyncio.TimeoutError:
                pass
        results = [core.label(rid, label) for rid, label in items]
        await self._watch()
        return results

    async def _watch(self) -> None:
        """Roll back on its own when the watch after cutover shows a regression."""
        core = self._core
        if not core.gates.auto_rollback or core.state["primary"] != CANDIDATE:
            return  # nothing to decide: skip the summary's cost on every feedback batch
        verdict = core.watch_verdict()
        if not verdict or not verdict["auto_rollback"] or not verdict["rollback"]:
            return
        reason = "auto_rollback: " + "; ".join(verdict["reasons"])
        log.warning("%s", reason)
        result = await self._switch(BASELINE, "auto_rollback", True, reason)
        if result["status"] == 200:
            self._core.metrics.auto_rollback()
        if result["status"] == 503:  # storage or registry down: retried on the next feedback
            log.error("auto_rollback failed: %s", result["detail"])

    async def report(self) -> dict[str, Any]:
        self._start()
        return self._core.report()

    async def set_fraction(self, fraction: float) -> dict[str, Any]:
        self._start()
        try:
            await asyncio.to_thread(self._core.change_routing, shadow_fraction=float(fraction))
        except Exception as e:  # noqa: BLE001 - report any storage failure to the admin
            return {"status": 503, "detail": f"the shadow fraction was not changed: could not "
                                             f"save the routing state: {e}", **self._core.routing()}
        log.info("shadow fraction set to %.3f", fraction)
        return {"status": 200, **self._core.routing()}

    async def set_gates(self, changes: dict[str, Any]) -> dict[str, Any]:
        self._start()
        try:
            gates = GateConfig.from_dict({**self._core.gates.to_dict(), **changes})
        except GracefulRayError as e:
            return {"status": 422, "detail": str(e)}
        self._core.gates = gates
        self._core.state["gates"] = gates.to_dict()
        await asyncio.to_thread(self._core.log.write_state, self._core.state)
        log.info("gates set to %s", gates)
        return {"status": 200, "gates": gates.to_dict()}

    async def cutover(self, force: bool = False, reason: str = "") -> dict[str, Any]:
        """Make the candidate primary if the gates pass (or ``force``)."""
        return await self._switch(CANDIDATE, "cutover", force, reason)

    async def rollback(self, reason: str = "") -> dict[str, Any]:
        """Make the baseline primary again; never gated, so always instant."""
        return await self._switch(BASELINE, "rollback", True, reason)

    async def _switch(self, to: str, action: str, force: bool, reason: str) -> dict[str, Any]:
        self._start()
        core = self._core
        if core.state["primary"] == to:
            what = ("the candidate is already primary" if to == CANDIDATE
                    else "the baseline is already primary: nothing to roll back")
            return {"status": 409, "detail": f"{action} refused: {what}", **core.routing()}
        gates = None
        if action == "cutover":
            gates = evaluate(core.stats.summary(core.gates.confidence), core.gates)
            if not gates["passed"] and not force:
                return {"status": 409, "detail": f"cutover refused by the gates: "
                                                 f"{explain(gates)}", "gates": gates,
                        **core.routing()}
            if not gates["passed"]:
                log.warning("FORCED cutover to %s although gates fail (%s); reason: %s",
                            core.refs[to], ", ".join(gates["failing"]), reason or "none given")
        # Records up to the switch are written before the roles change.
        flushed = await self.flush()
        if flushed["status"] != 200:
            return {"status": 503, "detail": f"{action} aborted: {flushed['detail']}",
                    **core.routing()}
        alias = self._cfg.production_alias
        if alias:
            try:
                await asyncio.to_thread(self._set_alias, core.refs[to], alias)
            except Exception as e:  # noqa: BLE001 - report any registry failure to the admin
                return {"status": 503, "detail": f"{action} aborted: could not move "
                                                 f"{alias!r} in the registry: {e}",
                        **core.routing()}
        forced = gates is not None and not gates["passed"]
        try:
            await asyncio.to_thread(core.switch, to, action=action, forced=forced, reason=reason,
                                    gates=gates)
        except Exception as e:  # noqa: BLE001 - report any storage failure to the admin
            if alias:  # put the alias back where the unchanged routing is
                try:
                    await asyncio.to_thread(self._set_alias, core.refs[core.state["primary"]], alias)
                except Exception:  # noqa: BLE001
                    log.exception("could not move %r back after the failed %s", alias, action)
            return {"status": 503, "detail": f"{action} aborted: could not save the routing "
                                             f"state: {e}", **core.routing()}
        log.info("%s: %s is primary now (epoch %d)", action, core.refs[to], core.state["epoch"])
        return {"status": 200, "detail": f"{action} done: {core.refs[to]} is primary",
                "gates": gates, **core.routing()}

    def _set_alias(self, ref: str, alias: str) -> None:
        from graceful_ray.registry import Registry

        if self._registry is None:
            self._registry = Registry(self._cfg.registry)
        name, _, version = ref.partition("@")
        self._registry.set_alias(name, alias, version)

    async def __del__(self) -> None:
        """Serve calls this on graceful shutdown: write everything still in memory."""
        if getattr(self, "_core", None) is None:
            return
        if self._loop_task is not None:
            self._loop_task.cancel()
        try:
            await self.flush(include_open=True)
        except Exception:  # noqa: BLE001
            log.exception("final flush failed")
