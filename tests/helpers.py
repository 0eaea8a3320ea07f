"""Helpers the tests share: a free loopback port, a wait for a condition,
feature tables in the data contract, and a small model trained in-process.

Tests import these from here, never from another test module (a test module's
helpers change with its tests) nor from the package's private names.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pyarrow as pa

from graceful_ray.data import fixed_size_list
from graceful_ray.models import ModelSpec, build_model

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_line(proc: subprocess.Popen, lines: list[str], marker: str,
                  timeout_s: float) -> threading.Thread:
    """Collect ``proc``'s stdout into ``lines`` (in a thread, until it exits) and wait
    until a line contains ``marker``; fails with the output's tail if ``proc`` exits
    first or ``timeout_s`` passes. Returns the reader thread (join it for the rest)."""
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while not seen.wait(timeout=1.0):
        assert proc.poll() is None, f"exited {proc.returncode}:\n" + "".join(lines)[-3000:]
        assert time.monotonic() < deadline, f"no {marker!r} line:\n" + "".join(lines)[-3000:]
    return reader


def wait_for(fetch: Callable[[], T], predicate: Callable[[T], bool], timeout_s: float,
             interval_s: float = 0.2) -> T:
    """``fetch()`` until ``predicate`` holds or ``timeout_s`` passed; the last value.

    The caller asserts on what it gets back, so a timeout fails with the value seen
    last, not with a bare "timed out"."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def wait_report(http, predicate: Callable[[dict], bool], timeout_s: float = 120.0,
                path: str = "/v1/shadow/report") -> dict:
    """The shadow service's report once ``predicate`` holds (or the last one after
    ``timeout_s``), read over ``http`` (an ``httpx.Client`` with the base URL set)."""
    def fetch() -> dict:
        r = http.get(path)
        assert r.status_code == 200, r.text
        return r.json()

    return wait_for(fetch, predicate, timeout_s, interval_s=0.5)


def feature_tables(x: np.ndarray, y: np.ndarray,
                   splits: dict[str, np.ndarray]) -> dict[str, pa.Table]:
    """``{split: table}`` of rows ``splits[split]`` of ``x`` and ``y``, with columns
    ``id`` (the row index), ``label`` and ``features``, as ``write_dataset`` takes them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = {}
    for name, idx in splits.items():
        idx = np.asarray(idx)
        out[name] = pa.table({"id": pa.array(idx.astype(np.int64)),
                              "label": pa.array(y[idx].astype(np.int64)),
                              "features": fixed_size_list(x[idx].reshape(len(idx), -1))})
    return out


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 15):
    """``(spec, model)``: a small MLP on 40 features and 10 classes, trained in-process
    (seconds, where Ray Train would spend a minute starting)."""
    import torch  # lazy: most tests that import this module never build a model

    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        spec = ModelSpec("mlp", (40,), 10, {"width": 64, "depth": 2, "embedding_dim": 32})
        model = build_model(spec)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        X, Y = torch.tensor(x), torch.tensor(y)
        for _ in range(epochs):
            perm = torch.randperm(len(X))
            for i in range(0, len(X), 128):
                idx = perm[i:i + 128]
                loss = torch.nn.functional.cross_entropy(model(X[idx]), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return spec, model
