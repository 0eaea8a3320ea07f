"""Benchmark: what does shadow mode cost the primary, and how fast is the service?

Measures, in one run on one machine (loopback only):

1. Throughput, closed loop (``--clients`` concurrent clients, each sending the
   next request when the last one answered):
   - a plain FastAPI + uvicorn + torch server, one process, the same model
     (what a user would otherwise write);
   - the shadow application with the shadow off, and at 100%;
   - the alternative layout, primary in its own deployment (``--layouts``).
2. Primary latency, open loop at a steady rate (``--rate``, default 50% of the
   shadow app's closed-loop throughput), shadow off vs. 100%, rounds
   interleaved so machine noise hits both; for a normal shadow, a shadow that
   sleeps 1 s per batch, one that always raises, and (``eager``) the normal
   shadow without the isolation levers (SCHED_IDLE, the 100 ms coalescing window). Latency is measured from
   each request's *scheduled* send time, so queueing is not hidden.

Writes a markdown table and the raw numbers to ``benchmarks/results/``.

    python benchmarks/serve_shadow.py                      # defaults below
    python benchmarks/serve_shadow.py --levers throughput  # Python proxy, throughput-optimized
    (default --levers haproxy: the service's default ingress, HAProxy + throughput-optimized)

Model: the DESIGN's small 1-D CNN (``cnn1d``, MNIST-1D shape (1, 40)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
# Measure this checkout, whatever `pip install -e` points at; subprocesses and
# Ray workers inherit it through PYTHONPATH.
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [REPO, HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
log = logging.getLogger("serve_shadow_bench")

SPEC_KW = {"channels": 32, "depth": 3, "embedding_dim": 64}
INPUT_SHAPE = (1, 40)
TOKEN = "bench-token"


# ------------------------------------------------------------- fault models
def slow_cnn(input_shape, num_classes, *, delay_s: float = 1.0, **kw):
    """cnn1d that sleeps ``delay_s`` per batch: a slow shadow."""
    import torch

    from graceful_ray.models.base import EmbeddingClassifier
    from graceful_ray.models.zoo import cnn1d

    base = cnn1d(input_shape, num_classes, **kw)

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = base.backbone

        def forward(self, x):
            time.sleep(delay_s)
            return self.inner(x)

    model = EmbeddingClassifier(Slow(), base.embedding_dim, num_classes, input_shape)
    model.head = base.head
    return model


def failing_cnn(input_shape, num_classes, **kw):
    """cnn1d that always raises: a broken shadow."""
    import torch

    from graceful_ray.models.base import EmbeddingClassifier
    from graceful_ray.models.zoo import cnn1d

    base = cnn1d(input_shape, num_classes, **kw)

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = base.backbone

        def forward(self, x):
            raise RuntimeError("injected failure")

    model = EmbeddingClassifier(Failing(), base.embedding_dim, num_classes, input_shape)
    model.head = base.head
    return model


# ------------------------------------------------------------ load generator
async def _closed_loop(url: str, clients: int, duration: float, warmup: float,
                       payloads: list[bytes]) -> dict[str, Any]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def worker(i: int, session) -> None:
        nonlocal errors
        k = i
        while time.perf_counter() < t_end:
            body = payloads[k % len(payloads)]
            k += clients
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body,
                                        headers={"content-type": "application/json"}) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                if ok:
                    lat.append(t1 - t0)
                else:
                    errors += 1

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(i, session) for i in range(clients)))
    return _summary(lat, errors, duration)


async def _open_loop(url: str, rate: float, duration: float, warmup: float,
                     payloads: list[bytes], max_inflight: int = 512) -> dict[str, Any]:
    """Requests at fixed intervals; latency from the scheduled time (no coordinated omission)."""
    import aiohttp

    lat: list[float] = []
    errors = dropped = 0
    inflight = 0
    interval = 1.0 / rate
    t_start = time.perf_counter() + 0.05
    n_total = int((warmup + duration) * rate)
    n_warm = int(warmup * rate)

    async def one(k: int, scheduled: float, session) -> None:
        nonlocal errors, inflight
        inflight += 1
        try:
            async with session.post(url, data=payloads[k % len(payloads)],
                                    headers={"content-type": "application/json"}) as r:
                await r.read()
                ok = r.status == 200
        except aiohttp.ClientError:
            ok = False
        finally:
            inflight -= 1
        if k >= n_warm:
            if ok:
                lat.append(time.perf_counter() - scheduled)
            else:
                errors += 1

    conn = aiohttp.TCPConnector(limit=max_inflight)
    tasks = []
    async with aiohttp.ClientSession(connector=conn) as session:
        for k in range(n_total):
            scheduled = t_start + k * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if inflight >= max_inflight:
                dropped += 1
                continue
            tasks.append(asyncio.create_task(one(k, scheduled, session)))
        await asyncio.gather(*tasks)
    out = _summary(lat, errors, duration)
    out["dropped"] = dropped
    return out


def _summary(lat: list[float], errors: int, duration: float) -> dict[str, Any]:
    a = np.asarray(lat) * 1000.0
    return {"n": int(a.size), "errors": int(errors), "throughput": a.size / duration,
            "p50_ms": float(np.percentile(a, 50)) if a.size else None,
            "p99_ms": float(np.percentile(a, 99)) if a.size else None,
            "latencies_ms": a.round(3).tolist()}


def _payloads(n: int = 256, seed: int = 0, rows: int = 1) -> list[bytes]:
    """Request bodies: one input each, or ``rows`` inputs each (a batch request)."""
    rng = np.random.default_rng(seed)
    if rows == 1:
        return [json.dumps({"input": rng.normal(size=40).round(5).tolist()}).encode()
                for _ in range(n)]
    return [json.dumps({"inputs": rng.normal(size=(rows, 40)).round(5).tolist()}).encode()
            for _ in range(max(8, n // rows))]


LOADAVG: list[float] = []  # 1-minute load average after every phase
STEAL: list[float] = []    # share of CPU time the hypervisor took, per phase (a shared VM)
SETTLE: list[dict] = []    # seconds each app's comparator needed to catch up before a phase


def _cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies over all CPUs, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def loadgen(mode: str, url: str, clients: int, rate: float, duration: float,
            warmup: float, rows: int = 1) -> dict[str, Any]:
    """Run one load phase in a separate process (keeps the driver's GIL out of it)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_loadgen", json.dumps(
        {"mode": mode, "url": url, "clients": clients, "rate": rate, "duration": duration,
         "warmup": warmup, "rows": rows})]
    before = _cpu_ticks()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    try:
        LOADAVG.append(os.getloadavg()[0])
    except OSError:
        pass
    after = _cpu_ticks()
    if before and after and after[1] > before[1]:
        STEAL.append((after[0] - before[0]) / (after[1] - before[1]))
    return json.loads(out.stdout)


def _loadgen_main(spec: str) -> None:
    p = json.loads(spec)
    payloads = _payloads(rows=p.get("rows", 1))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if p["mode"] == "closed":
        res = asyncio.run(_closed_loop(p["url"], p["clients"], p["duration"], p["warmup"],
                                       payloads))
    else:
        res = asyncio.run(_open_loop(p["url"], p["rate"], p["duration"], p["warmup"],
                                     payloads))
    sys.stdout.write(json.dumps(res))


# ------------------------------------------------------------ plain server
PLAIN_SERVER = r'''
import sys, torch, uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from graceful_ray.registry import load_model

_, model = load_model(sys.argv[1], sys.argv[2])
classes = _.classes
app = FastAPI()

class Req(BaseModel):
    input: list[float] | None = None
    inputs: list[list[float]] | None = None

@app.post("/v1/predict")
def predict(req: Req):
    rows = [req.input] if req.input is not None else req.inputs
    with torch.inference_mode():
        scores = torch.softmax(model(torch.tensor(rows)), 1)
    return {"predictions": [{"decision": classes[int(s.argmax())], "scores": s.tolist()}
                            for s in scores]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json={"input": [0.0] * 40}, timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


# -------------------------------------------------------------------- main
def _set_fraction(base: str, prefix: str, fraction: float) -> None:
    import httpx

    r = httpx.put(f"{base}{prefix}/v1/admin/shadow-fraction", json={"shadow_fraction": fraction},
                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    r.raise_for_status()


def _settle(base: str, prefix: str, deadline_s: float = 600.0) -> float:
    """Wait until the app's comparator has taken in every request already answered
    (its report's request count stops moving), so one phase's backlog is not
    measured as the next phase's cost; returns the seconds it took."""
    import httpx

    t0, last, still = time.monotonic(), None, 0
    while time.monotonic() - t0 < deadline_s:
        n = httpx.get(f"{base}{prefix}/v1/shadow/report", timeout=60).json()["requests"]
        still = still + 1 if n == last else 0
        if still >= 2:  # unchanged over two 0.5 s polls
            break
        last = n
        time.sleep(0.5)
    waited = time.monotonic() - t0
    SETTLE.append({"app": prefix.strip("/"), "s": round(waited, 1)})
    return waited


def _publish(root: str) -> None:
    import torch

    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.registry import Registry

    reg = Registry(root)
    spec = ModelSpec("cnn1d", INPUT_SHAPE, 10, SPEC_KW)
    torch.manual_seed(0)
    v1 = build_model(spec)
    reg.publish("bench", v1, spec=spec, classes=list(range(10)))
    v2 = build_model(spec)
    v2.load_state_dict({k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in v1.state_dict().items()})
    reg.publish("bench", v2, spec=spec, classes=list(range(10)))
    for fn in ("slow_cnn", "failing_cnn"):
        s = ModelSpec(f"serve_shadow:{fn}", INPUT_SHAPE, 10, SPEC_KW)
        reg.publish("bench", build_model(s), spec=s, classes=list(range(10)))  # v3, v4
    reg.set_alias("bench", "production", 1)


def _apps(root: str, logs: str, primary_in_ingress: bool = True) -> dict[str, Any]:
    from graceful_ray.serve.shadow_config import GateConfig, Resources, ShadowConfig

    common = dict(registry=root, baseline="bench@production", shadow_fraction=0.0,
                  shadow_timeout_s=2.0, router=Resources(num_cpus=0.5),
                  baseline_resources=Resources(num_cpus=0.25),
                  candidate_resources=Resources(num_cpus=0.25),
                  comparator=Resources(num_cpus=0.1, max_ongoing_requests=1000),
                  production_alias=None, gates=GateConfig(min_labelled=1))
    # "eager": the normal shadow without the isolation levers (each copy its own call
    # after 10 ms, the shadow at normal priority): what those levers buy, same run.
    eager = dict(shadow_coalesce_s=0.01, shadow_sched_idle=False)
    out = {}
    for name, cand, extra in (("normal", "bench@v2", {}), ("slow", "bench@v3", {}),
                              ("raising", "bench@v4", {}), ("eager", "bench@v2", eager)):
        out[name] = ShadowConfig(candidate=cand, storage=os.path.join(logs, name),
                                 app_name=name, route_prefix=f"/{name}",
                                 primary_in_ingress=primary_in_ingress,
                                 **common, **extra).with_admin_token(TOKEN)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Deploy everything at once, then interleave short phases in rounds.

    The machine may be shared: interleaving (and rotating the order each round)
    makes slow drifts in background load hit every configuration alike, and the
    per-round ratios show how stable each comparison is.
    """
    if args.levers == "haproxy":  # what `graceful-ray serve` runs by default
        from graceful_ray.serve.ingress import choose_ingress

        print(choose_ingress(), flush=True)  # the Python proxy where no binary is found
    elif args.levers == "throughput":
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    import httpx
    import ray
    from ray import serve

    from graceful_ray.serve.app import deploy

    work = tempfile.mkdtemp(prefix="serve-bench-")
    root = os.path.join(work, "registry")
    _publish(root)
    results: dict[str, Any] = {"levers": args.levers, "clients": args.clients,
                               "duration_s": args.duration, "rounds": args.rounds,
                               "machine": _machine()}

    _start_ray(args.num_cpus)
    plain_port = _free_port()
    plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, root, "bench@v1",
                              str(plain_port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        serve_port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        base = f"http://127.0.0.1:{serve_port}"
        apps = {name: app for name, app in _apps(root, os.path.join(work, "logs")).items()
                if name == "normal" or name in args.shadows.split(",")}
        if "deployment" in args.layouts:
            alt = _apps(root, os.path.join(work, "logs-alt"), primary_in_ingress=False)["normal"]
            apps["alt"] = alt.replace(app_name="alt", route_prefix="/alt")
        t0 = time.time()
        deploy(*apps.values())
        from plain_serve import plain_serve_app  # this folder is on PYTHONPATH (above)

        serve.run(plain_serve_app(root, "bench@v1"), name="plainserve",
                  route_prefix="/plainserve")
        log.info("deployed %s and plainserve in %.0fs", list(apps), time.time() - t0)
        urls = {name: f"{base}/{name}/v1/predict" for name in apps}
        urls["plain"] = f"http://127.0.0.1:{plain_port}/v1/predict"
        urls["plainserve"] = f"{base}/plainserve/v1/predict"
        for url in urls.values():
            _wait_http(url)

        # 1. throughput, closed loop: every configuration once per round, order rotated
        configs = [("plain", "plain", None), ("plain_serve", "plainserve", None),
                   ("app_off", "normal", 0.0), ("app_on", "normal", 1.0)]
        if "alt" in apps:
            configs += [("alt_off", "alt", 0.0), ("alt_on", "alt", 1.0)]
        runs: dict[str, list] = {key: [] for key, _, _ in configs}
        for r in range(args.rounds):
            for key, app, fraction in configs[r % len(configs):] + configs[:r % len(configs)]:
                for busy in {c[1] for c in configs if c[2] is not None}:
                    _settle(base, f"/{busy}")  # every phase starts with no backlog anywhere
                if fraction is not None:
                    _set_fraction(base, f"/{app}", fraction)
                log.info("round %d: %s, closed loop", r, key)
                runs[key].append(loadgen("closed", urls[app], args.clients, 0, args.duration,
                                         args.warmup))
        for key, rs in runs.items():
            if rs:
                results[key] = _pool(rs, args.duration)
        results["throughput_ratios"] = {
            f"{a}/{b}": _round_ratios(runs[a], runs[b], "throughput")
            for a, b in (("app_on", "plain"), ("app_off", "plain"), ("app_on", "app_off"),
                         ("app_on", "plain_serve"), ("app_off", "plain_serve"),
                         ("alt_off", "app_off"), ("alt_on", "app_on")) if runs.get(a)}

        # 1b. batch requests (--batch-rows inputs each), closed loop, same rotation
        if args.batch_rows > 1:
            batch_configs = [c for c in configs if not c[0].startswith("alt")]
            bruns: dict[str, list] = {key: [] for key, _, _ in batch_configs}
            for r in range(args.rounds):
                n = len(batch_configs)
                for key, app, fraction in batch_configs[r % n:] + batch_configs[:r % n]:
                    for busy in {c[1] for c in batch_configs if c[2] is not None}:
                        _settle(base, f"/{busy}")
                    if fraction is not None:
                        _set_fraction(base, f"/{app}", fraction)
                    log.info("round %d: %s, closed loop, %d inputs per request", r, key,
                             args.batch_rows)
                    bruns[key].append(loadgen("closed", urls[app], args.clients, 0,
                                              args.duration, args.warmup, args.batch_rows))
            results["batch_rows"] = args.batch_rows
            results["batch"] = {key: _pool(rs, args.duration) for key, rs in bruns.items()}
            results["batch_ratios"] = {
                f"{a}/{b}": _round_ratios(bruns[a], bruns[b], "throughput")
                for a, b in (("app_on", "plain"), ("app_on", "plain_serve"),
                             ("app_on", "app_off"))}

        # 2. primary latency at a steady open-loop rate, off vs on, alternating
        rate = args.rate or max(10.0, round(0.5 * results["app_on"]["throughput"]))
        results["rate"] = rate
        for name in args.shadows.split(","):
            phases: dict[str, list] = {"off": [], "on": []}
            for r in range(args.latency_rounds):
                order = ((0.0, "off"), (1.0, "on")) if r % 2 == 0 else ((1.0, "on"), (0.0, "off"))
                for fraction, key in order:
                    _settle(base, f"/{name}")
                    _set_fraction(base, f"/{name}", fraction)
                    time.sleep(0.3)
                    log.info("%s shadow, round %d, %s: open loop at %.0f req/s", name, r, key,
                             rate)
                    phases[key].append(loadgen("open", urls[name], 0, rate, args.duration,
                                               args.warmup))
            results[f"latency_{name}"] = {k: _pool(v, args.duration) for k, v in phases.items()}
            results[f"latency_{name}"]["ratios"] = {
                q: _round_ratios(phases["on"], phases["off"], q) for q in ("p50_ms", "p99_ms")}
            _set_fraction(base, f"/{name}", 0.0)
            results[f"report_{name}"] = _slim(httpx.get(f"{base}/{name}/v1/shadow/report",
                                                        timeout=30).json())
    finally:
        plain.terminate()
        plain.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()
    results["loadavg_1min_per_phase"] = LOADAVG
    results["steal_per_phase"] = STEAL
    results["settle_s"] = SETTLE
    return results


def _start_ray(num_cpus: int, attempts: int = 3) -> None:
    """ray.init, retried: on a loaded machine the local node can time out starting."""
    import ray

    for i in range(attempts):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            log.warning("Ray did not start (%s); attempt %d of %d", e, i + 1, attempts)
            ray.shutdown()
            if i == attempts - 1:
                raise


def _pool(runs: list[dict], duration: float) -> dict[str, Any]:
    lat = np.concatenate([np.asarray(r["latencies_ms"]) for r in runs])
    return {"n": int(lat.size), "errors": sum(r["errors"] for r in runs),
            "dropped": sum(r.get("dropped", 0) for r in runs),
            "throughput": lat.size / (duration * len(runs)),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "rounds": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in runs]}


def _round_ratios(a: list[dict], b: list[dict], key: str) -> dict[str, Any]:
    """Per-round ratios a/b of ``key`` (rounds are adjacent in time) and their median."""
    ratios = [x[key] / y[key] for x, y in zip(a, b) if x[key] and y[key]]
    return {"per_round": [round(v, 3) for v in ratios],
            "median": float(np.median(ratios)) if ratios else None}


def _slim(report: dict) -> dict:
    return {"requests": report["requests"], "compared": report["compared"],
            "agreement": report["agreement"]["value"],
            "candidate_errors": report["models"]["candidate"]["shadow_errors"],
            "latency_ms": {r: report["models"][r]["latency_ms"] for r in ("baseline", "candidate")}}


def _machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": load}


SHADOW_LABELS = (("normal", "normal (v2)"), ("slow", "sleeps 1 s per batch"),
                 ("raising", "always raises"),
                 ("eager", "normal, no SCHED_IDLE, 10 ms window"))


def _settle_line(settles: list[dict]) -> str:
    waits = [w["s"] for w in settles]
    worst = max(settles, key=lambda w: w["s"])
    return (f" Before every phase the benchmark waits until each shadow app's comparator has "
            f"taken in every answered request ({len(waits)} waits, {sum(waits):.0f} s in all, "
            f"the longest {worst['s']:.0f} s for `{worst['app']}`): a backlog left by one "
            "phase would otherwise be measured as the next phase's cost.")


def to_markdown(res: dict[str, Any], command: str) -> str:
    loads = res["loadavg_1min_per_phase"] or [float("nan")]
    tr = res["throughput_ratios"]

    def ratio(key: str) -> str:
        r = tr.get(key)
        if not r or r["median"] is None:
            return "-"
        return f"**{r['median']:.2f}x** (rounds: {', '.join(f'{v:.2f}' for v in r['per_round'])})"

    lines = [
        "# Shadow-mode serving benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, {res['machine']['platform']}, Python "
        f"{res['machine']['python']}. The 1-minute load average after each phase (the "
        f"benchmark's own processes included) ranged {min(loads):.1f} to {max(loads):.1f}. Every configuration is measured in short phases interleaved in rounds "
        "(order rotated), and ratios are the median of per-round ratios of adjacent phases. "
        f"Serve levers: `{res['levers']}`. Model: cnn1d (1x40 input, 32 channels, depth 3), "
        "one input per request. Loopback only." + (
            f" CPU time taken by the hypervisor (steal) per phase: up to "
            f"{100 * max(res['steal_per_phase']):.1f}%." if res.get("steal_per_phase") else "")
        + (_settle_line(res["settle_s"]) if res.get("settle_s") else ""),
        "",
    ]
    if "app_on" in res:
        lines += [f"## Throughput, closed loop, {res['clients']} clients, {res['rounds']} "
                  f"rounds x {res['duration_s']:.0f} s", "",
                  "| server | req/s | p50 ms | p99 ms | errors |",
                  "|---|---:|---:|---:|---:|"]
        rows = [("plain FastAPI + uvicorn + torch, one process", "plain"),
                ("plain Ray Serve app, one deployment (same levers)", "plain_serve"),
                ("shadow app, shadow off (primary in router)", "app_off"),
                ("shadow app, shadow 100% (primary in router)", "app_on"),
                ("primary in its own deployment, shadow off", "alt_off"),
                ("primary in its own deployment, shadow 100%", "alt_on")]
        for label, key in rows:
            if key in res:
                r = res[key]
                lines.append(f"| {label} | {r['throughput']:.0f} | {r['p50_ms']:.1f} | "
                             f"{r['p99_ms']:.1f} | {r['errors']} |")
        lines += ["",
                  f"- shadow app at 100% / plain server: {ratio('app_on/plain')}",
                  f"- shadow app, shadow off / plain server: {ratio('app_off/plain')}",
                  f"- shadow 100% / shadow off (same app): {ratio('app_on/app_off')}",
                  f"- shadow app at 100% / plain Serve app: {ratio('app_on/plain_serve')}; "
                  f"shadow off / plain Serve app: {ratio('app_off/plain_serve')}",
                  f"- primary in its own deployment / primary in router, shadow off: "
                  f"{ratio('alt_off/app_off')}; shadow 100%: {ratio('alt_on/app_on')}",
                  ""]
    if "batch" in res:
        k = res["batch_rows"]
        lines += [f"## Batch requests ({k} inputs each), closed loop, {res['clients']} clients",
                  "", "| server | req/s | inputs/s | p50 ms | p99 ms | errors |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, key in rows:
            r = res["batch"].get(key)
            if r:
                lines.append(f"| {label} | {r['throughput']:.0f} | {k * r['throughput']:.0f} | "
                             f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
        br = res["batch_ratios"]
        lines += [""] + [f"- {name}: **{v['median']:.2f}x** (rounds: "
                         f"{', '.join(f'{x:.2f}' for x in v['per_round'])})"
                         for name, v in br.items() if v and v["median"] is not None] + [""]
    lines += [f"## Primary latency, open loop at {res['rate']:.0f} req/s, shadow 100% vs off",
              "", "Client-side latency from each request's scheduled send time; "
              "off/on phases alternate. Ratio = median over rounds of (on / off) of the "
              "adjacent phases; pooled percentiles in the off/on columns, and their ratio "
              "(a p99 from one short phase rests on a handful of requests; pooled over "
              "every round it rests on a few dozen).", "",
              "| shadow | off p50 | on p50 | p50 ratio | off p99 | on p99 | p99 ratio | "
              "pooled p99 ratio | failed requests | shadow errors (report) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in SHADOW_LABELS:
        lat = res.get(f"latency_{name}")
        if not lat:
            continue
        off, on, rt = lat["off"], lat["on"], lat["ratios"]
        rep = res[f"report_{name}"]["candidate_errors"]
        kinds = ", ".join(f"{k} {v}" for k, v in rep["by_kind"].items() if v) or "none"
        lines.append(
            f"| {label} | {off['p50_ms']:.2f} | {on['p50_ms']:.2f} | "
            f"**{rt['p50_ms']['median']:.2f}x** | {off['p99_ms']:.2f} | {on['p99_ms']:.2f} | "
            f"**{rt['p99_ms']['median']:.2f}x** | {on['p99_ms'] / off['p99_ms']:.2f}x | "
            f"{off['errors'] + on['errors']} | "
            f"{rep['count']} ({kinds}) |")
    lines += ["", "Per-round on/off ratios (p50; p99):", ""]
    for name, _ in SHADOW_LABELS:
        lat = res.get(f"latency_{name}")
        if lat:
            lines.append(f"- {name}: {lat['ratios']['p50_ms']['per_round']}; "
                         f"{lat['ratios']['p99_ms']['per_round']}")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--_loadgen":
        _loadgen_main(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (order rotated)")
    p.add_argument("--latency-rounds", type=int, default=4,
                   help="alternating off/on latency rounds per shadow kind")
    p.add_argument("--rate", type=float, default=None, help="open-loop req/s (default: 50%% "
                                                            "of the shadow-on throughput)")
    p.add_argument("--levers", choices=["default", "throughput", "haproxy"],
                   default="haproxy", help="haproxy (the service's default ingress): "
                   "RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    p.add_argument("--layouts", default="ingress,deployment")
    p.add_argument("--num-cpus", type=int, default=8,
                   help="logical CPUs for Ray's scheduler (the apps ask for 4.4 in all)")
    p.add_argument("--shadows", default="normal,slow,raising,eager",
                   help="which shadow kinds the latency part measures (eager: the normal "
                        "shadow without SCHED_IDLE and with a 10 ms coalescing window)")
    p.add_argument("--name", default="serve_shadow", help="results file stem")
    p.add_argument("--batch-rows", type=int, default=64,
                   help="inputs per request of the batch-request phases (1: skip them)")
    args = p.parse_args()
    if args.rounds == 0 and args.rate is None:
        p.error("--rounds 0 skips the throughput part, which --rate then replaces")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args)
    command = "python benchmarks/serve_shadow.py " + " ".join(sys.argv[1:])
    os.makedirs(RESULTS, exist_ok=True)
    md = to_markdown(res, command.strip())
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(md)
    slim = json.loads(json.dumps(res))
    for v in slim.values():
        if isinstance(v, dict):
            v.pop("latencies_ms", None)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(slim, f, indent=2)
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
