"""Ray's own lines stay off the terminal of a command that starts its own Ray.

`graceful-ray serve` on a local Ray it starts itself, up and then Ctrl-C: the
cheapest command that passes through all three places Ray used to print from
(the token-auth notice at ``ray.init``, the raylet's "N PYTHON worker processes
have been started" once a Serve application's fractional-CPU actors are up, and
``ServeController.graceful_shutdown failed`` at exit). Its own log lines (and
errors) still come through.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry
from graceful_ray.serve.client import ShadowClient
from tests.helpers import free_port, wait_for_line

pytestmark = pytest.mark.slow

SPEC = ModelSpec("mlp", (40,), 10, {"width": 16, "depth": 1, "embedding_dim": 8})

#: What Ray printed on every command (token notice), on any Serve application on
#: 2 cores (worker processes), at the exit of `serve` and the demo (shutdown), and
#: when the old model's outputs were computed (core_worker.cc's ERROR on Ray Data's
#: actor pool, from the driver).
RAY_NOISE = ("Token authentication is enabled", "worker processes have been started",
             "graceful_shutdown failed", "the actor restart will fail")


def test_serve_on_its_own_ray_prints_none_of_rays_noise(tmp_path):
    reg = Registry(str(tmp_path / "root" / "registry"))
    torch.manual_seed(0)
    for _ in range(2):
        reg.publish("digits", build_model(SPEC), spec=SPEC, classes=list(range(10)))
    reg.set_alias("digits", "production", 1)
    reg.set_alias("digits", "candidate", 2)
    port = free_port()
    # its own local Ray, as a user's first `graceful-ray serve` (not the session's)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(GRACEFUL_RAY_ADMIN_TOKEN="noise-token", RAY_SERVE_LOG_TO_STDERR="0",
               RAY_DASHBOARD_AGENT_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "graceful_ray.cli", "--root", str(tmp_path / "root"), "serve",
           "--old", "digits@production", "--new", "digits@candidate", "--port", str(port),
           "--router-cpus", "0.2", "--model-cpus", "0.1", "--python-proxy"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        reader = wait_for_line(proc, lines, "shadow service up", timeout_s=400)
        client = ShadowClient(f"http://127.0.0.1:{port}")
        for _ in range(20):  # traffic through every replica, the time Ray's late warnings had
            assert len(client.predict([[0.5] * 40] * 4)["predictions"]) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    out = "".join(lines)
    assert "shadow service up" in out and "shutting down" in out  # the command's own lines are there
    noise = [ln for ln in lines if any(n in ln for n in RAY_NOISE)]
    assert not noise, "".join(noise)


_MANY_ACTORS = """
import os
import ray
from graceful_ray.raycluster import ensure_ray

assert ensure_ray(quiet=True)  # a local Ray, as the demo starts it


@ray.remote(num_cpus=0.1)
class Replica:
    def pid(self):
        return os.getpid()


for wave, n in enumerate((24, 4)):  # the second wave is the time the first one's warnings had to arrive
    actors = [Replica.remote() for _ in range(n)]
    print(wave, len(set(ray.get([a.pid.remote() for a in actors]))), "actors up", flush=True)
    for a in actors:
        ray.kill(a)
"""


def test_a_local_ray_does_not_warn_about_the_worker_processes_of_fractional_cpu_actors(tmp_path):
    """24 actors at 0.1 CPU (the demo's Serve replicas and Train/Tune actors are of that
    kind) made Ray warn at 8, 14 and 16 worker processes on 2 cores ("4x the maximum
    expected startup concurrency (2)"): a local Ray starts at least 8 at once."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_DASHBOARD_AGENT_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _MANY_ACTORS], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "0 24 actors up" in out and "1 4 actors up" in out, out[-3000:]
    noise = [ln for ln in out.splitlines() if any(n in ln for n in RAY_NOISE)]
    assert not noise, "\n".join(noise)


_OLD_OUTPUTS = """
import sys
from graceful_ray.raycluster import ensure_ray
from graceful_ray.train.old_outputs import compute_old_outputs

ensure_ray(quiet=True)  # as the demo: workers' output to Ray's log files
print("rows", compute_old_outputs(sys.argv[1], "train", registry_root=sys.argv[2], old_ref="m@v1").rows)
"""


def test_the_old_model_pass_leaves_ray_cores_actor_pool_error_off_the_terminal(tmp_path):
    """The pass's Ray Data actor pool made Ray Core log, from the process that created
    it (the driver: the terminal), an ERROR that 'the actor restart will fail'; it runs
    in a Ray task now, whose output goes where every worker's does."""
    from graceful_ray.data import make_mnist1d

    info = make_mnist1d(tmp_path / "ds", samples=300, seed=0)
    spec = ModelSpec("cnn1d", tuple(info.feature_shape), info.num_classes, {"channels": 8})
    torch.manual_seed(0)
    Registry(str(tmp_path / "registry")).publish("m", build_model(spec), spec=spec, classes=range(10))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_DASHBOARD_AGENT_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _OLD_OUTPUTS, str(tmp_path / "ds"), str(tmp_path / "registry")],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and f"rows {info.splits['train'].rows}" in out, out[-3000:]
    noise = [ln for ln in out.splitlines() if any(n in ln for n in RAY_NOISE)]
    assert not noise, "\n".join(noise)
