"""Moving a gallery forward with real models: build on Ray Data, progressive and staged
backfill (crash, resume, nothing lost or duplicated), transformation, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from graceful_ray.data import load_split
from graceful_ray.evaluate import predict
from graceful_ray.metrics import m_score
from graceful_ray.registry import Registry, load_model
from graceful_ray.retrieval import (BackfillConfig, BackfillError, EmbeddingSpaceError, Gallery,
                                    GallerySearcher, apply_transform, build_gallery, run_backfill,
                                    uncertainty_scores)
from graceful_ray.retrieval.backfill import load_plan
from graceful_ray.retrieval.errors import SimulatedCrash
from graceful_ray.retrieval.gallery import embeddings_array
from graceful_ray.retrieval.transform import fit_transform_local
from tests.helpers import fit_mlp


@pytest.fixture(scope="module")
def world(tmp_path_factory, mnist1d_small):
    """v1 (old), v2 (published in v1's space: the backfill target), p (plain: its own space)."""
    root = tmp_path_factory.mktemp("retrieval")
    reg = Registry(str(root / "registry"))
    x_old, y_old, _ = load_split(mnist1d_small, "old_train")
    x, y, _ = load_split(mnist1d_small, "train")
    spec, m1 = fit_mlp(x_old, y_old, 0)
    v1 = reg.publish("emb", m1, spec=spec, classes=list(range(10)))
    spec, m2 = fit_mlp(x, y, 1)
    v2 = reg.publish("emb", m2, spec=spec, classes=list(range(10)), parent=v1.ref, method="bct",
                     compatible_with_parent=True)
    spec, mp = fit_mlp(x, y, 2)
    p = reg.publish("plain", mp, spec=spec, classes=list(range(10)), parent=v1.ref, method="plain")
    return {"root": root, "data": mnist1d_small, "registry": reg.uri, "reg": reg, "v1": v1.ref,
            "v2": v2.ref, "p": p.ref}


@pytest.fixture(scope="module")
def built(world, ray_module):
    """The v1 gallery of the test split, built once by the Ray Data job."""
    g = str(world["root"] / "built")
    build_gallery(g, world["data"], "test", registry=world["registry"], model=world["v1"])
    return g


def _copy(world, built, name) -> str:
    dst = world["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(built, dst)
    return str(dst)


def _by_id(world, ref, split="test"):
    from graceful_ray.data import read_split

    x, y, _ = load_split(world["data"], split)
    ids = read_split(world["data"], split, columns=["id"]).column("id").to_numpy()
    return ids, predict(world["registry"], ref, x).embeddings, y


def test_gallery_built_on_ray_data_holds_the_models_embeddings(world, built):
    snap = Gallery(built).head()
    assert snap.rows == 600 and snap.models == {world["v1"]: 600} and snap.embedding_space == world["v1"]
    assert snap.source["split"] == "test" and snap.index_report.kind == "flat"
    rows = Gallery(built).read_rows(snap)
    ids, emb, y = _by_id(world, world["v1"])
    order = np.argsort(ids)
    np.testing.assert_array_equal(rows.column("id").to_numpy(), ids[order])
    np.testing.assert_allclose(embeddings_array(rows), emb[order], atol=1e-5)
    np.testing.assert_array_equal(rows.column("label").to_numpy(), y[order])
    s = GallerySearcher(built, registry=world["registry"], query_model=world["v1"], reload="off")
    res = s.search(emb[:20], k=1)
    np.testing.assert_array_equal(res.ids[:, 0], ids[:20])  # each item finds itself
    with pytest.raises(Exception, match="already exists"):
        build_gallery(built, world["data"], "test", registry=world["registry"], model=world["v1"])


def test_backfill_interrupted_and_resumed_loses_and_duplicates_nothing(world, built):
    g = _copy(world, built, "resume")
    cfg = dict(gallery=g, model=world["v2"], registry=world["registry"], run_name="r1", chunks=4,
               engine="local")
    searcher = GallerySearcher(g, registry=world["registry"], query_model=world["v2"], reload="off")
    seen = []
    # 1) killed right after chunk 2 is committed
    with pytest.raises(SimulatedCrash):
        run_backfill(BackfillConfig(**cfg, fail_after_chunks=2), on_chunk=lambda s, p: seen.append(s.seq))
    head = Gallery(g).head()
    plan, order = load_plan(Gallery(g), "r1")
    first_two = set(order.filter(np.isin(order.column("chunk").to_numpy(), [0, 1])).column("id").to_pylist())
    rows = Gallery(g).read_rows(head)
    mv = np.asarray(rows.column("model_version").to_pylist())
    assert set(rows.column("id").to_numpy()[mv == world["v2"]].tolist()) == first_two
    assert head.backfills["r1"]["chunks_done"] == 2 and not head.backfills["r1"]["done"]
    assert searcher.refresh() and searcher.snapshot.seq == head.seq  # searches keep working, mixed
    assert searcher.search(embeddings_array(rows)[:5], k=3).ids.shape == (5, 3)
    # 2) killed after writing chunk 3's segment, before its commit: the orphan is never used
    with pytest.raises(SimulatedCrash):
        run_backfill(BackfillConfig(**cfg, fail_before_commit=3))
    assert Gallery(g).head().seq == head.seq
    # 3) resumed to the end
    res = run_backfill(BackfillConfig(**cfg), on_chunk=lambda s, p: seen.append(s.seq))
    assert res.resumed and res.done and res.chunks_this_call == 2 and res.rows_done == res.rows_total == 600
    final = Gallery(g).head()
    log = final.backfills["r1"]["log"]
    assert [e["chunk"] for e in log] == [0, 1, 2, 3] and sum(e["rows"] for e in log) == 600
    rows = Gallery(g).read_rows(final)
    ids, emb2, _ = _by_id(world, world["v2"])
    order_ = np.argsort(ids)
    np.testing.assert_array_equal(rows.column("id").to_numpy(), ids[order_])  # every id, once
    np.testing.assert_allclose(embeddings_array(rows), emb2[order_], atol=1e-5)
    assert final.models == {world["v2"]: 600} and len(final.segments) == 1  # compacted at the end
    assert seen == sorted(seen) and len(seen) == 4
    # Re-running a finished run does nothing; the same name with other arguments is refused.
    again = run_backfill(BackfillConfig(**cfg))
    assert again.done and again.chunks_this_call == 0 and Gallery(g).head().seq == final.seq
    with pytest.raises(BackfillError, match="already exists"):
        run_backfill(BackfillConfig(**{**cfg, "order": "random"}))


def test_uncertainty_order_uses_the_old_models_head_on_stored_vectors(world, built):
    g = _copy(world, built, "order")
    with pytest.raises(SimulatedCrash):
        run_backfill(BackfillConfig(gallery=g, model=world["v2"], registry=world["registry"], run_name="o",
                                    chunks=3, engine="local", fail_before_commit=1))
    plan, order = load_plan(Gallery(g), "o")
    assert plan["order"] == "uncertainty" and plan["chunk_rows"] == [200, 200, 200]
    score = order.column("score").to_numpy()
    assert np.all(np.diff(score) <= 0)  # most uncertain first
    _, m1 = load_model(world["reg"], world["v1"])
    rows = Gallery(g).read_rows(Gallery(g).head())
    expected = uncertainty_scores(embeddings_array(rows), m1.head.weight.detach().numpy(),
                                  m1.head.bias.detach().numpy())
    by_id = dict(zip(rows.column("id").to_pylist(), expected))
    np.testing.assert_allclose(score, [by_id[i] for i in order.column("id").to_pylist()], atol=1e-9)


def test_staged_backfill_for_a_model_in_another_space(world, built):
    g = _copy(world, built, "staged")
    old = GallerySearcher(g, registry=world["registry"], query_model=world["v1"], reload="off")
    key = old.snapshot.content_key
    with pytest.raises(EmbeddingSpaceError, match="staged"):
        run_backfill(BackfillConfig(gallery=g, model=world["p"], registry=world["registry"], run_name="s0",
                                    mode="progressive", engine="local"))

    def during(snap, progress):
        if not progress["done"]:  # old rows stay what searches see; new ones are pending
            assert snap.embedding_space == world["v1"] and snap.content_key == key
            assert sum(s["rows"] for s in snap.pending["segments"]) == progress["rows_done"]
            assert old.refresh() and old.snapshot.seq == snap.seq and old.reloads == 0

    res = run_backfill(BackfillConfig(gallery=g, model=world["p"], registry=world["registry"], run_name="s1",
                                      chunks=3, engine="local", order="random"), on_chunk=during)
    assert res.mode == "staged" and res.done
    head = Gallery(g).head()
    assert head.embedding_space == world["p"] and head.models == {world["p"]: 600} and head.pending is None
    # The v1 searcher keeps serving its last snapshot and says why; the cutover switches it.
    assert not old.refresh() and old.status.startswith("stale") and old.snapshot.embedding_space == world["v1"]
    old.set_query_model(world["p"])
    assert old.snapshot.seq == head.seq and old.status == "ok"


def test_transformation_beats_no_transformation_for_a_plain_model(world, built):
    """h(phi_v1) ~ phi_p learned on the train split lifts M(p, gallery) far above p
    searching v1's raw embeddings, without touching the gallery's inputs."""
    x, _, _ = load_split(world["data"], "train")
    old_tr = predict(world["registry"], world["v1"], x).embeddings
    new_tr = predict(world["registry"], world["p"], x).embeddings
    reg = world["reg"]
    tf = fit_transform_local(old_tr, new_tr, old=world["v1"], new=world["p"], old_space=world["v1"],
                             new_space=reg.get(world["p"]).embedding_space, epochs=30, hidden=64)
    ids, e1, y = _by_id(world, world["v1"])
    _, ep, _ = _by_id(world, world["p"])
    raw = m_score(ep, e1, y).top1
    moved = m_score(ep, tf.apply(e1), y).top1
    assert moved > raw + 0.15, (raw, moved)
    # Applied to the gallery: one commit moves it to p's space; p may search it now.
    g = _copy(world, built, "transformed")
    snap = apply_transform(g, tf, registry=world["registry"])
    assert snap.embedding_space == world["p"] and tf.id in snap.transforms
    rows = Gallery(g).read_rows(snap)
    assert set(rows.column("transform").to_pylist()) == {tf.id}
    assert set(rows.column("model_version").to_pylist()) == {world["v1"]}  # who produced the source
    s = GallerySearcher(g, registry=world["registry"], query_model=world["p"], reload="off")
    res = s.search(ep, k=1)
    # (the gallery holds each query's own, transformed, item: a label hit rate near M's top-1)
    assert (res.labels[:, 0] == y).mean() >= moved - 0.05
    with pytest.raises(EmbeddingSpaceError):
        GallerySearcher(g, registry=world["registry"], query_model=world["v1"], reload="off")
    # A progressive backfill with p on top of the transformed gallery: uncertainty uses p's head.
    res = run_backfill(BackfillConfig(gallery=g, model=world["p"], registry=world["registry"], run_name="tb",
                                      chunks=2, engine="local"))
    assert res.mode == "progressive" and Gallery(g).head().models == {world["p"]: 600}


def test_backfill_on_object_storage(world, built, s3_root):
    g = f"{s3_root}/gallery"
    snap = Gallery(built).head()
    rows = Gallery(built).read_rows(snap)
    from graceful_ray.retrieval import publish_embeddings

    publish_embeddings(g, rows.column("id"), embeddings_array(rows), model_version=world["v1"],
                       embedding_space=world["v1"], labels=rows.column("label").to_numpy(),
                       source=snap.source)
    cfg = dict(gallery=g, model=world["v2"], registry=world["registry"], run_name="s3", chunks=2,
               engine="local", order="random")
    with pytest.raises(SimulatedCrash):
        run_backfill(BackfillConfig(**cfg, fail_after_chunks=1))
    res = run_backfill(BackfillConfig(**cfg))
    assert res.resumed and res.done and Gallery(g).head().models == {world["v2"]: 600}


@pytest.mark.slow
def test_transformation_trained_on_ray_train(world, built):
    from graceful_ray.retrieval import TransformConfig, load_transform, train_transform

    out = str(world["root"] / "tf")
    tf = train_transform(TransformConfig(data=world["data"], old=world["v1"], new=world["p"],
                                         registry=world["registry"], out=out, epochs=3, hidden=32,
                                         storage=str(world["root"] / "runs"), run_name="tf-test"))
    again = load_transform(out)
    assert again.meta["old"] == world["v1"] and again.meta["new"] == world["p"]
    assert len(again.meta["history"]) == 3 and 0 < again.meta["metrics"]["val_cosine"] <= 1
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    np.testing.assert_allclose(tf.apply(x), again.apply(x), atol=1e-6)


def test_cli_gallery_commands(world, built, capsys):
    from graceful_ray.cli import main

    g = _copy(world, built, "cli")
    assert main(["gallery", "status", "--gallery", g]) == 0
    assert "600 rows x 32" in capsys.readouterr().out
    assert main(["gallery", "search", "--gallery", g, "--registry", world["registry"], "--model", world["v2"],
                 "--data", world["data"], "--split", "test", "--limit", "50", "--k", "3", "--exclude-self",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 50 and all(r["query"] not in r["ids"] for r in out["results"])
    assert 0 <= out["hit@1"] <= 1
    assert main(["gallery", "search", "--gallery", g, "--registry", world["registry"], "--model", world["p"],
                 "--data", world["data"], "--split", "test"]) == 2
    assert "may not search" in capsys.readouterr().err
    assert main(["gallery", "backfill", "--gallery", g, "--registry", world["registry"], "--model",
                 world["v2"], "--run-name", "cli", "--chunks", "2", "--engine", "local"]) == 0
    assert "complete, 2/2 chunks, 600/600 rows" in capsys.readouterr().out
    assert main(["gallery", "compat", "--data", world["data"], "--models", f"{world['v1']},{world['v2']},{world['p']}",
                 "--registry", world["registry"]]) == 0
    table = capsys.readouterr().out
    assert "AC" in table and "*" in table  # p may not search the others' galleries
