"""The shadow call path: coalesced, bounded calls to the shadow's deployment.

Every shadow copy costs the router a Serve handle call, and on a small model
that call costs more CPU than the inference itself (measured in
``benchmarks/results/serve_shadow.md``). Copies that arrive within
``window_s`` of each other are therefore sent as *one* call with all their
rows (the replica still batches across routers with ``@serve.batch``), so at
high load the router pays one call per window instead of one per request.
Nothing here is on the caller's critical path: the primary's answer never
waits for it.

Failures are classified for the report: ``timeout`` (no answer in time),
``exception`` (the model raised), ``unavailable`` (the replica is dead or
unreachable), ``overloaded`` (back-pressure, from Serve or our in-flight cap).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

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


class ShadowCaller:
    """Sends shadow rows to a model deployment, coalescing requests per window."""

    def __init__(self, handles: dict[str, Any], *, window_s: float, max_rows: int,
                 timeout_s: float) -> None:
        self._handles = handles
        self._window_s = window_s
        self._max_rows = max_rows
        self._timeout_s = timeout_s
        self._pending: dict[str, list[tuple[np.ndarray, asyncio.Future]]] = {}
        self._rows: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._calls: set[asyncio.Task] = set()

    async def call(self, role: str, x: np.ndarray) -> tuple[np.ndarray, float]:
        """``(decisions, model ms)`` for rows ``x``, or :class:`ShadowFailure`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.setdefault(role, []).append((x, fut))
        self._rows[role] = self._rows.get(role, 0) + len(x)
        if self._window_s <= 0 or self._rows[role] >= self._max_rows:
            self._fire(role)
        elif role not in self._timers:
            self._timers[role] = loop.call_later(self._window_s, self._fire, role)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self._timeout_s)
        except asyncio.TimeoutError:
            raise ShadowFailure("timeout") from None

    def _fire(self, role: str) -> None:
        timer = self._timers.pop(role, None)
        if timer is not None:
            timer.cancel()
        items = self._pending.pop(role, [])
        self._rows[role] = 0
        if items:
            task = asyncio.get_running_loop().create_task(self._send(role, items))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _send(self, role: str, items: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        x = items[0][0] if len(items) == 1 else np.concatenate([a for a, _ in items])
        response = None
        try:
            response = self._handles[role].predict.remote(x, False)
            decisions, _, ms = await asyncio.wait_for(_awaited(response), self._timeout_s)
            if len(decisions) != len(x):
                raise ValueError(f"the shadow returned {len(decisions)} decisions for "
                                 f"{len(x)} rows")
        except asyncio.TimeoutError:
            if response is not None:
                response.cancel()  # free the replica's queue
            self._fail(items, ShadowFailure("timeout"))
            return
        except asyncio.CancelledError:
            self._fail(items, ShadowFailure("incomplete"))
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a counted kind
            self._fail(items, ShadowFailure(classify(e), e))
            return
        start = 0
        for a, fut in items:
            if not fut.done():
                fut.set_result((decisions[start:start + len(a)], ms))
            start += len(a)

    @staticmethod
    def _fail(items: list, failure: ShadowFailure) -> None:
        for _, fut in items:
            if not fut.done():
                fut.set_exception(failure)
                fut.exception()  # mark retrieved: a timed-out caller may never look

    async def drain(self, timeout_s: float) -> None:
        """Send what is queued and wait (bounded) for calls in flight: used at shutdown."""
        for role in list(self._pending):
            self._fire(role)
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=timeout_s)


async def _awaited(response) -> Any:
    """Await a DeploymentResponse inside a coroutine (what ``wait_for`` needs)."""
    return await response
