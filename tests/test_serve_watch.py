"""The watch after cutover, live on Ray Serve over HTTP.

The candidate is the production model's weights in a module that regresses on
one class once a switch file exists (``tests.test_serve_faults:switching_mlp``).
It answers exactly like production at first, so the label-free bound lets it
cut over with no label; then the switch flips and its flips show. With
``auto_rollback`` the service rolls back by itself; under continuous traffic no
request fails and every served row reaches the report.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry
from graceful_ray.serve.shadow_config import Batching, GateConfig, Resources, ShadowConfig
from tests.serve_harness import serve_apps

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "test-admin-token-watch-81c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KW = {"width": 16, "depth": 1, "embedding_dim": 8}
CLASSES = list(range(10))


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 40)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(ray_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    switch = root / "regress"
    reg = Registry(str(root / "registry"))
    torch.manual_seed(0)
    spec = ModelSpec("mlp", (40,), 10, KW)
    v1 = build_model(spec)
    reg.publish("w", v1, spec=spec, classes=CLASSES)
    with torch.inference_mode():  # the class it regresses on: one production answers often
        cls = int(v1(torch.from_numpy(_inputs(2000, 0))).argmax(1).mode().values)
    sspec = ModelSpec("tests.test_serve_faults:switching_mlp", (40,), 10,
                      {**KW, "switch_file": str(switch), "wrong_class": cls})
    v2 = build_model(sspec)
    v2.load_state_dict(v1.state_dict())
    reg.publish("w", v2, spec=sspec, classes=CLASSES)
    reg.set_alias("w", "production", 1)
    small = Resources(num_cpus=0.1, max_ongoing_requests=64)
    config = ShadowConfig(
        registry=reg.uri, baseline="w@production", candidate="w@v2",
        storage=str(root / "log"), app_name="watch", route_prefix="/", shadow_fraction=1.0,
        shadow_timeout_s=10.0, max_inputs_per_request=16, primary_batching=Batching(16, 0.002),
        shadow_batching=Batching(16, 0.002), router=Resources(num_cpus=0.2),
        baseline_resources=small, candidate_resources=small, comparator=small,
        flush_interval_s=1.0,
        # the README's flags for the label-free cutover and the watch
        gates=GateConfig(min_labelled=200, max_nfr=0.05, min_compared=100,
                         min_latency_samples=5, max_latency_ratio=100.0,
                         auto_rollback=True)).with_admin_token(TOKEN)
    with serve_apps(config) as service:
        yield service.client, switch, v1, cls, reg


def test_auto_rollback_when_the_new_primary_regresses_on_one_class(setup):
    client, switch, v1, cls, reg = setup
    served, statuses, lock, stop = [0], [], threading.Lock(), threading.Event()

    def predict(x: np.ndarray) -> list[str]:
        r = client.post("/v1/predict", json={"inputs": x.tolist(), "segment": "web"})
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 200:
                served[0] += len(x)
        return [p["request_id"] for p in r.json()["predictions"]] if r.status_code == 200 else []

    # 1. identical answers: the label-free bound passes, no label sent
    for i in range(20):
        predict(_inputs(16, 100 + i))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rep = client.get("/v1/shadow/report").json()
        if rep["gates"]["passed"]:
            break
        time.sleep(0.5)
    assert rep["gates"]["passed"], rep["gates"]["failing"]
    assert rep["labelled_pairs"] == 0 and rep["disagreement"]["count"] == 0
    cut = client.post("/v1/admin/cutover", headers=AUTH, json={"reason": "label-free"})
    assert cut.status_code == 200, cut.text
    assert reg.aliases("w")["production"] == 2

    def background():  # callers keep coming through the switch and the rollback
        k = 0
        while not stop.is_set():
            predict(_inputs(4, 10_000 + k))
            k += 1

    t = threading.Thread(target=background, daemon=True)
    t.start()
    try:
        # 2. the candidate, now primary, regresses on one class; labels say production was right
        switch.touch()
        deadline = time.monotonic() + 120
        seed = 500
        while time.monotonic() < deadline:
            x = _inputs(16, seed)
            seed += 1
            with torch.inference_mode():
                y = v1(torch.from_numpy(x)).argmax(1).tolist()
            ids = predict(x)
            if ids:
                r = client.post("/v1/feedback", json={"labels": [
                    {"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
                assert r.status_code == 200, r.text
            rep = client.get("/v1/shadow/report").json()
            if rep["primary"]["role"] == "baseline":
                break
        assert rep["primary"]["role"] == "baseline", rep.get("watch")
    finally:
        stop.set()
        t.join(timeout=60)

    last = rep["history"][-1]
    assert last["action"] == "auto_rollback", rep["history"]
    assert "NFR since the cutover" in last["reason"]
    assert reg.aliases("w")["production"] == 1
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every served row is a record (none lost)
        rep = client.get("/v1/shadow/report").json()
        if rep["requests"] == served[0] and rep["in_flight"] == 0:
            break
        time.sleep(0.5)
    assert rep["requests"] == served[0]
    assert rep["per_segment"]["web"]["compared"] == rep["compared"]
