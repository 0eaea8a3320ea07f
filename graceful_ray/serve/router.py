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
from graceful_ray.serve.config import BASELINE, CANDIDATE, ROLES, ShadowConfig, other
from graceful_ray.serve.dashboard import render_dashboard
from graceful_ray.serve.http import BodyLimit, install, parse_body
from graceful_ray.serve.logs import to_serve_logs
from graceful_ray.serve.metrics import RouterMetrics
from graceful_ray.serve.routing import RoutingCopy
from graceful_ray.serve.runner import ModelRunner, Prediction, cut, pick_device, split_rows
from graceful_ray.serve.search import SearchAnswer, SearchBackend
from graceful_ray.serve.shadow import ShadowCaller, ShadowFailure, _awaited, classify
from graceful_ray.serve.schemas import (CutoverRequest, FeedbackRequest, FractionRequest,
                                        InputError, PredictRequest, SearchRequest, check_k,
                                        parse_inputs)

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
                 classes: dict[str, list[int]], baseline, candidate, comparator) -> None:
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
        self._comparator = comparator
        self._auth = AdminAuth.from_config(config)
        self._metrics = RouterMetrics(config.app_name)
        self._runners: dict[str, ModelRunner] = {}
        if config.primary_in_ingress:
            device = pick_device(config.router.num_gpus)
            for role in ROLES:
                self._runners[role] = ModelRunner(config.registry, refs[role], device=device,
                                                  torch_threads=config.torch_threads)
            self._primary_batch.set_max_batch_size(config.primary_batching.max_batch_size)
            self._primary_batch.set_batch_wait_timeout_s(
                config.primary_batching.batch_wait_timeout_s)
        # Searches: with the primary in this replica, both versions search from here too
        # (a cutover switches searches with everything else); otherwise the model
        # deployments search.
        self._search: dict[str, SearchBackend] = {}
        if config.gallery and config.primary_in_ingress:
            for role in ROLES:
                self._search[role] = SearchBackend(config.gallery, config.registry, refs[role],
                                                   config.gallery_poll_s)
        self._routing = RoutingCopy(BASELINE, float(config.shadow_fraction))
        self._events: list[tuple] = []
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
            if self._events or time.monotonic() - last >= STATE_SYNC_S:
                try:
                    await self._flush_events()
                except Exception:  # noqa: BLE001 - keep syncing; the cause is logged
                    log.exception("event flush failed")
                last = time.monotonic()

    async def _flush_events(self) -> bool:
        """Send buffered events to the comparator; keeps them for a retry on failure."""
        async with self._flush_lock:
            events, self._events = self._events, []
            try:
                routing = await self._comparator.ingest.remote(events)
            except Exception as e:  # noqa: BLE001 - the comparator may be restarting
                self._events = events + self._events
                if len(self._events) > MAX_BUFFERED_EVENTS:
                    dropped = len(self._events) - MAX_BUFFERED_EVENTS
                    self._events = self._events[dropped:]
                    log.error("comparator unreachable; dropped %d oldest events", dropped)
                log.warning("comparator unreachable (%s); %d events kept for retry",
                            type(e).__name__, len(self._events))
                return False
            self._apply(routing)
            return True

    async def __del__(self) -> None:
        """Graceful shutdown: let shadow calls finish (bounded), then send the events."""
        caller = getattr(self, "_shadow_caller", None)
        if caller is not None:
            await caller.drain(self._cfg.shadow_timeout_s)
        tasks = getattr(self, "_tasks", None)
        if tasks:
            await asyncio.wait(list(tasks), timeout=self._cfg.shadow_timeout_s + 0.5)
        if getattr(self, "_started", False) and self._events:
            try:
                await asyncio.wait_for(self._flush_events(), 5.0)
            except Exception:  # noqa: BLE001
                log.warning("could not send the last %d events at shutdown", len(self._events))
        for runner in getattr(self, "_runners", {}).values():
            runner.close()
        for backend in getattr(self, "_search", {}).values():
            backend.close()

    # -------------------------------------------------------------- predict
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

    async def _run_primary(self, role: str, x: np.ndarray) -> tuple[Prediction, float]:
        if self._runners:
            t0 = time.perf_counter()
            pred = await self._primary_batch((role, x))
            return pred, (time.perf_counter() - t0) * 1000.0
        decisions, scores, ms = await self._handles[role].predict.remote(x, True)
        return Prediction(decisions, scores), ms

    @api.post("/v1/predict")
    async def predict(self, body: PredictRequest) -> Response:
        """The primary's decision and scores per input, with a request id for feedback."""
        await self._ready()
        try:
            x, single = parse_inputs(body, self._shape, self._cfg.max_inputs_per_request)
        except InputError as e:
            self._metrics.bad_request("predict")
            raise HTTPException(e.status, e.message) from None
        n = len(x)
        ids = [uuid.uuid4().hex for _ in range(n)]
        r = self._routing
        primary, epoch, fraction = r.primary, r.epoch, r.shadow_fraction
        gate: asyncio.Future | None = None
        shadowed = fraction > 0 and (fraction >= 1 or random.random() < fraction)
        if shadowed:
            gate = asyncio.get_running_loop().create_future()
            self._spawn(self._shadow(other(primary), x, ids, gate))
        now_ms = int(time.time() * 1000)
        try:
            pred, ms = await self._run_primary(primary, x)
        except Exception as e:  # noqa: BLE001 - answer 503 and keep serving
            if gate is not None:
                gate.cancel()
            log.exception("primary %s failed", self._refs[primary])
            raise HTTPException(503, f"the primary model {self._refs[primary]} failed: "
                                     f"{type(e).__name__}: {e}") from None
        self._events.append(("p", ids, now_ms, epoch, primary, pred.decisions, ms, shadowed,
                             x if self._cfg.log_inputs else None, body.segment))
        if gate is not None:
            gate.set_result(None)
        ref = self._refs[primary]
        self._metrics.answered(ref, "primary", n, ms)
        decisions = pred.decisions.tolist()
        preds = [{"request_id": ids[i], "decision": decisions[i], "scores": pred.scores[i]}
                 for i in range(n)]
        out: dict[str, Any] = {"model": ref, "classes": self._classes[primary],
                               "predictions": preds}
        if single:
            out.update(preds[0])
        return _json(out)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, role: str, x: np.ndarray, ids: list[str],
                      gate: asyncio.Future) -> None:
        """The shadow copy: bounded in time and in flight, never raises."""
        n, ref = len(x), self._refs[role]
        decisions, ms, error = None, None, None
        if self._inflight_rows + n > self._cfg.max_shadow_inflight:
            error = "overloaded"
        else:
            self._inflight_rows += n
            try:
                decisions, ms = await self._shadow_caller.call(role, x)
            except ShadowFailure as e:
                error = e.kind
                self._log_shadow_failure(ref, error, e.cause or e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any shadow failure is only counted
                error = "exception"
                self._log_shadow_failure(ref, error, e)
            finally:
                self._inflight_rows -= n
        if error is None:
            self._metrics.answered(ref, "shadow", n, ms)
        else:
            self._metrics.shadow_error(ref, error, n)
        try:
            await gate  # the primary's event must be buffered before ours
        except asyncio.CancelledError:
            return  # the primary failed: the request was not served, nothing to record
        self._events.append(("s", ids, role, None if error else decisions, ms, error))

    def _log_shadow_failure(self, ref: str, kind: str, exc: BaseException) -> None:
        """Log the first failure of each kind, then one in a thousand: a failing
        shadow at full traffic must not flood the logs."""
        key = (ref, kind)
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        if n == 1 or n % 1000 == 0:
            log.warning("shadow %s failed (%s, %d so far): %s", ref, kind, n,
                        str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)

    # --------------------------------------------------------------- search
    async def _run_primary_search(self, role: str, x: np.ndarray, k: int) -> SearchAnswer:
        if self._runners:
            t0 = time.perf_counter()
            runner = self._runners[role]
            answer = await runner.run_async(self._search[role].search, runner.embed, x, k)
            return answer.with_ms((time.perf_counter() - t0) * 1000.0)
        return await self._handles[role].search.remote(x, k)

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
        try:
            x, single = parse_inputs(body, self._shape, self._cfg.max_inputs_per_request)
            k = check_k(body.k, self._cfg.search_k, self._cfg.max_search_k)
        except InputError as e:
            self._metrics.bad_request("search")
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
            self._spawn(self._shadow_search(other(primary), x, k, ids, gate))
        now_ms = int(time.time() * 1000)
        try:
            answer = await self._run_primary_search(primary, x, k)
        except Exception as e:  # noqa: BLE001 - answer and keep serving
            if gate is not None:
                gate.cancel()
            from graceful_ray.retrieval.errors import QueryError

            if isinstance(e, QueryError):
                self._metrics.bad_request("search")
                raise HTTPException(422, f"the primary {ref} produced no usable query embedding "
                                         f"for this input: {e}") from None
            log.exception("primary search with %s failed", ref)
            raise HTTPException(503, f"the primary model {ref} failed to search: "
                                     f"{type(e).__name__}: {e}") from None
        if answer.refused is not None:
            if gate is not None:
                gate.cancel()
            raise HTTPException(409, f"the primary {ref} may not search the gallery "
                                     f"{self._cfg.gallery}: {answer.refused}. Roll back "
                                     "(POST /v1/admin/rollback) or move the gallery into its "
                                     "embedding space (`graceful-ray gallery backfill`)")
        self._events.append(("q", ids, now_ms, epoch, primary, answer.k, answer.ids,
                             answer.scores, answer.labels, answer.snapshot, answer.ms, shadowed,
                             x if self._cfg.log_inputs else None))
        if gate is not None:
            gate.set_result(None)
        self._metrics.answered(ref, "search-primary", n, answer.ms)
        results = [{"request_id": ids[i], "ids": answer.ids[i].tolist(),
                    "scores": answer.scores[i]} for i in range(n)]
        out: dict[str, Any] = {"model": ref, "k": answer.k, "snapshot": answer.snapshot,
                               "results": results}
        if single:
            out.update(results[0])
        return _json(out)

    async def _shadow_search(self, role: str, x: np.ndarray, k: int, ids: list[str],
                             gate: asyncio.Future) -> None:
        """The shadow's search of the same rows: bounded in time and in flight, never raises.

        A shadow the registry keeps out of the gallery's space answers at once with
        its reason: the record says "skipped", which is not a shadow error."""
        n, ref = len(x), self._refs[role]
        answer, error = None, None
        if self._inflight_rows + n > self._cfg.max_shadow_inflight:
            error = "overloaded"
        else:
            self._inflight_rows += n
            response = None
            try:
                response = self._handles[role].search.remote(x, k)
                answer = await asyncio.wait_for(_awaited(response), self._cfg.shadow_timeout_s)
            except asyncio.TimeoutError:
                if response is not None:
                    response.cancel()
                error = "timeout"
                self._log_shadow_failure(ref, "search-timeout", ShadowFailure("timeout"))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any shadow failure is only counted
                error = classify(e)
                self._log_shadow_failure(ref, f"search-{error}", e)
            finally:
                self._inflight_rows -= n
        skipped = answer.refused if answer is not None else None
        if error is not None:
            self._metrics.shadow_error(ref, f"search-{error}", n)
        elif skipped is None:
            self._metrics.answered(ref, "search-shadow", n, answer.ms)
        try:
            await gate  # the primary's event must be buffered before ours
        except asyncio.CancelledError:
            return  # the primary did not answer: nothing to record
        ok = answer is not None and skipped is None
        self._events.append(("r", ids, role, answer.ids if ok else None,
                             answer.scores if ok else None, answer.labels if ok else None,
                             answer.ms if ok else None, error, skipped))

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
        results = await self._call("feedback", items)
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

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._comparator, method).remote(*args)
        except Exception as e:  # noqa: BLE001
            log.error("comparator call %s failed: %s", method, e)
            raise HTTPException(503, f"the comparator is unavailable ({type(e).__name__}); "
                                     "retry shortly") from None
