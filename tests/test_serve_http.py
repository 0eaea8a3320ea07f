"""Bad requests to the shadow service: a clear 4xx that never echoes the input.

The handlers of graceful_ray.serve.http are installed on a bare FastAPI app with
routes shaped like the service's (an admin route parsing its own body, a
predict route whose body FastAPI parses), so no Ray is needed; the last test
checks the service's own app has them.
"""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from graceful_ray.errors import ConfigError
from graceful_ray.serve.shadow_config import ShadowConfig
from graceful_ray.serve.http import BodyLimit, install, parse_body
from graceful_ray.serve.schemas import CutoverRequest, FractionRequest, PredictRequest


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(BodyLimit, "max_bytes", 64 * 1024)
    api = FastAPI()
    install(api)

    @api.post("/cutover")
    async def cutover(request: Request):
        return parse_body(await request.body(), CutoverRequest).model_dump()

    @api.put("/fraction")
    async def fraction(request: Request):
        return parse_body(await request.body(), FractionRequest, required=True).model_dump()

    @api.post("/predict")
    async def predict(body: PredictRequest):
        return {"n": len(body.inputs or [])}

    return TestClient(api, raise_server_exceptions=False)


@pytest.mark.parametrize("path,method,raw", [
    ("/cutover", "post", b'{"force": tru'),
    ("/cutover", "post", b'{"reason": "x'),
    ("/fraction", "put", b'{"shadow_fraction": NaN}'),
    ("/fraction", "put", b'{"shadow_fraction": Infinity}'),
    ("/fraction", "put", b'{"shadow_fraction": -Infinity}'),
    ("/fraction", "put", b'{"shadow_fraction": "0.5"}'),
    ("/fraction", "put", b'{"shadow_fraction": true}'),
    ("/fraction", "put", b'{"shadow_fraction": 0.5, "x": 1}'),
])
def test_bad_admin_bodies_are_422_without_the_input(client, path, method, raw):
    r = getattr(client, method)(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all(set(d) == {"loc", "msg", "type"} for d in detail)
    assert '"input"' not in r.text and "NaN" not in r.text and "tru" not in r.text.replace("true", "")


def test_good_admin_bodies_still_pass(client):
    assert client.put("/fraction", content=b'{"shadow_fraction": 0.25}').json() == {"shadow_fraction": 0.25}
    assert client.put("/fraction", content=b'{"shadow_fraction": 1}').json() == {"shadow_fraction": 1.0}
    assert client.post("/cutover", content=b"").json()["force"] is False
    assert client.put("/fraction", content=b"").status_code == 422


def test_validation_errors_do_not_echo_a_large_body(client):
    marker = "9876543.21"
    body = {"inputs": [[1.0]], "extra": [[marker] * 50] * 10}  # a refused field, ~60 KB
    raw = json.dumps(body).encode()
    assert len(raw) < BodyLimit.max_bytes
    r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert marker not in r.text and len(r.content) < 20_000


def test_bodies_over_the_limit_are_413(client):
    raw = json.dumps({"inputs": [[0.0] * 1000] * 20}).encode()
    assert len(raw) > BodyLimit.max_bytes
    r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "max_request_bytes" in r.json()["detail"] and "0.0, 0.0" not in r.text

    def chunks():  # no Content-Length: the limit holds on a streamed body too
        for i in range(0, len(raw), 8192):
            yield raw[i:i + 8192]

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/predict", content=b'{"inputs": [[1.0]]}',
                       headers={"content-type": "application/json"}).json() == {"n": 1}


def test_the_limit_is_a_checked_config_field():
    assert ShadowConfig.max_request_bytes == 4 * 1024 * 1024
    with pytest.raises(ConfigError, match="max_request_bytes"):
        ShadowConfig.from_dict({"registry": "r", "baseline": "m@1", "candidate": "m@2",
                                "storage": "s", "max_request_bytes": 0})


def test_the_service_app_has_the_handlers():
    from fastapi.exceptions import RequestValidationError

    from graceful_ray.serve.router import api

    assert RequestValidationError in api.exception_handlers
    assert any(m.cls is BodyLimit for m in api.user_middleware)
