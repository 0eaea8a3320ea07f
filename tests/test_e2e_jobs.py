"""End to end on a real local multi-node cluster: every stage of an upgrade is a Ray job.

``cluster/local.sh start`` brings up a head and a worker node (separate ``ray
start`` processes, token auth on) on ports of their own, so it runs beside the
test session's Ray. Through :class:`~ray.job_submission.JobSubmissionClient`
(the bearer token in its headers) the test submits, in order and waiting for
each: the dataset, v1 (aliased ``production``; trained in the job's process, Ray
Train's local mode), a focal-distillation v2 (two workers, spread over the nodes), a
two-trial Tune search (both trials at once) that publishes ``candidate``, and the shadow deployment
(the job gets only the admin token's sha256, as the README does, and the test
checks the token is in no job's listing). Then it drives the service over HTTP as a user
would: the test split as traffic, a cutover the gates refuse (no labels yet),
the labels, the report's numbers against what was sent, the cutover, and the
registry's ``production`` alias, which must now name the tuned candidate.

Every path lives under one temporary storage root; a local path is shared
storage here because every node runs on this machine. The jobs use no
``working_dir`` (the package is installed editable): entrypoints are absolute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_report

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
PY = sys.executable
NAME = "digits"
# Worker node 1 takes ports WORKER_PORT_BASE + 1001..1999: below the kernel's
# ephemeral range and away from local.sh's default (21001..), so a cluster a
# user started by hand can run at the same time.
WORKER_PORT_BASE = 22000


def readme_tune_job(**replace: str) -> list[str]:
    """The README cluster section's `jobs/tune_tradeoff.py` arguments, as written,
    with the values of the flags in ``replace`` (``{"--epochs": "1"}``) replaced."""
    readme = (REPO / "README.md").read_text()
    joined = re.sub(r"\\\n\s*", "", readme)
    (line,) = [ln for ln in joined.splitlines() if ln.startswith("ray job submit -- python $PWD/jobs/tune_tradeoff.py")]
    argv = shlex.split(line.split(" -- ", 1)[1])[2:]
    assert all(a.startswith("--") for a in argv[::2]), argv  # flag/value pairs only
    return [a if i % 2 == 0 else replace.get(argv[i - 1], a) for i, a in enumerate(argv)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``cluster/local.sh start`` on free ports; ``stop`` afterwards, whatever happened."""
    import ray

    if ray.is_initialized():
        # The session's Ray: frees its CPUs for this cluster on a 2-core machine. The
        # next test that needs it starts it again (see conftest.ray_session).
        ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        PATH=os.path.dirname(PY) + os.pathsep + env.get("PATH", ""),  # `ray` and `python` of this env
        WORKERS="1", CPUS_PER_NODE="2", WORKER_PORT_BASE=str(WORKER_PORT_BASE),
        RAY_GCS_PORT=str(free_port()), RAY_DASHBOARD_PORT=str(free_port()),
        RAY_DASHBOARD_AGENT_PORT=str(free_port()), RAY_CLIENT_PORT=str(free_port()),
        SERVE_PORT=str(free_port()))
    started = subprocess.run(["bash", str(LOCAL_SH), "start"], env=env, capture_output=True, text=True,
                             timeout=300)
    try:
        printed = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
        assert started.returncode == 0 and {"RAY_ADDRESS", "RAY_AUTH_TOKEN", "SERVE_URL"} <= set(printed), (
            f"local.sh start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
        for _ in range(20):  # `ray status` shows the worker once the autoscaler monitor has polled
            status = subprocess.run(["bash", str(LOCAL_SH), "status"], env=env, capture_output=True,
                                    text=True, timeout=120)
            cpus = re.search(r"/\s*([\d.]+)\s+CPU", status.stdout)
            if cpus and float(cpus.group(1)) == 4.0:
                break
            time.sleep(2.0)
        assert cpus and float(cpus.group(1)) == 4.0, (
            f"expected a head and a worker of 2 CPUs each (4 CPUs):\n{status.stdout}\n{status.stderr}")
        yield {"address": printed["RAY_ADDRESS"], "token": printed["RAY_AUTH_TOKEN"],
               "serve_url": printed["SERVE_URL"], "serve_port": int(env["SERVE_PORT"]),
               "root": tmp_path_factory.mktemp("e2e-shared")}
    finally:
        stopped = subprocess.run(["bash", str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        if stopped.returncode != 0:
            print(f"local.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}", file=sys.stderr)
        shutil.rmtree(f"/tmp/gr-cluster-{env['RAY_GCS_PORT']}", ignore_errors=True)


class Jobs:
    """Submit a job, wait for it, fail with its logs."""

    def __init__(self, address: str, token: str) -> None:
        from ray.job_submission import JobSubmissionClient

        # Ray's token auth on the dashboard: the same bearer header `ray job submit` sends.
        self.client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        self.timings: dict[str, float] = {}

    def run(self, name: str, entrypoint: list[str], *, env: dict[str, str] | None = None,
            timeout_s: float = 420.0) -> str:
        from ray.job_submission import JobStatus

        command = " ".join(_quote(a) for a in entrypoint)
        sid = self.client.submit_job(
            entrypoint=command, submission_id=f"e2e-{name}-{uuid.uuid4().hex[:6]}",
            runtime_env={"env_vars": env} if env else None)
        t0 = time.monotonic()
        while True:
            status = self.client.get_job_status(sid)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if time.monotonic() - t0 > timeout_s:
                self.client.stop_job(sid)
                status = f"TIMEOUT after {timeout_s:.0f}s"
                break
            time.sleep(0.5)
        self.timings[name] = time.monotonic() - t0
        logs = self.client.get_job_logs(sid)
        if status != JobStatus.SUCCEEDED:
            info = self.client.get_job_info(sid)
            pytest.fail(f"job {name} ({sid}) ended {status}: {info.message}\n$ {command}\n"
                        f"--- last logs ---\n{logs[-8000:]}", pytrace=False)
        return logs


def _quote(arg: str) -> str:
    return shlex.quote(str(arg))


def test_upgrade_as_ray_jobs_then_shadow_and_cutover(cluster):
    from graceful_ray.data import load_split
    from graceful_ray.registry import Registry

    root = Path(cluster["root"])
    data, registry, runs, tune = (str(root / d) for d in ("data", "registry", "runs", "tune"))
    shadow_log = str(root / "shadow")
    admin_token = secrets.token_urlsafe(24)
    jobs = Jobs(cluster["address"], cluster["token"])
    train = [PY, str(REPO / "jobs" / "train_upgrade.py"), "--data", data, "--registry", registry,
             "--storage", runs, "--name", NAME, "--model", "cnn1d", "--model-arg", "channels=8",
             "--epochs", "1", "--cpus-per-worker", "1", "--max-failures", "0"]

    # ---------------------------------------------------------------- stages
    jobs.run("data", [PY, "-m", "graceful_ray.cli", "data", "make", "mnist1d", "--out", data,
                      "--samples", "2000", "--seed", "0"])
    # v1 trains in the job's own process (Ray Train local mode): Ray Train's worker groups on the two
    # nodes are v2's (--workers 2 --spread) and the Tune trials'.
    jobs.run("train-v1", [*train, "--train-split", "old_train", "--run-name", "e2e-v1", "--alias", "production",
                          "--workers", "0"])
    jobs.run("train-v2", [*train, "--old", f"{NAME}@production", "--method", "fd", "--hp", "fd_kind=lm",
                          "--workers", "2", "--spread", "--run-name", "e2e-v2"])
    # The README's tune job: its resource flags (the defaults) as written, on 2 nodes x 2 CPUs;
    # only the paths, the run's length and the budget (one epoch meets no real one) differ.
    jobs.run("tune", [PY, str(REPO / "jobs" / "tune_tradeoff.py"), *readme_tune_job(**{
        "--data": data, "--registry": registry, "--storage": tune, "--epochs": "1", "--trials": "2",
        "--flip-budget": "1.0", "--run-name": "e2e-tune"})])
    reg = Registry(registry)
    v1 = reg.get(f"{NAME}@production").ref
    candidate = reg.get(f"{NAME}@candidate")
    assert candidate.extra["run_name"].startswith("e2e-tune-"), candidate.extra
    assert [m.ref for m in reg.versions(NAME)] == [f"{NAME}@v1", f"{NAME}@v2", candidate.ref]
    assert (root / "tune" / "e2e-tune" / "pareto.png").exists()
    # both trials ran at once on 2 nodes x 2 CPUs and finished: before reads and decoding
    # asked for a quarter CPU, the two trials held 1.25 CPUs each and the 1-CPU Data
    # tasks pended forever (``Pending Demands: {'CPU': 1.0}``)
    trials = json.loads((root / "tune" / "e2e-tune" / "pareto.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["complete", "complete"], trials

    # Lenient gates, so the cutover depends only on the service's arithmetic: enough
    # labels (min_labelled) is the one gate this test makes fail first.
    port = cluster["serve_port"]
    jobs.run("deploy-shadow", [
        PY, str(REPO / "jobs" / "deploy_shadow.py"), "--old", f"{NAME}@production", "--new", f"{NAME}@candidate",
        "--registry", registry, "--storage", shadow_log, "--host", "127.0.0.1", "--port", str(port),
        "--router-cpus", "0.2", "--model-cpus", "0.1", "--shadow-timeout", "30", "--name", "e2e",
        "--gate", "min_labelled=100", "--gate", "max_nfr=1.0", "--gate", "min_agreement=0.0",
        "--gate", "max_latency_ratio=1000", "--gate", "max_error_rate=1.0", "--gate", "min_latency_samples=10",
        # min_labelled must hold until labels arrive: with max_nfr=1.0 the label-free
        # (disagreement) bound would otherwise waive it after min_compared pairs
        "--gate", "min_compared=100000",
        # the README's way: only the token's hash goes with the job
        "--admin-token-sha256", hashlib.sha256(admin_token.encode()).hexdigest()])
    # `ray job list` shows every entrypoint and runtime_env: the token is in none of them
    listing = repr(jobs.client.list_jobs())
    assert "deploy_shadow.py" in listing and admin_token not in listing
    print("job wall times (s):", {k: round(v) for k, v in jobs.timings.items()})

    # --------------------------------------------------------------- traffic
    x, y, _ = load_split(data, "test")
    x = x.reshape(len(x), -1)
    n = len(x)
    auth = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as http:
        ids, models = [], set()
        for start in range(0, n, 16):
            r = http.post("/v1/predict", json={"inputs": x[start:start + 16].tolist()})
            assert r.status_code == 200, r.text
            ids += [p["request_id"] for p in r.json()["predictions"]]
            models.add(r.json()["model"])
        assert models == {v1} and len(set(ids)) == n

        report = wait_report(http, lambda rep: rep["requests"] >= n and rep["in_flight"] == 0)
        assert report["requests"] == n and report["compared"] == n, report
        assert report["labelled"] == 0 and report["baseline"] == v1 and report["candidate"] == candidate.ref

        # admin routes need the bearer token; without labels the gates refuse the cutover
        assert http.post("/v1/admin/cutover", json={}).status_code == 401
        refused = http.post("/v1/admin/cutover", json={}, headers=auth)
        assert refused.status_code == 409 and "min_labelled" in refused.json()["gates"]["failing"], refused.text
        assert reg.get(f"{NAME}@production").ref == v1

        # the labels arrive later
        r = http.post("/v1/feedback", json={"labels": [
            {"request_id": i, "label": int(label)} for i, label in zip(ids, y)]})
        assert r.status_code == 200 and r.json()["status_counts"] == {"200": n}, r.text
        flips = [res["flip"] for res in r.json()["results"]]

        report = http.get("/v1/shadow/report").json()
        assert report["requests"] == n and report["labelled"] == n and report["labelled_pairs"] == n, report
        assert report["nfr"]["count"] == flips.count("negative") == report["negative_flips"]
        assert report["pfr"]["count"] == flips.count("positive") == report["positive_flips"]
        assert report["nfr"]["total"] == n
        assert report["gates"]["passed"], report["gates"]

        # ------------------------------------------------------------ cutover
        r = http.post("/v1/admin/cutover", json={"reason": "e2e test"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["primary"] == "candidate" and r.json()["gates"]["passed"]
        assert Registry(registry).get(f"{NAME}@production").ref == candidate.ref
        after = http.post("/v1/predict", json={"input": x[0].tolist()})
        assert after.status_code == 200 and after.json()["model"] == candidate.ref
        final = http.get("/v1/shadow/report").json()
        last = final["history"][-1]
        assert (last["action"], last["from"], last["to"], last["forced"]) == ("cutover", v1, candidate.ref, False)
        assert final["primary"]["ref"] == candidate.ref and final["labelled"] == n

