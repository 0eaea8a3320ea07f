"""Multi-node training: two Ray nodes on this machine (ray.cluster_utils.Cluster).

The workers must really land on different nodes (STRICT_SPREAD) and, being one
DDP group, finish with identical weights and identical all-reduced metrics.
"""

from __future__ import annotations

import pytest

from graceful_ray.registry import Registry
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.trainer import run_upgrade


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's single-node Ray; later tests get it back
    for attempt in range(3):  # Ray waits a fixed 30 s per raylet; a loaded machine can miss it
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False)
            cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            break
        except Exception as e:
            cluster.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_workers_on_two_nodes_agree(two_node_cluster, mnist1d_small, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = UpgradeConfig(data=mnist1d_small, registry=str(tmp_path / "registry"), storage=str(tmp_path / "runs"),
                        model="cnn1d", model_kwargs={"channels": 8}, epochs=2, workers=2, cpus_per_worker=1.0,
                        placement_strategy="STRICT_SPREAD", run_name="two-nodes", train_split="old_train")
    result = run_upgrade(cfg)
    assert len(set(result.node_ids)) == 2, f"workers shared a node: {result.node_ids}"
    assert len(set(result.workers["params_sha"])) == 1, "DDP replicas diverged"
    finals = result.workers["finals"]
    for key in ("val_accuracy", "val_rows", "loss"):
        assert finals[0][key] == pytest.approx(finals[1][key]), key
    # validation covered every row once, split across the two nodes
    from graceful_ray.data import read_info

    assert finals[0]["val_rows"] == read_info(mnist1d_small).splits["val"].rows
    assert result.published is not None


# generous: on 2 loaded cores the two 1-epoch trials finish in about a minute
HANG_S = 420


def readme_tune_job(**replace: str) -> list[str]:
    """The README cluster section's `jobs/tune_tradeoff.py` arguments, as written,
    with the values of the flags in ``replace`` (``{"--epochs": "1"}``) replaced."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    joined = re.sub(r"\\\n\s*", "", readme)
    (line,) = [ln for ln in joined.splitlines() if ln.startswith("ray job submit -- python $PWD/jobs/tune_tradeoff.py")]
    argv = shlex.split(line.split(" -- ", 1)[1])[2:]
    assert all(a.startswith("--") for a in argv[::2]), argv  # flag/value pairs only
    return [a if i % 2 == 0 else replace.get(argv[i - 1], a) for i, a in enumerate(argv)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_tune_job_finishes_on_the_local_cluster_layout(two_node_cluster, mnist1d_small, tmp_path):
    """``cluster/local.sh``'s layout (2 nodes x 2 CPUs) and the README's tune flags: the
    default trial resources must leave every Ray Data task (read, decode) a node to run on.
    Before reads and decoding asked for a fraction of a CPU, the two concurrent trials held
    1.25 CPUs each and the 1-CPU Data tasks pended forever (``Pending Demands: {'CPU': 1.0}``)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from graceful_ray.tune.tuner import SearchSettings, default_max_concurrent

    opts = dict(zip(*[iter(readme_tune_job())] * 2))
    assert opts["--old"] == "digits@production" and "--workers-per-trial" not in opts  # resource flags: defaults
    registry, runs, tune = (str(tmp_path / d) for d in ("registry", "runs", "tune"))
    v1 = run_upgrade(UpgradeConfig(data=mnist1d_small, registry=registry, storage=runs, epochs=1, name="digits",
                                   model_kwargs={"channels": 8}, train_split="old_train", run_name="v1", workers=0))
    Registry(registry).set_alias("digits", "production", v1.model_ref)
    # Only the paths and the run's length change: fewer epochs and trials, both trials at once.
    args = readme_tune_job(**{"--data": mnist1d_small, "--registry": registry, "--storage": tune,
                              "--epochs": "1", "--trials": "2"})
    settings = SearchSettings(base={"workers": 1, "cpus_per_worker": 1.0}, trials=2)
    assert default_max_concurrent(settings) == 2  # the two trials run at once, as the README's 8 would
    env = {**os.environ, "RAY_ADDRESS": two_node_cluster.address}
    script = Path(__file__).resolve().parents[1] / "jobs" / "tune_tradeoff.py"
    try:
        done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=HANG_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the README's tune job hung on 2 nodes x 2 CPUs:\n{out[-1500:]}")
    assert done.returncode in (0, 3), done.stdout[-4000:] + done.stderr[-4000:]  # 3: nothing met the budget
    records = json.loads((Path(tune) / opts["--run-name"] / "pareto.json").read_text())["trials"]
    assert [r["status"] for r in records] == ["complete", "complete"], records
