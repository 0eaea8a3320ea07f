"""`graceful-ray serve` as a user runs it: a separate process that joins the
cluster (the session's Ray, so the test does not pay for a second cluster), HTTP
on loopback, Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry
from tests.helpers import wait_for_line, free_port

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPEC = ModelSpec("mlp", (40,), 10, {"width": 16, "depth": 1, "embedding_dim": 8})


def test_graceful_ray_serve_end_to_end(ray_session, tmp_path):
    import ray
    from ray import serve

    from graceful_ray.serve.comparison_log import read_log

    serve.shutdown()  # the command starts Serve with its own HTTP port

    root, storage = str(tmp_path / "registry"), str(tmp_path / "log")
    reg = Registry(root)
    torch.manual_seed(0)
    for _ in range(2):
        reg.publish("digits", build_model(SPEC), spec=SPEC, classes=list(range(10)))
    reg.set_alias("digits", "production", 1)
    reg.set_alias("digits", "candidate", 2)
    port = free_port()
    env = {**os.environ, "GRACEFUL_RAY_ADMIN_TOKEN": "cli-token", "RAY_SERVE_LOG_TO_STDERR": "0"}
    cmd = [sys.executable, "-m", "graceful_ray.cli", "serve", "--old", "digits@production",
           "--new", "digits@candidate", "--registry", root, "--storage", storage,
           "--shadow-fraction", "0.5", "--port", str(port), "--address", ray.get_runtime_context().gcs_address,
           "--router-cpus", "0.2", "--model-cpus", "0.1", "--gate", "min_labelled=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = None
    try:
        reader = wait_for_line(proc, lines, "shadow service up", timeout_s=300)
        health = httpx.get(base + "/healthz", timeout=10).json()
        assert health["primary"] == "digits@v1" and health["shadow_fraction"] == 0.5
        x = np.random.default_rng(0).normal(size=(5, 40)).round(4).tolist()
        r = httpx.post(base + "/v1/predict", json={"inputs": x}, timeout=30)
        assert r.status_code == 200, r.text
        rid = r.json()["predictions"][0]["request_id"]
        fb = httpx.post(base + "/v1/feedback", json={"request_id": rid, "label": 1}, timeout=30)
        assert fb.status_code == 200, fb.text
        assert httpx.post(base + "/v1/admin/flush", timeout=30).status_code == 401
        ok = httpx.post(base + "/v1/admin/flush", timeout=30,
                        headers={"Authorization": "Bearer cli-token"})
        assert ok.status_code == 200, ok.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if reader is not None:
            reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "shadow" not in serve.status().applications  # Ctrl-C removed the application
    serve.shutdown()
    assert "cli-token" not in out
    table = read_log(storage)
    assert table.num_rows == 5
    assert table.column("label").to_pylist().count(1) == 1
