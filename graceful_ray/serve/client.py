"""A client of the shadow service's HTTP API, on the standard library only.

What the demo sends (traffic, late labels, the report, the cutover) and what a
script or a test driving a running service needs, without an HTTP package:
``urllib`` never through a proxy (the service is usually on loopback), every
answer parsed as JSON, and a non-2xx status returned to the caller (who decides
what it means: a refused cutover is an answer, not a failure) except by the
helpers that must succeed, which raise :class:`ServiceError`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class ServiceError(RuntimeError):
    """The service answered a call that had to succeed with an error status."""


def call(method: str, url: str, body: Any = None, *, token: str | None = None,
         timeout: float = 120.0) -> tuple[int, Any]:
    """``(status, parsed JSON body)`` of one request; a body that is not JSON
    comes back as ``{"detail": its first 500 characters}``."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {"detail": raw.decode(errors="replace")[:500]}


class ShadowClient:
    """The routes of one running shadow service at ``base`` (``http://host:port``);
    ``token`` is the admin token, sent only to the admin routes."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 120.0):
        self.base, self.token, self.timeout = base.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: Any = None, *, admin: bool = False) -> tuple[int, Any]:
        return call(method, self.base + path, body, token=self.token if admin else None, timeout=self.timeout)

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        if status != 200:
            raise ServiceError(f"{method} {path} answered {status}: {str(answer)[:500]}")
        return answer

    def predict(self, inputs: list[Any]) -> dict[str, Any]:
        """``POST /v1/predict`` with a batch of inputs (plain lists: ``array.tolist()``)."""
        return self._ok("POST", "/v1/predict", {"inputs": inputs})

    def predict_one(self, x: list[Any]) -> dict[str, Any]:
        return self._ok("POST", "/v1/predict", {"input": x})

    def feedback(self, labels: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /v1/feedback``: ``[{"request_id", "label"}, ...]``; every label must be accepted."""
        answer = self._ok("POST", "/v1/feedback", {"labels": labels})
        if set(answer.get("status_counts", {})) != {"200"}:
            raise ServiceError(f"POST /v1/feedback refused some labels: {str(answer)[:500]}")
        return answer

    def report(self) -> dict[str, Any]:
        """``GET /v1/shadow/report``: the live comparison and the gates."""
        return self._ok("GET", "/v1/shadow/report")

    def wait_for_records(self, n: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """The report once ``n`` requests have their record (both answers, or the
        shadow's error) and none is in flight."""
        deadline = time.monotonic() + timeout_s
        while True:
            status, report = self.call("GET", "/v1/shadow/report")
            if status == 200 and report["requests"] >= n and report.get("in_flight", 0) == 0:
                return report
            if time.monotonic() > deadline:
                raise ServiceError(f"after {timeout_s:.0f}s the service has recorded "
                                   f"{report.get('requests') if status == 200 else '?'} of {n} requests")
            time.sleep(0.5)

    def cutover(self, *, force: bool = False, reason: str = "") -> tuple[int, Any]:
        """``POST /v1/admin/cutover``; 409 (the gates fail) is an answer, so the status comes back."""
        return self.call("POST", "/v1/admin/cutover", {"force": force, "reason": reason}, admin=True)
