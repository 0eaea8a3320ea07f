"""The one way the tests stand up the shadow service on Ray Serve.

``serve_apps(*configs)`` starts Serve on a free loopback port of the session's
Ray, deploys the applications in one ``graceful_ray.serve.app.deploy`` call (as
``graceful-ray serve`` does), yields a :class:`ShadowService` (HTTP clients and
the counts of what each app has answered), and at the end stops Serve with
:func:`stop_serve`. A module that uses it owns Serve for its duration: the next
module that needs Serve starts its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np

from graceful_ray.serve.shadow_config import ShadowConfig
from tests.helpers import free_port, wait_for

# Generous: deleting a dozen replicas at once on a loaded 2-core machine.
STOP_TIMEOUT_S = 300.0


class ShadowService:
    """HTTP clients for the deployed apps, plus the rows each has answered with 200
    (``served`` for predictions, ``searched`` for searches), for the record checks."""

    def __init__(self, base: str, configs: dict[str, ShadowConfig], timeout_s: float = 30.0) -> None:
        self.base = base
        self.configs = configs
        self.client = httpx.Client(base_url=base, timeout=timeout_s)
        self.served = {name: 0 for name in configs}
        self.searched = {name: 0 for name in configs}
        self.labelled = {name: 0 for name in configs}
        self._lock = threading.Lock()

    def url(self, app: str, path: str) -> str:
        return self.configs[app].route_prefix.rstrip("/") + path

    def predict(self, app: str, inputs: np.ndarray, client: httpx.Client | None = None,
                **extra) -> httpx.Response:
        """One ``/v1/predict`` (one row, or ``inputs`` of several); counts what was served."""
        body = {"input": inputs.tolist()} if inputs.ndim == 1 else {"inputs": inputs.tolist()}
        r = (client or self.client).post(self.url(app, "/v1/predict"), json={**body, **extra})
        if r.status_code == 200:
            with self._lock:
                self.served[app] += 1 if inputs.ndim == 1 else len(inputs)
        return r

    def search(self, app: str, x: np.ndarray, k: int | None = None) -> httpx.Response:
        """One ``/v1/search``; counts what was searched."""
        body: dict = {"input": x.tolist()} if x.ndim == 1 else {"inputs": x.tolist()}
        if k is not None:
            body["k"] = k
        r = self.client.post(self.url(app, "/v1/search"), json=body)
        if r.status_code == 200:
            with self._lock:
                self.searched[app] += 1 if x.ndim == 1 else len(x)
        return r

    def search_all(self, app: str, x: np.ndarray, k: int | None = None,
                   rows_per_request: int = 16) -> list[dict]:
        """Search ``x`` in requests of at most ``rows_per_request`` rows; the results in order."""
        out = []
        for chunk in np.array_split(x, -(-len(x) // rows_per_request)):
            r = self.search(app, chunk, k)
            assert r.status_code == 200, r.text
            out += r.json()["results"]
        return out

    def report(self, app: str) -> dict:
        r = self.client.get(self.url(app, "/v1/shadow/report"))
        assert r.status_code == 200, r.text
        return r.json()

    def wait_report(self, app: str, predicate, timeout_s: float = 20.0) -> dict:
        """The app's report once ``predicate`` holds, or the last one after ``timeout_s``."""
        return wait_for(lambda: self.report(app), predicate, timeout_s)

    def settled(self, app: str, timeout_s: float = 60.0) -> dict:
        """The report once every row answered so far is a complete record at the comparator.

        A copy of an earlier request may still be on its way (its primary event not sent
        yet, or its shadow still answering): a report taken then would count that pair
        later, inside the next check's before/after window."""
        def done(rep: dict) -> bool:
            ret = rep["retrieval"]
            return (rep["requests"] == self.served[app] and rep["in_flight"] == 0
                    and ret["searches"] == self.searched[app] and ret["in_flight"] == 0)

        rep = self.wait_report(app, done, timeout_s)
        assert done(rep), {"requests": (rep["requests"], self.served[app]),
                           "searches": (rep["retrieval"]["searches"], self.searched[app]),
                           "in_flight": (rep["in_flight"], rep["retrieval"]["in_flight"])}
        return rep

    def close(self) -> None:
        self.client.close()


@contextmanager
def serve_apps(*configs: ShadowConfig, timeout_s: float = 30.0) -> Iterator[ShadowService]:
    """Serve on a free loopback port with ``configs`` deployed at once; Serve stopped after."""
    from ray import serve

    from graceful_ray.serve.app import deploy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(*configs)
        service = ShadowService(f"http://127.0.0.1:{port}", {c.app_name: c for c in configs},
                                timeout_s)
        try:
            yield service
        finally:
            service.close()
    finally:
        stop_serve()


def stop_serve(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Delete every application at once, wait until they are gone, then stop Serve.

    One ``serve.delete`` per app waits for that app's replicas to finish their graceful
    shutdown before the next app starts its own; asked together, Serve's controller
    shuts them all down side by side. ``serve.shutdown()`` alone would do that too, but
    gives up waiting after 30 s and returns while the replicas still run: Serve
    restarted then by the next module would meet them. Every replica still runs its
    graceful shutdown (the comparators write what they hold)."""
    from ray import serve

    apps = list(serve.status().applications)
    for name in apps:
        serve.delete(name, _blocking=False)  # Ray's own switch: ask now, wait below for all
    left = wait_for(lambda: list(serve.status().applications), lambda names: not names,
                    timeout_s, interval_s=0.5)
    assert not left, f"Serve applications still there after {timeout_s:.0f} s: {left}"
    serve.shutdown()


def wait_healthy(client: httpx.Client, path: str, predicate, timeout_s: float = 300.0) -> dict:
    """``GET path`` until it answers 200 with a body ``predicate`` accepts; that body."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = client.get(path)
            if r.status_code == 200 and predicate(r.json()):
                return r.json()
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{path} did not get there in {timeout_s:.0f} s"
        time.sleep(0.5)


def router_without_replica():
    """A ``ShadowRouter`` instance whose constructor never ran, for a route's or a
    method's own logic in-process (the caller sets the fields it needs).

    Its class is Serve's ingress wrapper, whose ``async def __del__`` would make a
    coroutine that nothing awaits when the instance is collected ("coroutine
    'ASGIIngressWrapper.__del__' was never awaited"): there is no replica to shut down."""
    from graceful_ray.serve.router import ShadowRouter  # lazy: FastAPI and Serve's replica code

    class Unstarted(ShadowRouter.func_or_class):
        def __del__(self) -> None:
            pass

    return object.__new__(Unstarted)
