"""Request kinds: everything that differs between ``/v1/predict`` and ``/v1/search``.

The router and the comparator run *one* request path for every kind: parse the
inputs, give each row a request id, answer with the primary, copy the rows to
the shadow through :class:`~graceful_ray.serve.shadow.ShadowCaller` (coalesced,
bounded, behind a circuit breaker), send typed events to the comparator, pair
them into :class:`Record` s, count them, write them to Parquet, and take labels.
What a kind owns is what that path needs to know about its payload:

* its request schema (the pydantic body of its route) and extra parameters;
* how its primary and shadow answers are computed, split per row and returned;
* its statistics and agreement rule (predict: the same decision; search: top-k
  overlap) and what a label means for it (a flip);
* its Arrow schema and log folder, and how a record is read back on restart.

Adding a third kind (say, embeddings only) is one subclass of
:class:`RequestKind` and one entry in :data:`KINDS`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from graceful_ray.retrieval.errors import QueryError
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, ROLES, ShadowConfig, other
from graceful_ray.serve.comparison_log import RECORDS_DIR, SEARCHES_DIR, RecordLog
from graceful_ray.serve.model_runner import Prediction
from graceful_ray.serve.schemas import InputError, PredictRequest, SearchRequest, check_k
from graceful_ray.serve.gallery_search import SearchAnswer
from graceful_ray.serve.gallery_search import overlap as topk_overlap
from graceful_ray.serve.stats import RetrievalStats, ShadowStats


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class PrimaryEvent:
    """The primary answered rows ``ids`` (one block of one request)."""

    kind: str
    ids: list[str]
    time_ms: int
    epoch: int
    role: str                         # which role was primary
    answer: Any                       # the kind's block answer (see RequestKind.event_answer)
    ms: float
    shadowed: bool
    features: np.ndarray | None = None
    segment: str | None = None


@dataclass(frozen=True)
class ShadowEvent:
    """The shadow answered rows ``ids``, failed on them (``error``), or did not run
    (``skipped``: why it may not answer this kind)."""

    kind: str
    ids: list[str]
    role: str
    answer: Any = None                # None when error or skipped
    ms: float | None = None
    error: str | None = None
    skipped: str | None = None


def _pair() -> dict[str, Any]:
    return {BASELINE: None, CANDIDATE: None}


@dataclass(eq=False)
class Record:
    """One served input row of any kind, from the primary's answer to its label."""

    request_id: str
    time_ms: int
    epoch: int
    primary: str
    primary_ref: str
    shadow_ref: str | None
    shadowed: bool
    segment: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # search: k, snapshot
    answers: dict[str, Any] = field(default_factory=_pair)  # per role: the kind's row answer
    ms: dict[str, float | None] = field(default_factory=_pair)
    error: str | None = None
    skipped: str | None = None
    agreement: Any = None             # the kind's agreement value, set when complete
    label: int | None = None
    features: Any = None
    done: bool = False


@dataclass
class SearchRow:
    """One model's top-k for one query row."""

    ids: list | None
    scores: list | None
    hit_labels: list | None


# ------------------------------------------------------------------- kinds
class RequestKind:
    """What one request kind owns; see the module docstring."""

    name: ClassVar[str]
    request_model: ClassVar[type]     # the route's pydantic body
    log_dir: ClassVar[str]            # folder of its Parquet records
    metric_prefix: ClassVar[str]      # "" or "search-": the router's metric role names
    gated: ClassVar[bool] = False     # its statistics feed the cutover gates and the watch

    # ------------------------------------------------------ router: a request
    def params(self, body: Any, cfg: ShadowConfig) -> tuple:
        """Extra call parameters from the request body (InputError when bad)."""
        return ()

    async def run_local(self, router: Any, role: str, x: np.ndarray, params: tuple
                        ) -> tuple[Any, float]:
        """``(answer, model ms)`` computed inside the router replica."""
        raise NotImplementedError

    async def run_remote(self, handle: Any, x: np.ndarray, params: tuple) -> tuple[Any, float]:
        """``(answer, model ms)`` from the role's own deployment (the primary's answer)."""
        raise NotImplementedError

    def shadow_call(self, handle: Any, x: np.ndarray, params: tuple):
        """The shadow's deployment call (a DeploymentResponse) for rows ``x``."""
        raise NotImplementedError

    def shadow_result(self, result: Any, n: int) -> tuple[Any, float]:
        """``(answer, ms)`` of a shadow call's result for ``n`` rows (raises when short)."""
        raise NotImplementedError

    def split(self, answer: Any, sizes: list[int]) -> list[Any]:
        """A coalesced shadow answer cut back into one answer per request."""
        raise NotImplementedError

    def refused(self, answer: Any) -> str | None:
        """Why the model did not answer (it may not serve this kind), or None."""
        return None

    def take(self, answer: Any, idx: np.ndarray) -> Any:
        """An event's answer for the rows ``idx`` only (events split across shards)."""
        raise NotImplementedError

    def event_answer(self, answer: Any) -> Any:
        """What of the primary's answer the comparator needs."""
        return answer

    def respond(self, ids: list[str], answer: Any, ref: str, classes: list[int]
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The response body and its result per row (a one-input request also gets
        its row's fields at the top level)."""
        raise NotImplementedError

    def primary_error(self, exc: Exception, ref: str, cfg: ShadowConfig) -> InputError | None:
        """A primary failure that is the caller's to fix (4xx), or None (a 503)."""
        return None

    def refusal(self, reason: str, ref: str, cfg: ShadowConfig) -> InputError:
        """The answer when the primary may not serve this kind (see :meth:`refused`)."""
        return InputError(409, f"the primary {ref} may not serve this request: {reason}")

    # ------------------------------------------------- comparator: a record
    def rows(self, answer: Any, n: int) -> list[Any]:
        """An event's block answer as ``n`` row answers."""
        raise NotImplementedError

    def record_params(self, answer: Any) -> dict[str, Any]:
        return {}

    def new_stats(self, cfg: ShadowConfig) -> Any:
        raise NotImplementedError

    def agreement(self, t: Record) -> Any:
        raise NotImplementedError

    def account(self, stats: Any, t: Record) -> None:
        """Add a complete record (and its label, if known) to ``stats``."""
        raise NotImplementedError

    def add_label(self, stats: Any, t: Record, label: int) -> str | None:
        """Add a label to a complete record; its flip (None: unpaired)."""
        raise NotImplementedError

    def label_result(self, t: Record, flip: str) -> dict[str, Any]:
        raise NotImplementedError

    def metrics(self, core: Any, t: Record) -> None:
        """Publish what a completed record changes in the comparator's metrics."""

    def flip_metric(self, core: Any, flip: str) -> None:
        """Publish a labelled flip."""

    # ------------------------------------------------------- comparator: log
    def columns(self, batch: list[Record], with_features: bool) -> dict[str, list]:
        raise NotImplementedError

    def drop_written(self, t: Record) -> None:
        """Free what a written record no longer needs (a late label needs little)."""
        t.features = None

    def write(self, log: RecordLog, cols: dict[str, list], cfg: ShadowConfig,
              metadata: dict[str, str]) -> None:
        raise NotImplementedError

    restore_columns: ClassVar[list[str]]

    def restore(self, row: dict[str, Any]) -> Record:
        """A record read back from the log (complete)."""
        raise NotImplementedError

    def section(self, book: "Book", core: Any) -> dict[str, Any] | None:
        """The report section of a kind that is not gated (None for the gated one)."""
        return None


def _features(batch: list[Record]) -> list:
    return [None if t.features is None else np.asarray(t.features, np.float32).reshape(-1)
            for t in batch]


def _base_columns(t: Record) -> dict[str, Any]:
    return {"request_id": t.request_id, "time": t.time_ms, "epoch": t.epoch,
            "primary": t.primary, "primary_ref": t.primary_ref, "shadow_ref": t.shadow_ref,
            "shadowed": t.shadowed, "shadow_error": t.error, "label": t.label}


def _to_columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _base_record(row: dict[str, Any]) -> Record:
    return Record(row["request_id"], 0, row["epoch"], row["primary"], row["primary_ref"],
                  row["shadow_ref"], row["shadowed"], row.get("segment"), done=True,
                  error=row["shadow_error"], label=row["label"])


_BASE_RESTORE = ["request_id", "epoch", "primary", "primary_ref", "shadow_ref", "shadowed",
                 "shadow_error", "label"]


class PredictKind(RequestKind):
    """``POST /v1/predict``: decisions; agreement is the same decision, flips are
    judged by the label; its statistics are the ones the gates read."""

    name = "predict"
    request_model = PredictRequest
    log_dir = RECORDS_DIR
    metric_prefix = ""
    gated = True
    restore_columns = _BASE_RESTORE + ["baseline_decision", "candidate_decision",
                                       "baseline_ms", "candidate_ms", "segment"]

    async def run_local(self, router, role, x, params):
        t0 = time.perf_counter()
        pred = await router._primary_batch((role, x))
        return pred, (time.perf_counter() - t0) * 1000.0

    async def run_remote(self, handle, x, params):
        decisions, scores, ms = await handle.predict.remote(x, True)
        return Prediction(decisions, scores), ms

    def shadow_call(self, handle, x, params):
        return handle.predict.remote(x, False)

    def shadow_result(self, result, n):
        decisions, _, ms = result
        if len(decisions) != n:
            raise ValueError(f"the shadow returned {len(decisions)} decisions for {n} rows")
        return decisions, ms

    def split(self, answer, sizes):
        bounds = np.cumsum([0] + sizes)
        return [self.take(answer, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def take(self, answer, idx):
        return answer[idx]

    def event_answer(self, answer: Prediction):
        return answer.decisions

    def respond(self, ids, answer, ref, classes):
        decisions = answer.decisions.tolist()
        rows = [{"request_id": ids[i], "decision": decisions[i], "scores": answer.scores[i]}
                for i in range(len(ids))]
        return {"model": ref, "classes": classes, "predictions": rows}, rows

    def rows(self, answer, n):
        return [None] * n if answer is None else answer.tolist()

    def new_stats(self, cfg):
        return ShadowStats(cfg.latency_window)

    def agreement(self, t):
        b, c = t.answers[BASELINE], t.answers[CANDIDATE]
        return None if b is None or c is None else b == c

    def account(self, stats, t):
        stats.add_record(t.primary, t.answers, t.ms, t.shadowed, t.error, t.segment)
        if t.label is not None:
            stats.add_label(t.answers[BASELINE], t.answers[CANDIDATE], t.label, t.segment)

    def add_label(self, stats, t, label):
        return stats.add_label(t.answers[BASELINE], t.answers[CANDIDATE], label, t.segment)

    def label_result(self, t, flip):
        b, c = t.answers[BASELINE], t.answers[CANDIDATE]
        return {"status": 200, "request_id": t.request_id, "label": t.label,
                "baseline_decision": b, "candidate_decision": c,
                "baseline_correct": None if b is None else b == t.label,
                "candidate_correct": None if c is None else c == t.label,
                "flip": flip}

    def metrics(self, core, t):
        if t.agreement is not None:
            core.metrics.compared(int(t.agreement), int(not t.agreement))

    def flip_metric(self, core, flip):
        core.metrics.flip(flip)

    def columns(self, batch, with_features):
        rows = []
        for t in batch:
            row = _base_columns(t)
            row.update(baseline_decision=t.answers[BASELINE],
                       candidate_decision=t.answers[CANDIDATE],
                       baseline_ms=t.ms[BASELINE], candidate_ms=t.ms[CANDIDATE],
                       agree=t.agreement, segment=t.segment)
            rows.append(row)
        cols = _to_columns(rows)
        cols["features"] = _features(batch) if with_features else []
        return cols

    def write(self, log, cols, cfg, metadata):
        log.write_records(cols, cfg.log_inputs, metadata)

    def restore(self, row):
        t = _base_record(row)
        t.answers = {BASELINE: row["baseline_decision"], CANDIDATE: row["candidate_decision"]}
        t.ms = {BASELINE: row["baseline_ms"], CANDIDATE: row["candidate_ms"]}
        t.agreement = self.agreement(t)
        return t


def _row(a: Any, i: int) -> list | None:
    return None if a is None else a[i].tolist()


class SearchKind(RequestKind):
    """``POST /v1/search``: top-k gallery ids; agreement is the top-k overlap, a label
    judges each model's top-1 hit; its statistics are the report's ``retrieval``."""

    name = "search"
    request_model = SearchRequest
    log_dir = SEARCHES_DIR
    metric_prefix = "search-"
    restore_columns = _BASE_RESTORE + [
        "k", "snapshot", "overlap", "shadow_skipped"] + [
        f"{role}_{c}" for role in ROLES for c in ("ids", "scores", "hit_labels", "ms")]

    def params(self, body, cfg):
        return (check_k(body.k, cfg.search_k, cfg.max_search_k),)

    async def run_local(self, router, role, x, params):
        t0 = time.perf_counter()
        runner = router._runners[role]
        answer = await runner.run_async(router._search[role].search, runner.embed, x, params[0])
        return answer, (time.perf_counter() - t0) * 1000.0

    async def run_remote(self, handle, x, params):
        answer = await handle.search.remote(x, params[0])
        return answer, answer.ms

    def shadow_call(self, handle, x, params):
        return handle.search.remote(x, params[0])

    def shadow_result(self, result: SearchAnswer, n):
        if result.refused is None and (result.ids is None or len(result.ids) != n):
            got = 0 if result.ids is None else len(result.ids)
            raise ValueError(f"the shadow returned {got} top-k lists for {n} rows")
        return result, result.ms

    def split(self, answer: SearchAnswer, sizes):
        bounds = np.cumsum([0] + sizes)
        return [self.take(answer, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def refused(self, answer: SearchAnswer):
        return answer.refused

    def take(self, answer: SearchAnswer, idx):
        if answer.ids is None:
            return answer
        return SearchAnswer(ids=answer.ids[idx], scores=answer.scores[idx],
                            labels=None if answer.labels is None else answer.labels[idx],
                            snapshot=answer.snapshot, k=answer.k, ms=answer.ms,
                            refused=answer.refused)

    def respond(self, ids, answer, ref, classes):
        rows = [{"request_id": ids[i], "ids": answer.ids[i].tolist(), "scores": answer.scores[i]}
                for i in range(len(ids))]
        return {"model": ref, "k": answer.k, "snapshot": answer.snapshot, "results": rows}, rows

    def primary_error(self, exc, ref, cfg):
        if isinstance(exc, QueryError):
            return InputError(422, f"the primary {ref} produced no usable query embedding for "
                                   f"this input: {exc}")
        return None

    def refusal(self, reason, ref, cfg):
        return InputError(409, f"the primary {ref} may not search the gallery {cfg.gallery}: "
                               f"{reason}. Roll back (POST /v1/admin/rollback) or move the "
                               "gallery into its embedding space (`graceful-ray gallery "
                               "backfill`)")

    def rows(self, answer: SearchAnswer | None, n):
        if answer is None or answer.ids is None:
            return [None] * n
        return [SearchRow(_row(answer.ids, i), _row(answer.scores, i), _row(answer.labels, i))
                for i in range(n)]

    def record_params(self, answer: SearchAnswer):
        return {"k": int(answer.k), "snapshot": answer.snapshot}

    def new_stats(self, cfg):
        return RetrievalStats(cfg.latency_window)

    @staticmethod
    def _hit_labels(t: Record) -> dict[str, list | None]:
        return {r: None if t.answers[r] is None else t.answers[r].hit_labels for r in ROLES}

    def agreement(self, t):
        ids = {r: None if t.answers[r] is None else t.answers[r].ids for r in ROLES}
        return topk_overlap(ids[t.primary], ids[other(t.primary)])

    def account(self, stats, t):
        stats.add_record(t.primary, {r: t.answers[r] is not None for r in ROLES}, t.ms,
                         t.shadowed, t.error, t.skipped, t.agreement)
        if t.label is not None:
            stats.add_label(self._hit_labels(t), t.label)

    def add_label(self, stats, t, label):
        return stats.add_label(self._hit_labels(t), label)

    def label_result(self, t, flip):
        """``flip`` is the *top-1 retrieval* flip: negative when the baseline's first
        result has the query's label and the candidate's does not."""
        out: dict[str, Any] = {"status": 200, "request_id": t.request_id, "label": t.label,
                               "kind": "search", "k": t.params["k"], "flip": flip}
        for role, hl in self._hit_labels(t).items():
            out[f"{role}_hit"] = None if not hl else hl[0] == t.label
            out[f"{role}_hit_at_k"] = None if not hl else t.label in hl
        return out

    def columns(self, batch, with_features):
        rows = []
        for t in batch:
            row = _base_columns(t)
            row.update(k=t.params["k"], snapshot=t.params["snapshot"], overlap=t.agreement,
                       shadow_skipped=t.skipped)
            for role in ROLES:
                a = t.answers[role]
                row.update({f"{role}_ids": a and a.ids, f"{role}_scores": a and a.scores,
                            f"{role}_hit_labels": a and a.hit_labels,
                            f"{role}_ms": t.ms[role]})
            rows.append(row)
        cols = _to_columns(rows)
        cols["features"] = _features(batch) if with_features else []
        return cols

    def drop_written(self, t):
        t.features = None  # a late label needs only the hits' gallery labels
        for a in t.answers.values():
            if a is not None:
                a.scores = None

    def write(self, log, cols, cfg, metadata):
        log.write_searches(cols, cfg.log_inputs,
                           {**metadata, "graceful_ray.gallery": cfg.gallery or ""})

    def restore(self, row):
        t = _base_record(row)
        t.params = {"k": row["k"], "snapshot": row["snapshot"]}
        for role in ROLES:
            ids = row[f"{role}_ids"]
            t.answers[role] = None if ids is None else SearchRow(
                ids, row[f"{role}_scores"], row[f"{role}_hit_labels"])
            t.ms[role] = row[f"{role}_ms"]
        t.skipped, t.agreement = row["shadow_skipped"], row["overlap"]
        return t

    def section(self, book, core):
        cfg = core.cfg
        return {"gallery": cfg.gallery, "search_k": cfg.search_k,
                "max_search_k": cfg.max_search_k,
                **book.stats.summary(core.gates.confidence),
                "in_flight": len(book.open), "records_written": book.written,
                "records_pending": len(book.pending)}


PREDICT = PredictKind()
SEARCH = SearchKind()
#: Every kind the service serves, by name. The first is the gated one.
KINDS: dict[str, RequestKind] = {k.name: k for k in (PREDICT, SEARCH)}


class Book:
    """One kind's records in the comparator: the index kept for late labels, the
    rows waiting for their shadow, shadow answers that came first, records
    waiting to be written, and the statistics."""

    def __init__(self, kind: RequestKind, cfg: ShadowConfig) -> None:
        self.kind = kind
        self.stats = kind.new_stats(cfg)
        self.index: OrderedDict[str, Record] = OrderedDict()
        self.open: dict[str, Record] = {}
        self.orphans: dict[str, tuple] = {}
        self.pending: list[Record] = []
        self.written = 0
        self.failed_cols: dict[str, list] | None = None  # a batch whose write failed
