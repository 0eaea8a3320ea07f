"""Upgrade training on Ray Train: publish with lineage, old-output cache, online
teacher, worker failure and resume, run-name resume, and bad arguments."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from graceful_ray.errors import ConfigError
from graceful_ray.registry import Registry
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.old_outputs import compute_old_outputs, find_cached, cache_key
from graceful_ray.train.trainer import run_upgrade


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mnist1d_small):
    root = tmp_path_factory.mktemp("train")
    return {"data": mnist1d_small, "registry": str(root / "registry"), "storage": str(root / "runs")}


def _cfg(ws, **kw) -> UpgradeConfig:
    base = dict(data=ws["data"], registry=ws["registry"], storage=ws["storage"], epochs=2,
                model="cnn1d", model_kwargs={"channels": 8}, batch_size=128, cpus_per_worker=1.0)
    base.update(kw)
    return UpgradeConfig(**base)


@pytest.fixture(scope="module")
def v1(ray_module, workspace):
    result = run_upgrade(_cfg(workspace, train_split="old_train", run_name="v1", epochs=4))
    return result


def test_first_version_published_with_manifest(v1, workspace):
    m = Registry(workspace["registry"]).get(v1.model_ref)
    assert m.parent is None and m.method == "plain"
    assert m.classes == list(range(10))
    assert m.embedding_space == f"{m.name}@v{m.version}"
    from graceful_ray.data import read_info

    assert m.dataset_checksum == read_info(workspace["data"]).checksum
    assert m.metrics["epoch"] == 4 and 0.0 <= m.metrics["val_accuracy"] <= 1.0
    assert len(v1.history) == 4 and [h["epoch"] for h in v1.history] == [1, 2, 3, 4]
    # the loss went down: the loop really trains
    assert v1.history[-1]["loss"] < v1.history[0]["loss"]


def test_compatible_method_shares_space_and_cache_feeds_flips(v1, workspace):
    # Local mode (workers=0): this is about the methods, the manifest and the cache; the
    # cached outputs through a Ray Train worker group are the worker-kill test's run.
    reg = Registry(workspace["registry"])
    bct = run_upgrade(_cfg(workspace, old=v1.model_ref, method="bct", seed=1, workers=0, run_name="bct"))
    fd = run_upgrade(_cfg(workspace, old=v1.model_ref, method="fd", seed=1, workers=0, run_name="fd"))
    mb, mf, m1 = reg.get(bct.model_ref), reg.get(fd.model_ref), reg.get(v1.model_ref)
    assert mb.parent == m1.ref and mf.parent == m1.ref
    assert mb.embedding_space == m1.embedding_space  # BCT: compatible, same space
    assert mf.embedding_space != m1.embedding_space  # FD lowers flips; no embedding promise
    assert mf.hyperparameters["fd_beta"] == 5 and mf.hyperparameters["fd_kind"] == "lm"
    for r in (bct, fd):
        assert r.workers["teacher"] == "cache"
        assert {"val_nfr", "val_pfr", "val_old_accuracy"} <= set(r.metrics)
        assert r.metrics["val_old_accuracy"] == pytest.approx(v1.metrics["val_accuracy"], abs=1e-9)
    assert fd.metrics["loss_fd"] > 0 and "loss_bct" in bct.metrics


def test_old_output_cache_is_reused_and_correct(v1, workspace, caplog):
    reg = Registry(workspace["registry"])
    first = compute_old_outputs(workspace["data"], "val", registry_root=workspace["registry"], old_ref=v1.model_ref)
    with caplog.at_level("INFO", logger="graceful_ray.train.old_outputs"):
        again = compute_old_outputs(workspace["data"], "val", registry_root=workspace["registry"],
                                    old_ref=v1.model_ref)
    assert again.files == first.files and "reused from cache" in caplog.text
    # The cached decisions are the old model's own.
    from graceful_ray.data import load_split
    from graceful_ray.evaluate import predict

    x, y, _ = load_split(workspace["data"], "val")
    table = first.read()
    order = np.argsort(table.column("id").to_numpy())
    from graceful_ray.data import read_split

    ids = read_split(workspace["data"], "val").column("id").to_numpy()
    expected = predict(workspace["registry"], v1.model_ref, x).pred[np.argsort(ids)]
    np.testing.assert_array_equal(table.column("old_pred").to_numpy()[order], expected)
    np.testing.assert_array_equal(table.column("old_correct").to_numpy()[order], (expected == y[np.argsort(ids)]))


def test_cached_outputs_reach_the_loop_through_ray_datas_default_reader(v1, workspace, ray_data_v2_reader):
    """The old-output cache as a worker reads it, through Ray Data's default (V2) Parquet reader."""
    from graceful_ray.data import read_info
    from graceful_ray.data.tensors import inputs_from_arrow
    from graceful_ray.train.pipeline import INPUT, collect
    from graceful_ray.train.trainer import prepare_upgrade

    info = read_info(workspace["data"])
    cached = compute_old_outputs(workspace["data"], "val", registry_root=workspace["registry"], old_ref=v1.model_ref)
    # the validation dataset exactly as the trainer hands it to the loop's workers
    _, datasets, _ = prepare_upgrade(_cfg(workspace, old=v1.model_ref, method="fd"))
    got = collect(datasets["val"].iter_torch_batches(batch_size=256))
    table = cached.read()
    n = table.num_rows
    want = {
        "x": inputs_from_arrow(table, tuple(info.feature_shape)),
        "label": table.column("label").to_numpy(),
        "old_logits": table.column("old_logits").combine_chunks().flatten().to_numpy().reshape(n, -1),
        "old_embedding": table.column("old_embedding").combine_chunks().flatten().to_numpy().reshape(n, -1),
        "old_correct": table.column("old_correct").to_numpy(zero_copy_only=False),
    }
    assert len(got["label"]) == n == info.splits["val"].rows
    # Ray Data may deliver blocks in any order: match rows by their inputs (distinct in MNIST-1D)
    row_of = {want["x"][i].tobytes(): i for i in range(n)}
    rows = [row_of[x.tobytes()] for x in got[INPUT].numpy()]
    assert sorted(rows) == list(range(n))
    for key in ("label", "old_logits", "old_embedding", "old_correct"):
        np.testing.assert_array_equal(got[key].numpy(), want[key][rows], err_msg=key)


def test_cache_key_changes_with_old_weights_and_dataset(v1, workspace, tmp_path):
    reg = Registry(workspace["registry"])
    m1 = reg.get(v1.model_ref)
    _, state = reg.load_state_dict(v1.model_ref)
    state = {k: v + 0.01 for k, v in state.items()}
    m_other = reg.publish(m1.name, state, spec=m1.spec, classes=m1.classes, extra={"purpose": "cache test"})
    from graceful_ray.data import read_info

    checksum = read_info(workspace["data"]).checksum
    assert cache_key(checksum, m_other) != cache_key(checksum, m1)
    assert cache_key("0" * 64, m1) != cache_key(checksum, m1)
    assert find_cached(workspace["data"], cache_key(checksum, m_other), "val") is None


def test_augmented_inputs_use_online_teacher(v1, workspace):
    r = run_upgrade(_cfg(workspace, old=v1.model_ref, method="fd", seed=2, augment_noise=0.05,
                         augment_shift=2, workers=0, run_name="fd-aug", publish=False))
    assert r.workers["teacher"] == "online"
    assert r.metrics["loss_fd"] > 0 and "val_nfr" in r.metrics


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_checkpoint(v1, workspace):
    cfg = _cfg(workspace, old=v1.model_ref, method="fd", seed=3, epochs=3, workers=2,
               max_failures=1, fail_at_epoch=1, run_name="fail-once", publish=False)
    marker = os.path.join(__import__("tempfile").gettempdir(), "graceful-ray-failure-fail-once")
    if os.path.exists(marker):
        os.remove(marker)
    r = run_upgrade(cfg)
    assert os.path.exists(marker), "the failure hook never fired"
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    assert r.metrics["epoch"] == 3


def test_reusing_a_run_name_resumes_it(v1, workspace):
    again = run_upgrade(_cfg(workspace, train_split="old_train", run_name="v1", epochs=4, publish=False))
    assert again.resumed
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4]
    torch.testing.assert_close(again.state_dict, v1.state_dict)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fd"), "needs an old model"),
    (dict(method="nonsense"), "unknown method"),
    (dict(method="fd", hparams={"fd_gamma": 1}), "fd_gamma"),
    (dict(train_split="nope"), "has no split 'nope'"),
    (dict(model="no_such_model"), "unknown model"),
])
def test_bad_arguments_fail_before_workers_start(ray_session, workspace, kwargs, match):
    with pytest.raises(ConfigError if "model" not in kwargs else Exception, match=match):
        run_upgrade(_cfg(workspace, run_name="bad", **kwargs))


def test_bct_with_mismatched_embedding_dims_says_what_to_do(v1, workspace):
    with pytest.raises(ConfigError, match="embedding_dim"):
        run_upgrade(_cfg(workspace, old=v1.model_ref, method="bct", model_kwargs={"channels": 8, "embedding_dim": 32},
                         run_name="bad-bct"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(epochs=0), "epochs"), (dict(workers=-1), "workers"), (dict(lr=-1), "lr"),
    (dict(run_name="has space"), "run name"), (dict(lr_schedule="step"), "lr_schedule must be one of"),
    (dict(init_from_old=True), "init_from_old starts from the old model's weights"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UpgradeConfig(data="x", **kwargs)


def test_local_mode_persists_checkpoints_and_extends_a_run(v1, workspace):
    """workers=0 (Ray Train local mode) runs in this process and still resumes."""
    first = run_upgrade(_cfg(workspace, old=v1.model_ref, method="fd", seed=4, epochs=1, workers=0,
                             run_name="local", publish=False))
    assert [h["epoch"] for h in first.history] == [1] and not first.resumed
    longer = run_upgrade(_cfg(workspace, old=v1.model_ref, method="fd", seed=4, epochs=2, workers=0,
                              run_name="local"))
    assert longer.resumed
    assert [h["epoch"] for h in longer.history] == [1, 2]
    assert longer.history[0] == first.history[0], "epoch 1 was re-run instead of resumed"
    assert longer.published is not None


def test_fit_makes_the_train_controller_poll_often_unless_the_environment_says(monkeypatch):
    import os

    from graceful_ray.train import trainer as trainer_module

    class Recorder:  # stands in for a TorchTrainer: records what fit() saw
        def fit(self):
            return os.environ.get(trainer_module.CONTROLLER_POLL_ENV)

    monkeypatch.delenv(trainer_module.CONTROLLER_POLL_ENV, raising=False)
    assert trainer_module.fit(Recorder()) == trainer_module.CONTROLLER_POLL_S == "0.5"
    monkeypatch.setenv(trainer_module.CONTROLLER_POLL_ENV, "2")
    assert trainer_module.fit(Recorder()) == "2"


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_is_what_the_run_trains_with(ray_module, workspace, schedule):
    """The optimizer state the run checkpoints at its end: cosine decays to 0, constant keeps lr."""
    from graceful_ray.train.loop import latest_local_checkpoint, load_checkpoint_dir

    cfg = _cfg(workspace, epochs=2, workers=0, lr=2e-3, lr_schedule=schedule, run_name=f"lr-{schedule}",
               publish=False)
    run_upgrade(cfg)
    with latest_local_checkpoint(cfg.resolved()).as_directory() as d:
        _, opt_state, _ = load_checkpoint_dir(d)
    lr = opt_state["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2e-3 if schedule == "constant" else 0.0, abs=1e-9)


def test_init_from_old_starts_at_v1_and_elodi_refs_reach_the_loop(v1, workspace):
    """--init-from-old: with a tiny learning rate the published v2 is v1's weights, nearly;
    another architecture is refused before any worker starts. ELODI with an ensemble
    reference (elodi_refs) loads it from the registry and runs it on the loop's batches."""
    reg = Registry(workspace["registry"])
    warm = run_upgrade(_cfg(workspace, old=v1.model_ref, init_from_old=True, lr=1e-7, epochs=1, workers=0,
                            seed=5, method="elodi", hparams={"elodi_refs": v1.model_ref},
                            run_name="warm"))
    m = reg.get(warm.model_ref)
    assert m.hyperparameters["init_from_old"] is True and m.hyperparameters["elodi_refs"] == v1.model_ref
    old_state = reg.load_state_dict(v1.model_ref)[1]
    new_state = reg.load_state_dict(warm.model_ref)[1]
    assert max(float((old_state[k] - new_state[k]).abs().max()) for k in old_state) < 1e-3
    assert warm.metrics["val_nfr"] < 0.01  # it decides as v1 does
    assert warm.history[-1]["loss_elodi"] >= 0.0
    with pytest.raises(ConfigError, match="init_from_old: the pretrained weights do not fit"):
        run_upgrade(_cfg(workspace, old=v1.model_ref, init_from_old=True, model_kwargs={"channels": 16},
                         run_name="warm-bad"))
