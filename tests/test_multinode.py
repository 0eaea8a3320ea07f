"""Multi-node training: two Ray nodes on this machine (ray.cluster_utils.Cluster).

The workers must really land on different nodes (STRICT_SPREAD) and, being one
DDP group, finish with identical weights and identical all-reduced metrics.
"""

from __future__ import annotations

import pytest

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
