"""The router: the FastAPI ingress every request enters through.

Where the primary runs: inside this replica by default (``primary_in_ingress``),
batched with ``@serve.batch`` and computed on its own thread. That removes one
Serve hop from the critical path, which on small models is most of the cost
(see ``benchmarks/results/serve_shadow.md``). Both versions are loaded here, so a
cutover or rollback is a pointer flip, not a replica restart.

Where the shadow runs: always in the *other* version's own deployment, called
through a handle from a background task that the response never waits for.
The task is bounded (a timeout and an in-flight cap) and catches everything, so
a shadow that is slow, raises, times out or is dead only becomes a counted
shadow error; the caller sees nothing.

Search (``POST /v1/search``, with a ``gallery`` configured): the same path. The
primary embeds the inputs and searches the faiss gallery (in this replica when
the primary runs here), the shadow searches in its own deployment off the
critical path, and the comparator pairs the two top-k lists; see
:mod:`graceful_ray.serve.search` for which models may search.

What is recorded: each answered row becomes a record at the comparator,
identified by the request id returned to the caller. Events are batched here and
sent every few milliseconds; the comparator's answer carries the routing state
(primary, shadow fraction), which is how every router replica learns about a
cutover.
"""

# No `from __future__ import annotations` here: FastAPI must see the real request
# model classes on the route signatures, not strings, inside a Serve ingress.
import asyncio
import json
import logging
import os
import random
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve

from graceful_ray.serve.auth import AdminAuth
from graceful_ray.serve.config import (BASELINE, CANDIDATE, ROLES, Batching, ShadowConfig,
                                       other)
from graceful_ray.serve.dashboard import render_dashboard
from graceful_ray.serve.http import BodyLimit, install, parse_body
from graceful_ray.serve.kinds import PREDICT, SEARCH, PrimaryEvent, RequestKind, ShadowEvent
from graceful_ray.serve.logs import to_serve_logs
from graceful_ray.serve.metrics import RouterMetrics
from graceful_ray.serve.routing import RoutingCopy
from graceful_ray.serve.runner import ModelRunner, Prediction, cut, pick_device, split_rows
from graceful_ray.serve.search import SearchBackend
from graceful_ray.serve.shadow import ShadowCaller, ShadowFailure
from graceful_ray.serve.shards import shard_of, split_event
from graceful_ray.serve.schemas import (CutoverRequest, FeedbackRequest, FractionRequest,
                                        InputError, PredictRequest, SearchRequest, parse_inputs)

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
except ImportError:  # pragma: no cover - orjson ships with Ray Serve's dependencies
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=lambda o: o.tolist()).encode()

log = logging.getLogger(__name__)

EVENT_FLUSH_S = 0.02      # send buffered events this often while traffic flows
STATE_SYNC_S = 0.25       # ...and ask for the routing state at least this often
MAX_BUFFERED_EVENTS = 100_000
MAX_FEEDBACK_ITEMS = 10_000

api = FastAPI(
    title="graceful-ray shadow",
    description="Serve a primary model, shadow a candidate on live traffic, compare their "
                "decisions, count flips when labels arrive, and cut over behind gates.",
)
install(api)  # every route: a size limit, 4xx bodies that never echo the input


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a gate can take")


# Helpers the class uses must be defined above it: ``serve.ingress`` serialises
# the class when it is decorated, capturing only the globals that exist then.
@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class ShadowRouter:
    """HTTP ingress: predict, feedback, report, dashboard, admin."""

    def __init__(self, config: ShadowConfig, refs: dict[str, str], input_shape: list[int],
                 classes: dict[str, list[int]], baseline, candidate, comparator,
                 *shards) -> None:
        to_serve_logs()
        BodyLimit.max_bytes = config.max_request_bytes
        self._cfg = config
        self._refs = dict(refs)
        self._shape = tuple(input_shape)
        self._classes = {r: list(classes[r]) for r in ROLES}
        self._handles = {BASELINE: baseline, CANDIDATE: candidate}
        self._shadow_caller = ShadowCaller(
            self._handles, window_s=config.shadow_coalesce_s,
            max_rows=config.shadow_coalesce_rows, timeout_s=config.shadow_timeout_s,
            breaker_failures=config.shadow_breaker_failures,
            breaker_cooldown_s=config.shadow_breaker_cooldown_s)
        self._comparator = comparator  # shard 0: routing state, report, admin
        self._comparators = [comparator, *shards]  # events go to their id's shard
        self._auth = AdminAuth.from_config(config)
        self._metrics = RouterMetrics(config.app_name)
        self._runners: dict[str, ModelRunner] = {}
        if config.primary_in_ingress:
            device = pick_device(config.router.num_gpus)
            for role in ROLES:
                self._runners[role] = ModelRunner(config.registry, refs[role], device=device,
                                                  torch_threads=config.torch_threads)
        # Searches: with the primary in this replica, both versions search from here too
        # (a cutover switches searches with everything else); otherwise the model
        # deployments search.
        self._search: dict[str, SearchBackend] = {}
        if config.gallery and config.primary_in_ingress:
            for role in ROLES:
                self._search[role] = SearchBackend(config.gallery, config.registry, refs[role],
                                                   config.gallery_poll_s)
        self._routing = RoutingCopy(BASELINE, float(config.shadow_fraction))
        self._events: list[list[PrimaryEvent | ShadowEvent]] = [[] for _ in self._comparators]
        self._tasks: set[asyncio.Task] = set()
        self._inflight_rows = 0
        self._failures: dict[tuple[str, str], int] = {}
        self._starting: asyncio.Task | None = None
        self._started = False
        self._flush_lock: asyncio.Lock | None = None
        self._sync_task: asyncio.Task | None = None
        self._pages: dict[str, str] = {}
        try:
            self._replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests of the class)
            self._replica_id = "local"

    # ----------------------------------------------------------- lifecycle
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's ``user_config``: the primary's batching, changed in place (no restart)."""
        batching = Batching.from_user_config(user_config, "router user_config")
        self._primary_batch.set_max_batch_size(batching.max_batch_size)
        self._primary_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        log.info("primary batching: %s", batching)

    async def _ready(self) -> None:
        """Learn the routing state once before serving (it may be after a cutover)."""
        if self._started:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        try:
            await asyncio.shield(self._starting)
        except Exception as e:
            self._starting = None
            raise HTTPException(503, f"the comparator is not reachable yet: {e}") from None

    async def _start(self) -> None:
        self._flush_lock = asyncio.Lock()
        self._apply(await self._comparator.sync.remote())
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        self._started = True

    def _apply(self, routing: dict[str, Any]) -> None:
        # Answers can arrive out of order; the copy never goes back to an older state.
        if self._routing.apply(routing):
            log.info("routing: primary %s (epoch %d)", self._refs[self._routing.primary],
                     self._routing.epoch)

    async def _sync_loop(self) -> None:
        """Send events every EVENT_FLUSH_S while traffic flows, and learn the
        routing state at least every STATE_SYNC_S; never dies."""
        last = 0.0
        while True:
            await asyncio.sleep(EVENT_FLUSH_S)
            if any(self._events) or time.monotonic() - last >= STATE_SYNC_S:
                try:
                    await self._flush_events()
                except Exception:  # noqa: BLE001 - keep syncing; the cause is logged
                    log.exception("event flush failed")
                last = time.monotonic()

    def _record(self, ev: PrimaryEvent | ShadowEvent) -> None:
        """Buffer an event for the comparator shard(s) that own its request ids."""
        if len(self._events) == 1:
            self._events[0].append(ev)
            return
        for shard, part in split_event(ev, len(self._events)).items():
            self._events[shard].append(part)

    async def _flush_events(self) -> bool:
        """Send buffered events to their comparator shards (shard 0 always: its answer
        is the routing state); a shard's events are kept for a retry when it fails."""
        async with self._flush_lock:
            batches = self._events
            self._events = [[] for _ in batches]
            sent = {s: self._comparators[s].ingest.remote(events)
                    for s, events in enumerate(batches) if events or s == 0}
            ok = True
            for s, response in sent.items():
                try:
                    answer = await response
                except Exception as e:  # noqa: BLE001 - the comparator may be restarting
                    ok = False
                    kept = self._events[s] = batches[s] + self._events[s]
                    if len(kept) > MAX_BUFFERED_EVENTS:
                        dropped = len(kept) - MAX_BUFFERED_EVENTS
                        self._events[s] = kept[dropped:]
                        log.error("comparator shard %d unreachable; dropped %d oldest events",
                                  s, dropped)
                    log.warning("comparator shard %d unreachable (%s); %d events kept for retry",
                                s, type(e).__name__, len(self._events[s]))
                    continue
                if s == 0:
                    self._apply(answer)
            return ok

    async def __del__(self) -> None:
        """Graceful shutdown: let shadow calls finish (bounded), then send the events."""
        caller = getattr(self, "_shadow_caller", None)
        if caller is not None:
            await caller.drain(self._cfg.shadow_timeout_s)
        tasks = getattr(self, "_tasks", None)
        if tasks:
            await asyncio.wait(list(tasks), timeout=self._cfg.shadow_timeout_s + 0.5)
        if getattr(self, "_started", False) and any(self._events):
            try:
                await asyncio.wait_for(self._flush_events(), 5.0)
            except Exception:  # noqa: BLE001
                log.warning("could not send the last %d events at shutdown",
                            sum(map(len, self._events)))
        for runner in getattr(self, "_runners", {}).values():
            runner.close()
        for backend in getattr(self, "_search", {}).values():
            backend.close()

    # ---------------------------------------------------- predict and search
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _primary_batch(self, items: list[tuple[str, np.ndarray]]) -> list[Prediction]:
        out: list[Prediction | None] = [None] * len(items)
        for role in {r for r, _ in items}:
            idx = [i for i, (r, _) in enumerate(items) if r == role]
            x, sizes = split_rows([items[i][1] for i in idx])
            pred = await self._runners[role].predict_async(x)
            for i, p in zip(idx, cut(pred, sizes)):
                out[i] = p
        return out

    @api.post("/v1/predict")
    async def predict(self, body: PredictRequest) -> Response:
        """The primary's decision and scores per input, with a request id for feedback."""
        return await self._serve(PREDICT, body)

    @api.post("/v1/search")
    async def search(self, body: SearchRequest) -> Response:
        """The primary's top-k gallery ids and scores per input, with request ids for feedback."""
        await self._ready()
        if not self._cfg.gallery:
            self._metrics.bad_request("search")
            raise HTTPException(404, "search is not enabled: this service was deployed without a "
                                     "gallery. Redeploy with --gallery PATH (`graceful-ray serve "
                                     "... --gallery PATH`, or `gallery` in the config), a gallery "
                                     "built by `graceful-ray gallery build`")
        return await self._serve(SEARCH, body)

    async def _serve(self, kind: RequestKind, body: Any) -> Response:
        """One request of any kind: the primary answers, the shadow gets a copy off the
        critical path, and both answers become events for the comparator."""
        await self._ready()
        try:
            x, single = parse_inputs(body, self._shape, self._cfg.max_inputs_per_request)
            params = kind.params(body, self._cfg)
        except InputError as e:
            self._metrics.bad_request(kind.name)
            raise HTTPException(e.status, e.message) from None
        n = len(x)
        ids = [uuid.uuid4().hex for _ in range(n)]
        r = self._routing
        primary, epoch, fraction = r.primary, r.epoch, r.shadow_fraction
        ref = self._refs[primary]
        gate: asyncio.Future | None = None
        shadowed = fraction > 0 and (fraction >= 1 or random.random() < fraction)
        if shadowed:
            gate = asyncio.get_running_loop().create_future()
            self._spawn(self._shadow(kind, other(primary), x, params, ids, gate))
        now_ms = int(time.time() * 1000)
        try:
            if self._runners:
                answer, ms = await kind.run_local(self, primary, x, params)
            else:
                answer, ms = await kind.run_remote(self._handles[primary], x, params)
            refused = kind.refused(answer)
            if refused is not None:
                raise kind.refusal(refused, ref, self._cfg)
        except Exception as e:  # noqa: BLE001 - answer and keep serving
            if gate is not None:
                gate.cancel()
            bad = e if isinstance(e, InputError) else kind.primary_error(e, ref, self._cfg)
            if bad is not None:
                self._metrics.bad_request(kind.name)
                raise HTTPException(bad.status, bad.message) from None
            log.exception("primary %s failed on a %s request", ref, kind.name)
            raise HTTPException(503, f"the primary model {ref} failed: "
                                     f"{type(e).__name__}: {e}") from None
        self._record(PrimaryEvent(
            kind.name, ids, now_ms, epoch, primary, kind.event_answer(answer), ms, shadowed,
            x if self._cfg.log_inputs else None, getattr(body, "segment", None)))
        if gate is not None:
            gate.set_result(None)
        self._metrics.answered(ref, kind.metric_prefix + "primary", n, ms)
        out, rows = kind.respond(ids, answer, ref, self._classes[primary])
        if single:
            out.update(rows[0])
        return _json(out)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, kind: RequestKind, role: str, x: np.ndarray, params: tuple,
                      ids: list[str], gate: asyncio.Future) -> None:
        """The shadow copy: bounded in time and in flight, never raises.

        A shadow that may not serve this kind (a model outside the gallery's
        space) answers at once with its reason: the record says "skipped", which
        is not a shadow error."""
        n, ref, prefix = len(x), self._refs[role], kind.metric_prefix
        answer, ms, error = None, None, None
        if self._inflight_rows + n > self._cfg.max_shadow_inflight:
            error = "overloaded"
        else:
            self._inflight_rows += n
            try:
                answer, ms = await self._shadow_caller.call(role, x, kind, params)
            except ShadowFailure as e:
                error = e.kind
                self._log_shadow_failure(ref, prefix + error, e.cause or e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any shadow failure is only counted
                error = "exception"
                self._log_shadow_failure(ref, prefix + error, e)
            finally:
                self._inflight_rows -= n
        skipped = None if answer is None else kind.refused(answer)
        if error is not None:
            self._metrics.shadow_error(ref, prefix + error, n)
        elif skipped is None:
            self._metrics.answered(ref, prefix + "shadow", n, ms)
        try:
            await gate  # the primary's event must be buffered before ours
        except asyncio.CancelledError:
            return  # the primary failed: the request was not served, nothing to record
        ok = error is None and skipped is None
        self._record(ShadowEvent(kind.name, ids, role, answer if ok else None,
                                 ms if ok else None, error, skipped))

    def _log_shadow_failure(self, ref: str, kind: str, exc: BaseException) -> None:
        """Log the first failure of each kind, then one in a thousand: a failing
        shadow at full traffic must not flood the logs."""
        key = (ref, kind)
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        if n == 1 or n % 1000 == 0:
            log.warning("shadow %s failed (%s, %d so far): %s", ref, kind, n,
                        str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)

    # ------------------------------------------------------------- feedback
    @api.post("/v1/feedback")
    async def feedback(self, body: FeedbackRequest) -> Response:
        """True labels for served request ids; answers the flip each label makes."""
        await self._ready()
        if body.labels is not None:
            if body.request_id is not None or body.label is not None:
                raise HTTPException(422, "give either 'request_id' and 'label', or 'labels'")
            if not body.labels or len(body.labels) > MAX_FEEDBACK_ITEMS:
                raise HTTPException(413 if body.labels else 422,
                                    f"'labels' must hold 1 to {MAX_FEEDBACK_ITEMS} items")
            items = [(i.request_id, i.label) for i in body.labels]
        elif body.request_id is not None and body.label is not None:
            items = [(body.request_id, body.label)]
        else:
            self._metrics.bad_request("feedback")
            raise HTTPException(422, "give 'request_id' and 'label' (or 'labels': a list of them)")
        await self._flush_events()
        results = await self._feedback(items)
        if body.labels is None:
            result = results[0]
            if result["status"] != 200:
                self._metrics.bad_request("feedback")
                raise HTTPException(result["status"], result["detail"])
            return _json(result)
        counts: dict[str, int] = {}
        for r in results:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        return _json({"results": results, "status_counts": counts})

    # --------------------------------------------------------------- report
    @api.get("/v1/shadow/report")
    async def report(self) -> Response:
        """Counts, agreement, NFR/PFR with Wilson intervals, latency, errors, gates."""
        await self._ready()
        await self._flush_events()
        return _json(await self._call("report"))

    @api.get("/dashboard", response_class=HTMLResponse)
    async def dashboard(self, request: Request) -> HTMLResponse:
        """The live comparison page; it polls the report under the same prefix."""
        prefix = request.scope.get("root_path", "") or ""
        page = self._pages.get(prefix)
        if page is None:
            page = self._pages[prefix] = render_dashboard(
                self._cfg.app_name, prefix or "/", self._cfg.dashboard_refresh_s)
        return HTMLResponse(page)

    @api.get("/healthz")
    async def healthz(self) -> Response:
        await self._ready()
        return _json({"status": "ok", "replica": self._replica_id, "pid": os.getpid(),
                      "primary": self._refs[self._routing.primary],
                      "shadow": self._refs[other(self._routing.primary)],
                      "shadow_fraction": self._routing.shadow_fraction,
                      "epoch": self._routing.epoch, "revision": self._routing.revision,
                      "primary_in_ingress": bool(self._runners),
                      "primary_batching": {
                          "max_batch_size": self._primary_batch._get_max_batch_size(),
                          "batch_wait_timeout_s": self._primary_batch._get_batch_wait_timeout_s()},
                      "gallery": self._cfg.gallery,
                      "search": {role: b.status() for role, b in self._search.items()}})

    # ---------------------------------------------------------------- admin
    def _authorize(self, request: Request) -> None:
        reason = self._auth.check(request.headers.get("authorization"))
        if reason is not None:
            log.warning("refused admin request to %s from %s: %s", request.url.path,
                        request.client.host if request.client else "?", reason)
            raise HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request, model: type, required: bool = False):
        return parse_body(await request.body(), model, required)

    @api.post("/v1/admin/cutover")
    async def cutover(self, request: Request) -> Response:
        """Promote the candidate if the gates pass (``{"force": true}`` overrides, logged)."""
        self._authorize(request)
        body = await self._body(request, CutoverRequest)
        await self._ready()
        await self._flush_events()
        result = await self._call("cutover", body.force, body.reason)
        self._apply(result)
        return _json(result, result["status"])

    @api.post("/v1/admin/rollback")
    async def rollback(self, request: Request) -> Response:
        """Make the baseline primary again, ungated and instant."""
        self._authorize(request)
        body = await self._body(request, CutoverRequest)
        await self._ready()
        await self._flush_events()
        result = await self._call("rollback", body.reason)
        self._apply(result)
        return _json(result, result["status"])

    @api.put("/v1/admin/shadow-fraction")
    async def set_fraction(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._body(request, FractionRequest, required=True)
        await self._ready()
        result = await self._call("set_fraction", body.shadow_fraction)
        self._apply(result)
        return _json(result, result["status"])

    @api.put("/v1/admin/gates")
    async def set_gates(self, request: Request) -> Response:
        """Change gate thresholds at run time (persisted with the routing state)."""
        self._authorize(request)
        raw = await request.body()
        try:
            changes = json.loads(raw, parse_constant=_no_constant) if raw.strip() else None
        except ValueError as e:
            raise HTTPException(422, f"body is not JSON: {e}") from None
        if not isinstance(changes, dict) or not changes:
            raise HTTPException(422, "give a JSON object of gate fields to change, e.g. "
                                     '{"min_labelled": 500}')
        await self._ready()
        result = await self._call("set_gates", changes)
        return _json(result, result["status"])

    @api.post("/v1/admin/flush")
    async def flush(self, request: Request) -> Response:
        """Write everything recorded so far to Parquet now."""
        self._authorize(request)
        await self._ready()
        await self._flush_events()
        result = await self._call("flush")
        return _json(result, result["status"])

    async def _feedback(self, items: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Labels, each sent to the shard that owns its request id; answers in order."""
        if len(self._comparators) == 1:
            return await self._call("feedback", items)
        where: dict[int, list[int]] = {}
        for i, (rid, _) in enumerate(items):
            where.setdefault(shard_of(rid, len(self._comparators)), []).append(i)
        answers = await asyncio.gather(*(
            self._call("feedback", [items[i] for i in idx], shard=s) for s, idx in where.items()))
        results: list[Any] = [None] * len(items)
        for idx, answer in zip(where.values(), answers):
            for i, r in zip(idx, answer):
                results[i] = r
        return results

    async def _call(self, method: str, *args: Any, shard: int = 0) -> Any:
        try:
            return await getattr(self._comparators[shard], method).remote(*args)
        except Exception as e:  # noqa: BLE001
            log.error("comparator call %s failed: %s", method, e)
            raise HTTPException(503, f"the comparator is unavailable ({type(e).__name__}); "
                                     "retry shortly") from None
