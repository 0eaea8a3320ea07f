"""Galleries without Ray: snapshots and their atomic publication, the embedding-space
check, mixed galleries, bad queries, index choice and its recall report, curves."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from graceful_ray.errors import IncompatibleModelError
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry
from graceful_ray.retrieval import (ConcurrentUpdateError, EmbeddingSpaceError, Gallery, GalleryError,
                                    GallerySearcher, IndexConfig, QueryError, backfill_curve, build_index,
                                    check_query_model, curve_auc, make_rows, merge_rows, publish_embeddings,
                                    uncertainty_scores)
from graceful_ray.retrieval.gallery import update_rows
from graceful_ray.retrieval.index import l2_normalize, recall_at_k

DIM = 16


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 -> v2 (bct) -> v3 (bct) keep v1's space; p is a plain child (own space), q a bct child of p."""
    import torch

    reg = Registry(str(tmp_path_factory.mktemp("reg") / "registry"))
    spec = ModelSpec("mlp", (8,), 3, {"width": 8, "depth": 1, "embedding_dim": DIM})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_model(spec)
    refs = {}
    refs["v1"] = reg.publish("m", net, spec=spec, classes=[0, 1, 2]).ref
    refs["v2"] = reg.publish("m", net, spec=spec, classes=[0, 1, 2], parent=refs["v1"], method="bct",
                             compatible_with_parent=True).ref
    refs["v3"] = reg.publish("m", net, spec=spec, classes=[0, 1, 2], parent=refs["v2"], method="bct",
                             compatible_with_parent=True).ref
    refs["p"] = reg.publish("p", net, spec=spec, classes=[0, 1, 2], parent=refs["v2"], method="plain").ref
    refs["q"] = reg.publish("p", net, spec=spec, classes=[0, 1, 2], parent=refs["p"], method="bct",
                            compatible_with_parent=True).ref
    return reg, refs


def _vectors(n: int, seed: int = 0, d: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _gallery(path, reg, refs, n=200, seed=0, **kw):
    x = _vectors(n, seed)
    snap = publish_embeddings(str(path), np.arange(n) * 10, x, model_version=refs["v1"],
                              embedding_space=reg.get(refs["v1"]).embedding_space,
                              labels=np.arange(n) % 3, **kw)
    return snap, x


# -------------------------------------------------------------- space check
def test_space_check_allows_same_model_descendant_and_ancestor(tmp_path, registry):
    reg, refs = registry
    _gallery(tmp_path / "g", reg, refs)
    with GallerySearcher(str(tmp_path / "g"), registry=reg.uri, query_model=refs["v1"], reload="off") as s:
        assert s.search(_vectors(2, 5), k=3).ids.shape == (2, 3)
    space = reg.get(refs["v1"]).embedding_space
    same = check_query_model(reg, refs["v1"], space=space, gallery_models=[refs["v1"]])
    assert same.relation == "same model"
    desc = check_query_model(reg, refs["v3"], space=space, gallery_models=[refs["v1"]])
    assert desc.relation == "compatible descendant"
    assert desc.chain == ["m@v3 (bct)", "m@v2 (bct)", "m@v1 (plain)"]
    anc = check_query_model(reg, refs["v1"], space=space, gallery_models=[refs["v3"]])
    assert anc.relation == "ancestor"
    # A searcher with the descendant as query model works on the v1 gallery.
    with GallerySearcher(str(tmp_path / "g"), registry=reg.uri, query_model=refs["v3"], reload="off") as s:
        assert s.info()["query_model"] == refs["v3"]


@pytest.mark.parametrize("who", ["p", "q"])
def test_space_check_refuses_other_space_naming_both_models_and_the_way_out(tmp_path, registry, who):
    reg, refs = registry
    _gallery(tmp_path / "g", reg, refs)
    with pytest.raises(EmbeddingSpaceError) as e:
        GallerySearcher(str(tmp_path / "g"), registry=reg.uri, query_model=refs[who], reload="off")
    msg = str(e.value)
    # q is a *compatible* child of p, but p left v1's space: the chain does not keep it.
    assert refs[who] in msg and refs["v1"] in msg and "m@v1" in msg
    assert "gallery backfill" in msg and "gallery transform" in msg and "bct" in msg
    assert str(tmp_path / "g") in msg  # the remedy commands name this gallery
    assert isinstance(e.value, IncompatibleModelError) and len(e.value.remedies) == 3
    assert e.value.query == refs[who] and e.value.gallery_models == [refs["v1"]]


# ---------------------------------------------------------- mixed galleries
def test_mixed_gallery_searches_every_id_once_with_its_latest_vector(tmp_path, registry):
    reg, refs = registry
    snap, x = _gallery(tmp_path / "g", reg, refs, n=300)
    g = Gallery(str(tmp_path / "g"))
    rows = g.read_rows(snap)
    # Re-embed a third of the rows with v2 (same space): a half-done backfill.
    upd_ids = np.arange(0, 300, 3) * 10
    x2 = _vectors(100, seed=9)
    upd = make_rows(upd_ids, x2, model_version=refs["v2"], embedding_space=snap.embedding_space,
                    labels=np.arange(0, 300, 3) % 3)
    seg = g.write_segment(upd)
    merged = update_rows(rows, upd)
    snap2, _ = g.publish(merged, parent=snap, segments=snap.segments + [seg])
    assert snap2.models == {refs["v1"]: 200, refs["v2"]: 100} and snap2.rows == 300
    expected = x.copy()
    expected[::3] = x2
    s = GallerySearcher(str(tmp_path / "g"), registry=reg.uri, query_model=refs["v3"], reload="off")
    assert s.snapshot.seq == 2
    q = _vectors(40, seed=11)
    res = s.search(q, k=20)
    # Brute force over the latest vector of every id.
    scores = l2_normalize(q) @ l2_normalize(expected).T
    want = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(res.ids, want * 10)
    np.testing.assert_allclose(res.scores, np.take_along_axis(scores, want, 1), atol=1e-5)
    assert all(len(set(r)) == 20 for r in res.ids.tolist())  # an id never twice
    versions = np.where(want % 3 == 0, refs["v2"], refs["v1"])
    np.testing.assert_array_equal(res.model_versions, versions)
    np.testing.assert_array_equal(res.labels, want % 3)
    # Rows of two spaces are never published together.
    other = make_rows([5], _vectors(1), model_version=refs["p"], embedding_space="p@v1")
    with pytest.raises(GalleryError, match="one embedding space"):
        g.publish(update_rows(merged, other), parent=snap2, segments=snap2.segments)


def test_merge_keeps_the_last_occurrence_sorted_by_id():
    a = make_rows([3, 1, 2], np.eye(3, dtype=np.float32), model_version="a", embedding_space="s")
    b = make_rows([2, 9], np.ones((2, 3), dtype=np.float32), model_version="b", embedding_space="s")
    m = merge_rows([a, b])
    assert m.column("id").to_pylist() == [1, 2, 3, 9]
    assert m.column("model_version").to_pylist() == ["a", "b", "a", "b"]
    with pytest.raises(GalleryError, match="duplicate ids"):
        make_rows([1, 1], np.ones((2, 3)), model_version="a", embedding_space="s")
    with pytest.raises(GalleryError, match="NaN"):
        make_rows([1, 2], np.array([[1, np.nan, 0], [1, 1, 1]]), model_version="a", embedding_space="s")


# -------------------------------------------------------------- bad queries
@pytest.mark.parametrize("query, k, match", [
    (np.zeros((2, DIM + 1)), 5, "dimension 17.*dimension 16"),
    (np.full((2, DIM), np.nan), 5, "NaN or inf"),
    (np.array([[np.inf] * DIM, [1.0] * DIM]), 5, r"rows \[0\]"),
    (np.zeros((0, DIM)), 5, "0 rows"),
    (np.ones((2, 2, DIM)), 5, "must be"),
    (np.zeros((1, DIM)), 5, "all zeros"),
    ([[1.0] * DIM, [1.0] * 3], 5, "ragged"),
    (np.array([["a"] * DIM]), 5, "numbers"),
    (np.ones((1, DIM)), 0, "positive integer"),
    (np.ones((1, DIM)), True, "positive integer"),
    (np.ones((1, DIM)), 10**6, "maximum"),
])
def test_bad_queries_raise_a_clear_error(tmp_path, registry, query, k, match):
    reg, refs = registry
    _gallery(tmp_path / "g", reg, refs, n=50)
    s = GallerySearcher(str(tmp_path / "g"), reload="off")
    with pytest.raises(QueryError, match=match):
        s.search(query, k=k)


def test_k_larger_than_the_gallery_is_clamped_and_one_vector_is_one_query(tmp_path, registry):
    reg, refs = registry
    _, x = _gallery(tmp_path / "g", reg, refs, n=7)
    s = GallerySearcher(str(tmp_path / "g"), reload="off")
    res = s.search(x[3], k=50)  # a 1-D vector is one query
    assert res.ids.shape == (1, 7) and res.k == 7 and res.ids[0, 0] == 30
    assert sorted(res.ids[0].tolist()) == list(range(0, 70, 10))


# ------------------------------------------------------ atomic publication
def _snapshot_rows(s: int) -> tuple[np.ndarray, np.ndarray]:
    n = 40 + 15 * s
    return s * 100_000 + np.arange(n), _vectors(n, seed=100 + s)


def test_publication_is_atomic_under_concurrent_searches(tmp_path, registry):
    """A thread searches in a loop (reloading inline on every call) while snapshots of
    different sizes are published: never an error, never a result mixing snapshots
    or missing rows."""
    reg, refs = registry
    root = str(tmp_path / "g")
    space = reg.get(refs["v1"]).embedding_space
    ids, x = _snapshot_rows(0)
    publish_embeddings(root, ids, x, model_version=refs["v1"], embedding_space=space)
    searcher = GallerySearcher(root, registry=reg.uri, query_model=refs["v1"], reload="inline", poll_s=0.0)
    bg = GallerySearcher(root, registry=reg.uri, query_model=refs["v1"], reload="background", poll_s=0.01)
    sizes = {s: len(_snapshot_rows(s)[0]) for s in range(12)}
    errors, seen = [], set()
    stop = threading.Event()
    q = _vectors(8, seed=1)

    def loop(s):
        while not stop.is_set():
            try:
                res = s.search(q, k=60)
                generation = {int(i) // 100_000 for i in res.ids.ravel()}
                assert len(generation) == 1, f"result mixes snapshots {generation}"
                (gen,) = generation
                assert res.ids.shape == (8, min(60, sizes[gen])), (res.ids.shape, gen)
                assert np.all(np.diff(res.scores, axis=1) <= 1e-6)
                assert res.snapshot == gen + 1
                seen.add(gen)
            except Exception as e:  # noqa: BLE001 - collected and reported
                errors.append(repr(e))

    threads = [threading.Thread(target=loop, args=(s,)) for s in (searcher, bg)]
    for t in threads:
        t.start()
    g = Gallery(root)
    for s in range(1, 12):
        head = g.head()
        ids, x = _snapshot_rows(s)
        rows = make_rows(ids, x, model_version=refs["v1"], embedding_space=space)
        seg = g.write_segment(rows)
        # Alternate exact and IVF indexes: both are published whole.
        g.publish(rows, parent=head, segments=[seg],
                  index_config=IndexConfig(kind="ivf" if s % 2 else "flat", nlist=4, target_recall=0.5))
        time.sleep(0.05)
    deadline = time.time() + 10
    while (searcher.snapshot.seq != 12 or bg.snapshot.seq != 12) and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    bg.close()
    assert not errors, errors[:3]
    assert 11 in seen and len(seen) >= 3
    assert searcher.snapshot.seq == 12 and bg.snapshot.seq == 12 and searcher.errors == []
    # Old snapshots were retired (keep=3) without disturbing the searchers.
    assert len(Gallery(root).loc.join("snapshots").list()) == 3


def test_an_uncommitted_publish_is_invisible_and_concurrent_writers_conflict(tmp_path, registry, monkeypatch):
    reg, refs = registry
    root = str(tmp_path / "g")
    snap, x = _gallery(root, reg, refs, n=30)
    g = Gallery(root)
    rows = g.read_rows(snap)
    # A writer that dies right before its commit leaves files nobody references.
    from graceful_ray.storage import Staged

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(Staged, "commit", crash)
    seg = g.write_segment(rows)
    with pytest.raises(KeyboardInterrupt):
        g.publish(rows, parent=snap, segments=[seg], index_config=IndexConfig(kind="hnsw"))
    monkeypatch.undo()
    assert Gallery(root).head().seq == 1
    assert GallerySearcher(root, reload="off").snapshot.seq == 1
    # Two writers start from snapshot 1; the second to commit is refused.
    g.publish(rows, parent=snap, segments=snap.segments)
    before = {i.path for i in g.loc.join("snapshots").list()}
    with pytest.raises(ConcurrentUpdateError, match="moved on"):
        g.publish(rows, parent=snap, segments=snap.segments)
    assert {i.path for i in g.loc.join("snapshots").list()} == before  # its files are gone
    assert [c["seq"] for c in g.history()] == [1, 2]
    with pytest.raises(GalleryError, match="already exists"):
        publish_embeddings(root, [1], _vectors(1), model_version="m@v1", embedding_space="m@v1")


def test_reader_follows_commits_past_a_stale_head_hint(tmp_path, registry):
    reg, refs = registry
    root = str(tmp_path / "g")
    snap, _ = _gallery(root, reg, refs, n=20)
    g = Gallery(root)
    hint = g.loc.join("HEAD.json").read_bytes()
    g.publish(g.read_rows(snap), parent=snap, segments=snap.segments)
    g.loc.join("HEAD.json").write_bytes(hint)  # a writer crashed after its commit
    assert Gallery(root).head().seq == 2
    g.loc.join("HEAD.json").write_bytes(b"{damaged")
    assert Gallery(root).head().seq == 2


def test_gallery_on_object_storage(storage_root, registry):
    reg, refs = registry
    root = f"{storage_root}/gallery"
    snap, x = _gallery(root, reg, refs, n=120, index=IndexConfig(kind="ivf", nlist=4, target_recall=0.8))
    s = GallerySearcher(root, registry=reg.uri, query_model=refs["v2"], reload="off")
    assert s.search(x[:4], k=1).ids[:, 0].tolist() == [0, 10, 20, 30]
    g = Gallery(root)
    upd = make_rows([0], -x[:1], model_version=refs["v2"], embedding_space=snap.embedding_space)
    seg = g.write_segment(upd)
    g.publish(update_rows(g.read_rows(snap), upd), parent=snap, segments=snap.segments + [seg])
    with pytest.raises(ConcurrentUpdateError):
        g.publish(g.read_rows(snap), parent=snap, segments=snap.segments)
    assert s.refresh() and s.snapshot.models == {refs["v1"]: 119, refs["v2"]: 1}
    assert s.search(x[:1], k=1).ids[0, 0] != 0


def test_missing_gallery_says_how_to_build_one(tmp_path):
    with pytest.raises(GalleryError, match="gallery build"):
        GallerySearcher(str(tmp_path / "nothing"), reload="off")


# ------------------------------------------------------------------ indexes
def _clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, d))
    return (centers[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def test_index_choice_by_size_and_recall_report():
    data = _clustered(4300)
    x, q = data[:4000], data[4000:]
    flat, rep = build_index(x, IndexConfig())
    assert rep.kind == "flat" and rep.recall_at_k == 1.0
    ivf, rep = build_index(x, IndexConfig(exact_max_rows=1000, target_recall=0.9))
    assert rep.kind == "ivf" and rep.params["nlist"] > 1 and "nprobe" in rep.params
    assert rep.recall_at_k >= 0.9 and rep.recall_queries == 500 and rep.tuning[-1]["recall"] == rep.recall_at_k
    assert "recall@10" in rep.summary()
    # The reported recall is what the index delivers on fresh queries from the same data.
    assert recall_at_k(ivf, x, q, 10) >= 0.85
    hnsw, rep = build_index(x, IndexConfig(kind="hnsw", hnsw_m=8, target_recall=0.9))
    assert rep.kind == "hnsw" and rep.params["efSearch"] >= 16 and rep.recall_at_k >= 0.9
    # A backfill chunk reuses the trained IVF cells.
    again, rep2 = build_index(x[::-1].copy(), IndexConfig(kind="ivf"), like=ivf)
    assert rep2.params["nlist"] == rep.params.get("nlist", ivf.nlist) or rep2.params["nlist"] == ivf.nlist


def test_approximate_gallery_records_its_recall(tmp_path, registry):
    reg, refs = registry
    x = _clustered(3000, d=DIM)
    snap = publish_embeddings(str(tmp_path / "g"), np.arange(3000), x, model_version=refs["v1"],
                              embedding_space="m@v1", index=IndexConfig(kind="ivf", target_recall=0.9))
    rep = Gallery(str(tmp_path / "g")).head().index_report
    assert rep.kind == "ivf" and rep.recall_at_k >= 0.9 and snap.index["path"].endswith("index.faiss")
    s = GallerySearcher(str(tmp_path / "g"), reload="off")
    assert s.info()["index"].startswith("ivf(")
    res = s.search(x[:50], k=1)
    assert (res.ids[:, 0] == np.arange(50)).mean() > 0.9


# ------------------------------------------------------------- curves, order
def test_backfill_curve_and_area():
    assert curve_auc([0, 0.5, 1], [0.2, 0.4, 0.6]) == pytest.approx(0.4)
    with pytest.raises(Exception, match="from 0 to 1"):
        curve_auc([0.1, 1], [0, 1])
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)
    after = np.eye(5)[y] + 0.05 * rng.normal(size=(100, 5))
    before = rng.normal(size=(100, 5))
    c = backfill_curve(after, before, after, y, rng.permutation(100), name="r")
    assert c.values[-1] == 1.0 and c.values[0] < 0.5 and 0 < c.normalized_auc < 1
    assert c.to_dict()["auc"] == pytest.approx(c.auc)


def test_uncertainty_scores_rank_least_confident_first():
    W = np.eye(3)
    emb = np.array([[5.0, 0, 0], [1.0, 0.9, 0], [0.3, 0.3, 0.3]])
    for kind in ("uncertainty", "entropy", "margin"):
        s = uncertainty_scores(emb, W, np.zeros(3), kind)
        assert np.argsort(-s).tolist() == [2, 1, 0], kind


def test_topk_overlap_and_hits_for_the_shadow_comparator(tmp_path, registry):
    from graceful_ray.retrieval import retrieval_hits, topk_overlap

    reg, refs = registry
    _, x = _gallery(tmp_path / "g", reg, refs, n=60)
    s = GallerySearcher(str(tmp_path / "g"), reload="off")
    a = s.search(x[:4], k=5)
    b = s.search(x[:4] + 0.01, k=5)
    assert topk_overlap(a, a).tolist() == [1.0] * 4
    assert topk_overlap(np.array([[1, 2, 3]]), np.array([[3, 9, 1]])).tolist() == [pytest.approx(2 / 3)]
    assert 0 <= topk_overlap(a, b).min() <= 1
    hits = retrieval_hits(a, np.arange(4) % 3, k=1)  # the top hit is the item itself, same label
    assert hits.tolist() == [True] * 4
