"""Training at scale: the global batch size means the same on any worker count."""

from __future__ import annotations

import pytest

from graceful_ray.errors import ConfigError
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.train.trainer import run_upgrade


def _cfg(tmp, data, **kw) -> UpgradeConfig:
    base = dict(data=data, registry=str(tmp / "registry"), storage=str(tmp / "runs"), epochs=5,
                model="cnn1d", model_kwargs={"channels": 8}, batch_size=64, cpus_per_worker=0.5,
                publish=False)
    base.update(kw)
    return UpgradeConfig(**base)


def test_batch_size_is_global_and_must_split_evenly(tmp_path):
    cfg = _cfg(tmp_path, "unused", workers=4, batch_size=128)
    assert cfg.per_worker_batch_size == 32
    assert _cfg(tmp_path, "unused", workers=0, batch_size=100).per_worker_batch_size == 100
    with pytest.raises(ConfigError, match="multiple of 4"):
        _cfg(tmp_path, "unused", workers=4, batch_size=130)
    with pytest.raises(ConfigError, match="at least 3"):
        _cfg(tmp_path, "unused", workers=3, batch_size=1)


def test_cli_rejects_a_batch_that_does_not_split_before_ray_starts(capsys, monkeypatch, tmp_path):
    import ray

    from graceful_ray.cli import main

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a bad argument"))
    rc = main(["train", "--data", str(tmp_path / "data"), "--workers", "3", "--batch-size", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "multiple of 3" in err[0], err


def test_one_and_two_workers_train_the_same_model_quality(ray_module, mnist1d_small, tmp_path):
    """Same flags on 1 and 2 workers: the same steps per epoch of the same global
    batch, so the accuracy agrees within seed noise (before the fix two workers
    took twice the batch and half the steps)."""
    one = run_upgrade(_cfg(tmp_path, mnist1d_small, workers=1, run_name="w1"))
    two = run_upgrade(_cfg(tmp_path, mnist1d_small, workers=2, run_name="w2"))
    assert two.workers["world_size"] == 2
    for h1, h2 in zip(one.history, two.history):
        assert h1["steps_per_epoch"] == h2["steps_per_epoch"]
        assert h1["global_batch_size"] == h2["global_batch_size"] == 64
    assert two.history[-1]["batch_size_per_worker"] == 32
    # The small split fits the default cache budget: streamed once, then held.
    assert [h["train_streamed"] for h in one.history] == [1.0, 0.0, 0.0, 0.0, 0.0]
    # One validation set of 300 rows: a binomial std of ~3 points per model.
    a1, a2 = one.metrics["val_accuracy"], two.metrics["val_accuracy"]
    assert a1 > 0.25 and a2 > 0.25, (a1, a2)  # both actually learned (chance is 0.1)
    assert abs(a1 - a2) < 0.1, (a1, a2)


def _ids_of(batches) -> list[int]:
    return sorted(int(i) for b in batches for i in b["row_key"])


def test_streamed_split_covers_every_row_each_epoch_and_caches_only_under_budget(ray_session):
    import numpy as np
    import ray

    from graceful_ray.train.pipeline import ROW_KEY, StreamedSplit, rows_of_rank

    n = 1000
    ds = ray.data.from_items([{"x": np.full(4, i, np.float32), "label": i % 10, ROW_KEY: i}
                              for i in range(n)], override_num_blocks=4)
    streamed = StreamedSplit(ds.iterator(), batch_size=64, shuffle_buffer_rows=200, cache_bytes=1024)
    cached = StreamedSplit(ds.iterator(), batch_size=64, shuffle_buffer_rows=200, cache_bytes=10 * 2**20)
    for epoch in range(3):
        for split in (streamed, cached):
            batches = list(split.epoch(epoch))
            assert _ids_of(batches) == list(range(n))  # every row once, in the stream or from the cache
            assert all(len(b["label"]) <= 64 for b in batches)
            # rows stay whole: x, label and key of one row travel together
            for b in batches:
                assert (b["x"][:, 0].long() == b[ROW_KEY]).all() and (b["label"] == b[ROW_KEY] % 10).all()
    assert streamed.streaming and streamed.passes == 3  # 1 KiB budget: streams every epoch
    assert not cached.streaming and cached.passes == 1  # fits: kept after the first pass
    first, second = (list(cached.epoch(e)) for e in (3, 4))
    assert not (first[0][ROW_KEY] == second[0][ROW_KEY]).all()  # still reshuffled per epoch
    # The validation partition: ranks see disjoint rows that together are all of them.
    parts = [_ids_of(StreamedSplit(ds.iterator(), batch_size=100, keep=rows_of_rank(r, 3)).epoch(0))
             for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(n)) and all(len(p) in (333, 334) for p in parts)


def test_two_workers_always_streaming_evaluate_every_validation_row(ray_module, mnist1d_small, tmp_path):
    from graceful_ray.data import read_info

    run = run_upgrade(_cfg(tmp_path, mnist1d_small, workers=2, epochs=2, cache_budget_mb=0, run_name="stream"))
    assert [h["train_streamed"] for h in run.history] == [1.0, 1.0]
    assert run.metrics["val_rows"] == read_info(mnist1d_small).splits["val"].rows


def test_run_epoch_trains_with_cached_old_outputs_and_stops_in_lockstep():
    """The framework-free epoch the Ray loop runs: the old outputs come from the
    batch's columns, and it stops as soon as any rank (here: a stand-in) runs out."""
    import torch

    from graceful_ray.methods import UpgradeContext, build_method
    from graceful_ray.models import ModelSpec, build_model
    from graceful_ray.train.step import CachedOldOutputs, run_epoch

    torch.manual_seed(0)
    x = torch.randn(256, 12)
    y = (x[:, 0] > 0).long()
    old_model = build_model(ModelSpec("mlp", (12,), 2, {"width": 16, "embedding_dim": 8}))
    with torch.no_grad():
        old_emb, old_logits = old_model.forward_features(x)
    batches = [{"x": x[i:i + 32], "label": y[i:i + 32], "old_embedding": old_emb[i:i + 32],
                "old_logits": old_logits[i:i + 32], "old_correct": old_logits[i:i + 32].argmax(1) == y[i:i + 32]}
               for i in range(0, 256, 32)]
    model = build_model(ModelSpec("mlp", (12,), 2, {"width": 16, "embedding_dim": 8}))
    method = build_method("fd")
    method.setup(UpgradeContext(num_classes=2, new_embedding_dim=8, old_classes=[0, 1], old_embedding_dim=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    common = dict(device=torch.device("cpu"), forward=model.forward_features, method=method, optimizer=opt,
                  old=CachedOldOutputs(torch.device("cpu")))
    first = run_epoch(iter(batches), **common)
    assert first.steps == 8 and first.rows == 256 and first.sums["loss_fd"] > 0
    for _ in range(5):
        last = run_epoch(iter(batches), **common)
    assert last.sums["loss"] < first.sums["loss"]
    # another rank has 3 batches: this one stops after 3 steps, and still drains its pass
    calls = iter([True, True, True, False])
    drained = iter(batches)
    short = run_epoch(drained, **common, all_have_next=lambda mine: mine and next(calls))
    assert short.steps == 3 and next(drained, None) is None


def _two_tone_pngs(root) -> str:
    """Every image: a bright left half, a dim right half, so a flip or a shifted crop
    (zeros from the padding) shows in the pixels."""
    import numpy as np
    import pyarrow as pa

    from graceful_ray.data import write_dataset
    from graceful_ray.data.images import encode_png

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, :4], img[:, 4:] = 200, 60
    tables = {split: pa.table({"id": pa.array(np.arange(offset, offset + n, dtype=np.int64)),
                               "label": pa.array(np.arange(n, dtype=np.int64) % 2),
                               "image": pa.array([encode_png(img)] * n, type=pa.binary())})
              for split, n, offset in (("train", 48, 0), ("val", 24, 48))}
    write_dataset(root, tables, name="two-tone", num_classes=2, class_names=["a", "b"])
    return str(root)


def test_image_augmentation_needs_an_image_dataset(mnist1d_small):
    from graceful_ray.train.checks import check_upgrade

    with pytest.raises(ConfigError, match="image dataset"):
        check_upgrade(UpgradeConfig(data=mnist1d_small, augment_images=True))


def test_pipeline_augments_the_training_split_only_with_new_seeded_crops_each_epoch(ray_session, tmp_path):
    import numpy as np

    from graceful_ray.train.pipeline import INPUT, epoch_key, publish_epoch
    from graceful_ray.train.trainer import prepare_upgrade

    data = _two_tone_pngs(tmp_path / "png")
    cfg = _cfg(tmp_path, data, model="mlp", model_kwargs={"width": 8}, augment_images=True, augment_pad=2,
               batch_size=16, run_name="augment").resolved()
    _, datasets, _ = prepare_upgrade(cfg)

    def inputs(split: str, epoch: int) -> np.ndarray:
        publish_epoch(epoch_key(cfg.run_name), epoch)  # as the training workers do before each epoch
        return np.concatenate([b[INPUT] for b in datasets[split].iter_batches(batch_format="numpy")])

    plain = np.zeros((3, 8, 8), dtype=np.float32)
    plain[:, :, :4], plain[:, :, 4:] = 200 / 255, 60 / 255
    val = inputs("val", 0)
    assert len(val) == 24 and all(np.array_equal(v, plain) for v in val)  # validation: never augmented
    first = inputs("train", 0)
    changed = [not np.array_equal(x, plain) for x in first]
    assert len(first) == 48 and sum(changed) > 24  # P(unchanged) = 1/50 per row
    # every training image is the original shifted (zeros enter) and/or mirrored: only its pixels
    assert set(np.unique(first).tolist()) <= {0.0, float(np.float32(200 / 255)), float(np.float32(60 / 255))}
    assert any(x[0, 4, 2] < x[0, 4, 5] for x in first)  # some were flipped (dim half on the left)

    def crops(x: np.ndarray) -> list[bytes]:
        return sorted(r.tobytes() for r in x)

    assert crops(inputs("train", 0)) == crops(first)  # seeded: the same epoch draws the same crops
    assert crops(inputs("train", 1)) != crops(first)  # a new epoch draws new ones

    # Trained this way, the training split streams every epoch (never cached: its crops change).
    run = run_upgrade(_cfg(tmp_path, data, model="mlp", model_kwargs={"width": 8}, augment_images=True,
                           batch_size=16, epochs=2, workers=0, run_name="augment-train"))
    assert [h["train_streamed"] for h in run.history] == [1.0, 1.0]
    assert run.metrics["val_rows"] == 24


def test_memory_cap_stops_a_worker_over_it_and_says_why(tmp_path):
    import subprocess
    import sys

    with pytest.raises(ConfigError, match="local mode"):
        UpgradeConfig(data="unused", workers=0, memory_per_worker_mb=512)
    assert UpgradeConfig(data="unused", memory_per_worker_mb=800).effective_cache_budget_mb == 200
    # A process already over a 10 MiB cap (any Python is) is stopped by the watchdog.
    code = "import time; from graceful_ray.train.worker import MemoryWatch; MemoryWatch(10).start(); time.sleep(120)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "passed memory_per_worker_mb=10" in proc.stderr


def test_what_a_worker_streams_is_bounded_in_bytes_not_only_rows():
    """Decode blocks, the local shuffle buffer and Ray Data's queue ahead of the workers
    are bounded by bytes, so larger images do not make them larger."""
    from graceful_ray.train.pipeline import (
        DECODE_BLOCK_BYTES,
        decode_batch_rows,
        eval_batch_rows,
        shuffle_buffer_rows,
    )
    from graceful_ray.train.trainer import ingest_options

    small, image, large = (40,), (3, 32, 32), (3, 224, 224)
    assert decode_batch_rows(small) == 1024  # features: as many rows as before
    assert decode_batch_rows(image) * 4 * 3 * 32 * 32 <= DECODE_BLOCK_BYTES < (decode_batch_rows(image) + 1) * 12288
    assert decode_batch_rows(large) == 32  # never fewer rows than this per task
    mib16 = 16 * 2**20
    assert shuffle_buffer_rows(4096, mib16, small, 128) == 4096
    assert shuffle_buffer_rows(4096, mib16, image, 128) == mib16 // 12288
    assert shuffle_buffer_rows(4096, mib16, large, 256) == 256  # at least one batch
    assert shuffle_buffer_rows(0, mib16, image, 128) == 0  # 0 rows: no shuffling
    assert eval_batch_rows(small) == 4096 and eval_batch_rows(image) == mib16 // 12288
    cfg = UpgradeConfig(data="unused")
    assert ingest_options(cfg).resource_limits.object_store_memory == cfg.stream_buffer_mb * 2**20 > 0
    assert ingest_options(UpgradeConfig(data="unused", stream_buffer_mb=0)).resource_limits.object_store_memory \
        == float("inf")
    with pytest.raises(ConfigError, match="stream_buffer_mb"):
        UpgradeConfig(data="unused", stream_buffer_mb=-1)
