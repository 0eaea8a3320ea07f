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

Searches (``POST /v1/search``) follow the same life cycle (one code path for every
request kind, see :mod:`graceful_ray.serve.kinds`) in their own records
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
from typing import Any

from ray import serve

from graceful_ray.errors import ConfigError, GracefulRayError, StorageError
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, GateConfig, ShadowConfig, other
from graceful_ray.serve.gates import evaluate, explain, watch
from graceful_ray.serve.lifecycle import on_serve_shutdown
from graceful_ray.serve.kinds import (KINDS, PREDICT, SEARCH, Book, PrimaryEvent, Record,
                                      ShadowEvent)
from graceful_ray.serve.heap import LongLivedHeap
from graceful_ray.serve.logs import to_serve_logs
from graceful_ray.serve.prometheus import ComparatorMetrics
from graceful_ray.serve.comparison_log import LABELS_DIR, RecordLog
from graceful_ray.serve.model_runner import lower_priority
from graceful_ray.serve.shards import shard_of
from graceful_ray.serve.stats import ShadowStats, compose_report, merged

# Lazy imports: the registry (torch) loads only to resolve references; the comparator's actor needs Ray alone.

log = logging.getLogger(__name__)

_HISTORY = 100
_MAX_ORPHANS = 100_000


class ComparatorCore:
    """The comparator's logic without Ray, so it can be unit-tested directly.

    One :class:`~graceful_ray.serve.kinds.Book` per request kind holds its
    records; the code that pairs, counts, labels and writes them is the same for
    every kind (see :mod:`graceful_ray.serve.kinds`)."""

    def __init__(self, config: ShadowConfig, refs: dict[str, str], classes: list[int],
                 shard: int = 0) -> None:
        self.cfg = config
        self.refs = dict(refs)
        self.classes = set(int(c) for c in classes)
        # Shard 0 owns the routing state (see serve.shards); the others only adopt it.
        self.shard = shard
        self.log = RecordLog(config.storage,
                             f"s{shard}" if config.comparator_shards > 1 else "")
        self.books = {name: Book(kind, config) for name, kind in KINDS.items()}
        self.gated = self.books[PREDICT.name]
        # The watch after cutover: only records the candidate answered as primary
        # in the current epoch (reset by every switch; see gates.watch).
        self.watch = self.gated.kind.new_stats(config)
        self.metrics = ComparatorMetrics(config.app_name)
        self.pending_labels: list[tuple[str, int, int]] = []
        self.state = {"baseline": refs[BASELINE], "candidate": refs[CANDIDATE],
                      "primary": BASELINE, "shadow_fraction": float(config.shadow_fraction),
                      "epoch": 0, "revision": 0, "gates": config.gates.to_dict(),
                      "history": []}
        self.gates = config.gates
        # Which start of the comparator this is: a router takes any state from a
        # new incarnation, whose revision may restart lower (a lost state file).
        self.incarnation = uuid.uuid4().hex
        # Events for a request id already recorded (a router re-sends a batch whose
        # ingest raised part-way): ignored, so an id is never counted twice.
        self.duplicates = 0
        self._restore()

    # The gated kind's book, under the names the report and the tests use.
    @property
    def stats(self) -> ShadowStats:
        return self.gated.stats

    @property
    def open(self) -> dict[str, Record]:
        return self.gated.open

    @property
    def orphans(self) -> dict[str, tuple]:
        return self.gated.orphans

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
        labels: dict[str, int] = {}
        label_table = self.log.read_table(LABELS_DIR, ["request_id", "label"])
        if label_table is not None:
            labels = dict(zip(label_table.column("request_id").to_pylist(),
                              label_table.column("label").to_pylist()))
        shards = self.cfg.comparator_shards
        for book in self.books.values():
            table = self.log.read_table(book.kind.log_dir, columns=book.kind.restore_columns)
            if table is None:
                continue
            for row in table.to_pylist():
                if shard_of(row["request_id"], shards) != self.shard:
                    continue  # another shard's record
                t = book.kind.restore(row)
                t.label = labels.get(t.request_id, t.label)
                self._account(book, t)
                self._track(book, t)
                book.written += 1
            log.info("resumed %s log %s: %d records", book.kind.name, self.log.root.uri,
                     book.written)
        if self.shard == 0:
            self.log.write_state(self.state)  # False: this revision is saved already

    # ------------------------------------------------------------- records
    def _track(self, book: Book, t: Record) -> None:
        book.index[t.request_id] = t
        while len(book.index) > self.cfg.max_tracked_records:
            book.index.popitem(last=False)

    def _account(self, book: Book, t: Record) -> None:
        for stats in self._stats_of(book, t):
            book.kind.account(stats, t)

    def _stats_of(self, book: Book, t: Record) -> list:
        """The whole comparison, and the watch's when ``t`` was served since the cutover."""
        if book is self.gated and t.primary == CANDIDATE and t.epoch == self.state["epoch"]:
            return [book.stats, self.watch]
        return [book.stats]

    def _complete(self, book: Book, t: Record) -> None:
        t.done = True
        t.agreement = book.kind.agreement(t)
        self._account(book, t)
        book.kind.metrics(self, t)
        book.pending.append(t)

    def ingest(self, events: list[PrimaryEvent | ShadowEvent]) -> None:
        """Apply a router's batch of events (see ``ShadowRouter._serve``).

        Idempotent per request id: a router keeps a batch whose ``ingest`` call
        raised and sends it again, and the part applied before the error must not
        be counted a second time."""
        for ev in events:
            book = self.books[ev.kind]
            if isinstance(ev, PrimaryEvent):
                self._primary_event(book, ev)
            else:
                self._shadow_event(book, ev)

    def _primary_event(self, book: Book, ev: PrimaryEvent) -> None:
        kind, role = book.kind, ev.role
        primary_ref = self.refs[role]
        shadow_ref = self.refs[other(role)] if ev.shadowed else None
        params = kind.record_params(ev.answer)
        rows = kind.rows(ev.answer, len(ev.ids))
        features = ev.features if self.cfg.log_inputs else None
        for i, rid in enumerate(ev.ids):
            if rid in book.index:
                self._duplicate(rid)
                continue
            t = Record(rid, ev.time_ms, ev.epoch, role, primary_ref, shadow_ref, ev.shadowed,
                       ev.segment, params)
            t.answers[role] = rows[i]
            t.ms[role] = ev.ms
            if features is not None:
                t.features = features[i]
            self._track(book, t)
            if not ev.shadowed:
                self._complete(book, t)
                continue
            orphan = book.orphans.pop(rid, None)
            if orphan is not None:
                self._apply_shadow(book, t, *orphan)
            else:
                book.open[rid] = t

    def _shadow_event(self, book: Book, ev: ShadowEvent) -> None:
        rows = book.kind.rows(ev.answer, len(ev.ids))
        for i, rid in enumerate(ev.ids):
            t = book.open.pop(rid, None)
            if t is None and rid in book.index:  # its record is complete: a re-sent event
                self._duplicate(rid)
                continue
            row = (ev.role, rows[i], ev.ms, ev.error, ev.skipped)
            if t is None:  # the shadow answered before the primary's event arrived
                book.orphans[rid] = row
                if len(book.orphans) > _MAX_ORPHANS:  # primary events lost (a restart)
                    book.orphans.pop(next(iter(book.orphans)))
                continue
            self._apply_shadow(book, t, *row)

    def _duplicate(self, rid: str) -> None:
        self.duplicates += 1
        if self.duplicates == 1 or self.duplicates % 1000 == 0:
            log.warning("ignored a repeated event for request id %s (%d so far)", rid,
                        self.duplicates)

    def _apply_shadow(self, book: Book, t: Record, role: str, answer: Any, ms: float | None,
                      error: str | None, skipped: str | None) -> None:
        if error is None and skipped is None and answer is not None:
            t.answers[role] = answer
            t.ms[role] = ms
        t.error, t.skipped = error, skipped
        self._complete(book, t)

    # ------------------------------------------------------------ feedback
    def _find(self, request_id: str) -> tuple[Book, Record] | None:
        for book in self.books.values():
            t = book.index.get(request_id)
            if t is not None:
                return book, t
        return None

    def settled(self, request_id: str) -> bool:
        """True when a request id's record exists and is complete (feedback may name its result)."""
        found = self._find(request_id)
        return found is not None and found[1].request_id not in found[0].open

    def label(self, request_id: str, label: int) -> dict[str, Any]:
        if label not in self.classes:
            return {"status": 422, "request_id": request_id,
                    "detail": f"label {label} is not one of the models' classes "
                              f"{sorted(self.classes)}"}
        found = self._find(request_id)
        if found is None:
            return {"status": 404, "request_id": request_id,
                    "detail": f"unknown request id {request_id!r}: it was never served here, or "
                              f"is older than the last {self.cfg.max_tracked_records} requests"}
        book, t = found
        kind = book.kind
        if t.label is not None:
            if t.label == label:
                return kind.label_result(t, "duplicate")
            return {"status": 409, "request_id": request_id,
                    "detail": f"request {request_id!r} already has label {t.label}; a label "
                              "cannot be changed"}
        t.label = label
        self.pending_labels.append((request_id, label, int(time.time() * 1000)))
        flip = "pending"
        if t.done:
            for stats in self._stats_of(book, t):
                flip = kind.add_label(stats, t, label)
            flip = "unpaired" if flip is None else flip
            if flip != "unpaired":
                kind.flip_metric(self, flip)
        return kind.label_result(t, flip)

    # -------------------------------------------------------------- report
    def routing(self) -> dict[str, Any]:
        return {"primary": self.state["primary"], "shadow_fraction": self.state["shadow_fraction"],
                "epoch": self.state["epoch"], "revision": self.state["revision"],
                "incarnation": self.incarnation}

    def snapshot(self) -> dict[str, Any]:
        """What this shard counted, for shard 0's report over every shard."""
        return {"stats": {n: b.stats for n, b in self.books.items()}, "watch": self.watch,
                "open": {n: len(b.open) for n, b in self.books.items()},
                "written": {n: b.written for n, b in self.books.items()},
                "pending": {n: len(b.pending) for n, b in self.books.items()},
                "duplicates": self.duplicates}

    def adopt(self, state: dict[str, Any]) -> None:
        """A shard other than 0: take shard 0's routing state (a switch resets the watch)."""
        if state["epoch"] != self.state["epoch"]:
            self.watch = ShadowStats(self.cfg.latency_window)
        self.state = dict(state)
        self.gates = GateConfig.from_dict(state["gates"])

    def report(self, peers: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """The report; with ``peers`` (the other shards' :meth:`snapshot`), over every shard."""
        parts = [self.snapshot(), *peers]
        books = {n: Book(b.kind, self.cfg) for n, b in self.books.items()}
        for n, book in books.items():
            book.stats = merged([p["stats"][n] for p in parts])
            book.written = sum(p["written"][n] for p in parts)
            # the section functions read len(open) and len(pending): stand-ins of that size
            book.open = dict.fromkeys(range(sum(p["open"][n] for p in parts)))
            book.pending = [None] * sum(p["pending"][n] for p in parts)
        g = books[self.gated.kind.name]
        primary = self.state["primary"]
        sections = {"retrieval" if b.kind is SEARCH else b.kind.name: b.kind.section(b, self)
                    for b in books.values() if b.kind is not g.kind}
        report = compose_report(
            g.stats, self.gates, self.refs, primary, app=self.cfg.app_name,
            mode="live", shadow_fraction=self.state["shadow_fraction"],
            epoch=self.state["epoch"], in_flight=len(g.open), records_written=g.written,
            records_pending=len(g.pending),
            duplicate_events=sum(p["duplicates"] for p in parts),
            history=self.state["history"][-20:],
            storage=self.log.root.uri, **sections,
            watch=self.watch_report(merged([p["watch"] for p in parts])),
            comparator_shards=len(parts))
        self.metrics.publish(report)
        return report

    def watch_report(self, watch_stats: ShadowStats | None = None) -> dict[str, Any] | None:
        """The report's ``watch``: the comparison since the cutover and its verdict."""
        watch_stats = self.watch if watch_stats is None else watch_stats
        verdict = self.watch_verdict(watch_stats)
        if verdict is None:
            return None
        w = watch_stats.summary(self.gates.confidence)
        return {**verdict, "since_epoch": self.state["epoch"], "compared": w["compared"],
                "labelled_pairs": w["labelled_pairs"], "nfr": w["nfr"],
                "disagreement": w["disagreement"], "per_class": w["per_class"],
                "per_segment": w["per_segment"]}

    # -------------------------------------------------------------- flush
    def take_pending(self, include_open: bool = False
                     ) -> tuple[dict[str, dict[str, list]], list]:
        """Detach what is to be written: per kind, the columns of its completed
        records (a batch whose write failed first), and the labels.

        ``include_open``: records still waiting for their shadow are completed
        as ``incomplete`` (shutdown)."""
        out: dict[str, dict[str, list]] = {}
        for name, book in self.books.items():
            if include_open:
                for t in list(book.open.values()):
                    t.error = "incomplete"
                    self._complete(book, t)
                book.open.clear()
            batch, book.pending = book.pending, []
            cols = book.kind.columns(batch, self.cfg.log_inputs) if batch else None
            for t in batch:
                book.kind.drop_written(t)
            failed, book.failed_cols = book.failed_cols, None
            if failed is not None:
                cols = failed if cols is None else {k: failed[k] + cols[k] for k in cols}
            if cols is not None:
                out[name] = cols
        labels, self.pending_labels = self.pending_labels, []
        return out, labels

    def write_kind(self, name: str, cols: dict[str, list]) -> int:
        """Write one kind's detached records (runs on a worker thread)."""
        self.books[name].kind.write(self.log, cols, self.cfg, {
            "graceful_ray.baseline": self.refs[BASELINE],
            "graceful_ray.candidate": self.refs[CANDIDATE]})
        return len(cols["request_id"])

    def write_labels(self, labels: list) -> None:
        if labels:
            ids, values, times = zip(*labels)
            self.log.write_labels(list(ids), list(values), list(times))

    def write(self, batches: dict[str, dict[str, list]], labels: list) -> dict[str, int]:
        """Write what :meth:`take_pending` detached; rows written per kind."""
        written = {name: self.write_kind(name, cols) for name, cols in batches.items()}
        for name, n in written.items():
            self.books[name].written += n
        self.write_labels(labels)
        return written

    def restore_pending(self, batches: dict[str, dict[str, list]], labels: list) -> None:
        """Put back what a failed write detached, so the next flush retries it."""
        for name, cols in batches.items():
            self.books[name].failed_cols = cols  # kept as columns: written first next time
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
        if not self.log.write_state(state):
            raise StorageError(
                f"revision {state['revision']} of the routing state in {self.log.root.uri} was "
                "saved by another comparator first: two services share this storage path; give "
                "each its own (--storage)")
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

    def watch_verdict(self, watch_stats: ShadowStats | None = None) -> dict[str, Any] | None:
        """After a cutover with ``auto_rollback``: :func:`gates.watch` on the records
        since; ``None`` when there is nothing to watch."""
        if self.state["primary"] != CANDIDATE:
            return None
        watch_stats = self.watch if watch_stats is None else watch_stats
        verdict = watch(watch_stats.summary(self.gates.confidence), self.gates)
        return {**verdict, "auto_rollback": self.gates.auto_rollback}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=1000)
class Comparator:
    """The Serve deployment around :class:`ComparatorCore` (one replica per shard).

    ``shard`` 0 is the one routers ask for the routing state, the report and every
    admin action; ``peers`` are the handles of the other shards (see
    :mod:`graceful_ray.serve.shards`), whose statistics it adds to its own for the
    report, the gates and the watch, and which it flushes and tells of a switch."""

    def __init__(self, config: ShadowConfig, refs: dict[str, str], classes: list[int],
                 shard: int = 0, *peers) -> None:
        to_serve_logs()
        lower_priority(config.background_nice)  # bookkeeping never competes with callers
        self._core = ComparatorCore(config, refs, classes, shard)
        self._peers = list(peers)
        self._cfg = config
        self._lock: asyncio.Lock | None = None
        self._arrived: asyncio.Condition | None = None
        self._loop_task: asyncio.Task | None = None
        self._heap = LongLivedHeap()
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
                await self.flush_local()
            except Exception:  # noqa: BLE001 - keep flushing; the error is logged
                log.exception("periodic flush failed; will retry")
            if self._core.shard != 0:
                continue  # shard 0 publishes the gauges of every shard
            try:  # the gauges stay current for Prometheus without anyone reading the report
                await self.report()
                if self._peers:  # labels taken by other shards count for the watch too
                    await self._watch()
            except Exception:  # noqa: BLE001 - metrics must never stop the flushing
                log.exception("could not publish the gate metrics")

    async def _from_peers(self, method: str, *args: Any) -> list[Any]:
        return list(await asyncio.gather(*(getattr(p, method).remote(*args)
                                           for p in self._peers)))

    async def flush(self, include_open: bool = False) -> dict[str, Any]:
        """Write completed records (every kind, every shard) and labels to Parquet now."""
        results = [await self.flush_local(include_open)]
        if self._peers:
            try:
                results += await self._from_peers("flush_local", include_open)
            except Exception as e:  # noqa: BLE001 - a shard is down: say so, retry later
                return {"status": 503, "detail": f"a comparator shard could not flush: {e}"}
        failed = [r for r in results if r["status"] != 200]
        if failed:
            return failed[0]
        keys = ("written", "records_written", "searches_written", "search_records_written")
        return {"status": 200, **{k: sum(r[k] for r in results) for k in keys}}

    async def flush_local(self, include_open: bool = False) -> dict[str, Any]:
        """Write this shard's completed records and labels to Parquet now."""
        self._primitives()
        core = self._core
        async with self._lock:
            batches, labels = core.take_pending(include_open)
            written: dict[str, int] = {}
            for name in list(batches):
                try:
                    written[name] = await asyncio.to_thread(core.write_kind, name, batches[name])
                except Exception as e:
                    core.restore_pending({k: v for k, v in batches.items() if k not in written},
                                         labels)
                    log.error("could not write the %s log (%s); records are kept in memory "
                              "and retried", name, e)
                    return {"status": 503, "detail": f"cannot write the {name} log: {e}"}
                core.books[name].written += written[name]
            try:
                await asyncio.to_thread(core.write_labels, labels)
            except Exception as e:
                core.restore_pending({}, labels)
                log.error("could not write the labels (%s); kept in memory and retried", e)
                return {"status": 503, "detail": f"cannot write the labels: {e}"}
            self._heap.settle()  # the records kept for feedback stay out of the GC's walks
            predict, search = core.books[PREDICT.name], core.books[SEARCH.name]
            return {"status": 200, "written": written.get(PREDICT.name, 0),
                    "records_written": predict.written,
                    "searches_written": written.get(SEARCH.name, 0),
                    "search_records_written": search.written}

    # ----------------------------------------------------------------- API
    async def ingest(self, events: list[PrimaryEvent | ShadowEvent]) -> dict[str, Any]:
        self._start()
        self._core.ingest(events)
        async with self._arrived:
            self._arrived.notify_all()
        if sum(len(b.pending) for b in self._core.books.values()) >= self._cfg.flush_records \
                and not self._lock.locked():
            asyncio.get_running_loop().create_task(self.flush_local())
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
        verdict = core.watch_verdict((await self._merged())[1] if self._peers else None)
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
        return self._core.report(await self._from_peers("snapshot") if self._peers else ())

    async def snapshot(self) -> dict[str, Any]:
        """This shard's counts (see ComparatorCore.snapshot), for shard 0."""
        self._start()
        return self._core.snapshot()

    async def adopt(self, state: dict[str, Any]) -> None:
        """Shard 0's routing state after a switch (shards other than 0)."""
        self._core.adopt(state)

    async def _merged(self) -> tuple[ShadowStats, ShadowStats]:
        """The gated statistics and the watch over every shard."""
        parts = [self._core.snapshot()]
        if self._peers:
            parts += await self._from_peers("snapshot")
        name = self._core.gated.kind.name
        return merged([p["stats"][name] for p in parts]), merged([p["watch"] for p in parts])

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
        await asyncio.to_thread(self._core.change_routing, gates=gates.to_dict())
        self._core.gates = gates
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
            gates = evaluate((await self._merged())[0].summary(core.gates.confidence),
                             core.gates)
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
        if self._peers:  # their watch restarts with the new epoch
            try:
                await self._from_peers("adopt", core.state)
            except Exception:  # noqa: BLE001 - they learn it on restart from the saved state
                log.exception("a comparator shard did not take the new routing state")
        log.info("%s: %s is primary now (epoch %d)", action, core.refs[to], core.state["epoch"])
        return {"status": 200, "detail": f"{action} done: {core.refs[to]} is primary",
                "gates": gates, **core.routing()}

    def _set_alias(self, ref: str, alias: str) -> None:
        from graceful_ray.registry import Registry

        if self._registry is None:
            self._registry = Registry(self._cfg.registry)
        name, _, version = ref.partition("@")
        self._registry.set_alias(name, alias, version)

    def __del__(self):
        """Serve's graceful shutdown: write everything still in memory (see
        :mod:`graceful_ray.serve.lifecycle` for why this is not ``async def``)."""
        if getattr(self, "_core", None) is None:
            return None
        return on_serve_shutdown(self, self._shutdown)

    async def _shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        try:
            await self.flush_local(include_open=True)
        except Exception:  # noqa: BLE001
            log.exception("final flush failed")
