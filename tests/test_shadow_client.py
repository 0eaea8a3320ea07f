"""The shadow service's HTTP client (graceful_ray/serve/client.py) against a stand-in
server on loopback: what it sends, what it returns, when it raises (no Ray, no Serve)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from graceful_ray.serve.client import ServiceError, ShadowClient, call


class _Service(BaseHTTPRequestHandler):
    """Answers like the shadow service's routes; records every request it saw."""

    seen: ClassVar[list[tuple[str, str, str | None, object]]] = []
    recorded = 0

    def _answer(self, status: int, body: object, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        _Service.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        if self.path == "/v1/predict":
            rows = body["inputs"] if "inputs" in body else [body["input"]]
            self._answer(200, {"model": "m@v1", "predictions": [
                {"request_id": f"r{i}", "decision": 0} for i in range(len(rows))]})
        elif self.path == "/v1/feedback":
            bad = any(lbl["label"] < 0 for lbl in body["labels"])
            self._answer(200, {"status_counts": {"200": 1, **({"404": 1} if bad else {})}, "results": []})
        elif self.path == "/v1/shadow/report":
            _Service.recorded += 1  # a record arrives per look, so waiting has to poll
            self._answer(200, {"requests": _Service.recorded, "in_flight": 0})
        elif self.path == "/v1/admin/cutover":
            self._answer(409, {"detail": "gates fail: max_nfr"})
        else:
            self._answer(500, None, raw=b"Internal Server Error")

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def service():
    _Service.seen, _Service.recorded = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_client_sends_json_and_the_token_only_to_admin_routes(service):
    client = ShadowClient(service + "/", token="s3cret")
    assert [p["request_id"] for p in client.predict([[0.5, 0.5], [1.0, 0.0]])["predictions"]] == ["r0", "r1"]
    assert client.predict_one([0.5, 0.5])["model"] == "m@v1"
    status, body = client.cutover(force=False, reason="test")
    assert (status, body) == (409, {"detail": "gates fail: max_nfr"})  # a refusal is an answer, not an error
    (m1, p1, auth1, b1), (_, _, auth2, b2), (m3, p3, auth3, b3) = _Service.seen
    assert (m1, p1, auth1, b1) == ("POST", "/v1/predict", None, {"inputs": [[0.5, 0.5], [1.0, 0.0]]})
    assert (auth2, b2) == (None, {"input": [0.5, 0.5]})
    assert (m3, p3, auth3, b3) == ("POST", "/v1/admin/cutover", "Bearer s3cret", {"force": False, "reason": "test"})


def test_calls_that_must_succeed_raise_with_the_status_and_a_non_json_body_is_kept(service):
    client = ShadowClient(service)
    with pytest.raises(ServiceError, match="refused some labels"):
        client.feedback([{"request_id": "r0", "label": -1}])
    assert client.feedback([{"request_id": "r0", "label": 3}])["status_counts"] == {"200": 1}
    assert call("GET", service + "/nowhere") == (500, {"detail": "Internal Server Error"})
    with pytest.raises(ServiceError, match=r"GET /v1/shadow/report answered 500: .*Internal Server Error"):
        ShadowClient(service + "/elsewhere").report()


def test_waiting_for_records_polls_until_the_service_has_them_all(service):
    client = ShadowClient(service)
    assert client.wait_for_records(3, timeout_s=60)["requests"] >= 3
    with pytest.raises(ServiceError, match="of 1000 requests"):
        client.wait_for_records(1000, timeout_s=0)
