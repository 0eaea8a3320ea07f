"""The shadow call path: coalesced, bounded calls to the shadow's deployment.

Every shadow copy costs the router a Serve handle call, and on a small model
that call costs more CPU than the inference itself (measured in
``benchmarks/results/serve_shadow.md``). Copies that arrive within
``window_s`` of each other are therefore sent as *one* call with all their
rows (the replica still batches across routers with ``@serve.batch``), so at
high load the router pays one call per window instead of one per request.
Nothing here is on the caller's critical path: the primary's answer never
waits for it.

A shadow that keeps failing is not hammered: after a run of failed calls a
circuit breaker stops sending copies for a cool-down, then sends one probe
(:class:`CircuitBreaker`). A failed call is not free for the router, whose event
loop also answers the primary's callers: a raised exception comes back as a
``RayTaskError`` to deserialize, a timeout as a cancellation.

Failures are classified for the report: ``timeout`` (no answer in time),
``exception`` (the model raised), ``unavailable`` (the replica is dead or
unreachable), ``overloaded`` (back-pressure, from Serve or our in-flight cap),
``circuit_open`` (not sent: the breaker is open after repeated failures).

A dead replica rarely raises: Serve's router takes a replica whose call fails
with ``ActorDiedError`` out of rotation and routes the call again, to a replica
that may not exist yet, so the call just waits. A call that times out while
the handle's router knows no running replica is therefore ``unavailable``, not
``timeout`` (:func:`timeout_kind`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import numpy as np

from graceful_ray.serve.kinds import PREDICT, RequestKind

# Lazy imports: Ray's exceptions load only to classify a failed call, so the shadow logic imports
# without Ray.

log = logging.getLogger(__name__)


class ShadowFailure(Exception):
    """A shadow call failed; ``kind`` is what the report counts."""

    def __init__(self, kind: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{kind}: {cause}" if cause else kind)
        self.kind = kind
        self.cause = cause


def classify(exc: BaseException) -> str:
    """Shadow error kind of an exception raised by a handle call."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                      ReplicaUnavailableError)

    if isinstance(exc, BackPressureError):
        return "overloaded"
    if isinstance(exc, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)):
        return "unavailable"
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, RayActorError):
        return "unavailable"
    return "exception"


def running_replicas(handle: Any) -> int | None:
    """How many running replicas the handle's router knows of, or None when it cannot tell.

    Serve has no public API for this on a handle (``serve.status()`` is a
    blocking call to the controller, not for a router's event loop); this reads
    the router's own replica set and gives up on any other Serve layout.
    """
    try:
        return len(handle._router._asyncio_router.request_router.curr_replicas)
    except AttributeError:
        return None


def timeout_kind(handle: Any) -> str:
    """The kind of a call to ``handle`` that did not answer in time (see the module docstring)."""
    return "unavailable" if running_replicas(handle) == 0 else "timeout"


class CircuitBreaker:
    """Closed, open, half-open: the classic breaker, counted in calls.

    Closed: every copy is sent. ``failures`` failed calls in a row open it for
    ``cooldown_s``: copies are not sent (each is a ``circuit_open`` shadow error,
    so the report and the error-rate gate still see a failing shadow). When the
    cool-down ends, one copy goes out as a probe while the rest are still held
    back. Its success closes the breaker; its failure opens it again for twice
    as long, up to ``max_cooldown_s``. ``failures=0`` disables the breaker.
    """

    def __init__(self, failures: int, cooldown_s: float, max_cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self._base = cooldown_s
        self._max = max(max_cooldown_s, cooldown_s)
        self._clock = clock
        self._cooldown = cooldown_s
        self._run = 0                      # failed calls in a row
        self._open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        return "half-open" if self._probing else "open"

    @property
    def cooldown_s(self) -> float:
        return self._cooldown

    def allow(self) -> bool:
        """Whether this copy may be sent (it becomes the probe when the cool-down is over)."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def record(self, ok: bool) -> bool:
        """The outcome of one call that was sent; True when this failure opened the breaker."""
        if ok:
            self._run, self._open_until, self._probing = 0, None, False
            self._cooldown = self._base
            return False
        self._run += 1
        if self._probing:  # the probe failed: wait longer before the next one
            self._probing = False
            self._cooldown = min(2 * self._cooldown, self._max)
            self._open_until = self._clock() + self._cooldown
        elif self._open_until is None and self.failures and self._run >= self.failures:
            self._open_until = self._clock() + self._cooldown
            return True
        return False


class ShadowCaller:
    """Sends shadow rows to a model deployment, coalescing requests per window.

    One caller serves every request kind (:mod:`graceful_ray.serve.kinds`): copies
    are coalesced per (role, kind, call parameters), and each role and kind has
    its own circuit breaker, so a shadow whose searches fail keeps its predicts."""

    def __init__(self, handles: dict[str, Any], *, window_s: float, max_rows: int,
                 timeout_s: float, breaker_failures: int = 0,
                 breaker_cooldown_s: float = 1.0) -> None:
        self._handles = handles
        self._window_s = window_s
        self._max_rows = max_rows
        self._timeout_s = timeout_s
        self._breaker = (breaker_failures, breaker_cooldown_s)
        self.breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._pending: dict[tuple, list[tuple[np.ndarray, asyncio.Future]]] = {}
        self._rows: dict[tuple, int] = {}
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._calls: set[asyncio.Task] = set()

    def breaker(self, role: str, kind: RequestKind = PREDICT) -> CircuitBreaker:
        key = (role, kind.name)
        if key not in self.breakers:
            self.breakers[key] = CircuitBreaker(*self._breaker)
        return self.breakers[key]

    async def call(self, role: str, x: np.ndarray, kind: RequestKind = PREDICT,
                   params: tuple = ()) -> tuple[Any, float]:
        """``(answer, model ms)`` for rows ``x`` (predict: the decisions), or
        :class:`ShadowFailure`."""
        if not self.breaker(role, kind).allow():
            raise ShadowFailure("circuit_open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        key = (role, kind, params)
        self._pending.setdefault(key, []).append((x, fut))
        self._rows[key] = self._rows.get(key, 0) + len(x)
        if self._window_s <= 0 or self._rows[key] >= self._max_rows:
            self._fire(key)
        elif key not in self._timers:
            self._timers[key] = loop.call_later(self._window_s, self._fire, key)
        try:
            # _send settles fut (answer, timeout, failure) within window + timeout; this
            # bound is only a backstop, later than _send's, so _send's kind is the one counted.
            return await asyncio.wait_for(asyncio.shield(fut), self._window_s + 2 * self._timeout_s)
        except asyncio.TimeoutError:
            raise ShadowFailure("timeout") from None

    def _fire(self, key: tuple) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(key, [])
        self._rows[key] = 0
        if items:
            task = asyncio.get_running_loop().create_task(self._send(key, items))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _send(self, key: tuple, items: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        role, kind, params = key
        breaker = self.breaker(role, kind)
        x = items[0][0] if len(items) == 1 else np.concatenate([a for a, _ in items])
        response = None
        try:
            response = kind.shadow_call(self._handles[role], x, params)
            answer, ms = kind.shadow_result(
                await asyncio.wait_for(_awaited(response), self._timeout_s), len(x))
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()  # free the replica's queue
            self._call_failed(role, breaker, items, ShadowFailure(timeout_kind(self._handles[role])))
            return
        except asyncio.CancelledError:
            self._fail(items, ShadowFailure("incomplete"))  # shutdown: not the shadow's fault
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a counted kind
            self._call_failed(role, breaker, items, ShadowFailure(classify(e), e))
            return
        breaker.record(True)
        parts = [answer] if len(items) == 1 else kind.split(answer, [len(a) for a, _ in items])
        for (_, fut), part in zip(items, parts):
            if not fut.done():
                fut.set_result((part, ms))

    def _call_failed(self, role: str, breaker: CircuitBreaker, items: list,
                     failure: ShadowFailure) -> None:
        """A call that was sent failed: the breaker learns it, then its copies fail."""
        if breaker.record(False):
            log.warning("the %s shadow failed %d calls in a row (last: %s); its copies are not "
                        "sent for %.1f s, then one probe", role, breaker.failures, failure.kind,
                        breaker.cooldown_s)
        self._fail(items, failure)

    @staticmethod
    def _fail(items: list, failure: ShadowFailure) -> None:
        for _, fut in items:
            if not fut.done():
                fut.set_exception(failure)
                fut.exception()  # mark retrieved: a timed-out caller may never look

    async def drain(self, timeout_s: float) -> None:
        """Send what is queued and wait (bounded) for calls in flight: used at shutdown."""
        for key in list(self._pending):
            self._fire(key)
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=timeout_s)


async def _awaited(response) -> Any:
    """Await a DeploymentResponse inside a coroutine (what ``wait_for`` needs)."""
    return await response
