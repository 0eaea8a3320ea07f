"""``POST /v1/search`` on the live shadow service, over HTTP on loopback.

One module-scoped deployment on the session's Ray: primary emb@v1, shadow emb@v2
(BCT, v1's embedding space), over a gallery of the test split embedded by v1. Live:
the primary's top-k against the offline :class:`GallerySearcher`, the report's
overlap and hits against an offline computation, bad input, cutover and rollback,
the Parquet search log. Without a deployment (one deployment is what a 2-core machine
affords): a model outside the gallery's space (plain@v1) refused as the primary at
deploy time and skipped as the shadow, and the route's answer when no gallery is
configured (tests/test_serve.py checks that one over HTTP too).

The models are small MLPs trained in-process (``tests.helpers.fit_mlp``)
on the shared ``mnist1d_small`` dataset; every deployment asks for a fraction of a CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from graceful_ray.registry import Registry
from graceful_ray.serve.shadow_config import Batching, GateConfig, Resources, ShadowConfig
from tests.serve_harness import router_without_replica, serve_apps
from tests.helpers import fit_mlp

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOKEN = "search-admin-token-7c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
K = 5


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory, mnist1d_small):
    """emb@v1 (old data), emb@v2 (BCT child: v1's space), plain@v1 (its own space),
    and a gallery of the test split embedded by v1 (with its labels)."""
    from graceful_ray.data import load_split
    from graceful_ray.retrieval import build_gallery

    root = tmp_path_factory.mktemp("serve-search")
    reg = Registry(str(root / "registry"))
    x_old, y_old, _ = load_split(mnist1d_small, "old_train")
    x, y, _ = load_split(mnist1d_small, "train")
    spec, m1 = fit_mlp(x_old, y_old, 0, epochs=8)
    v1 = reg.publish("emb", m1, spec=spec, classes=list(range(10)))
    spec, m2 = fit_mlp(x, y, 1, epochs=8)
    v2 = reg.publish("emb", m2, spec=spec, classes=list(range(10)), parent=v1.ref, method="bct",
                     compatible_with_parent=True)
    spec, mp = fit_mlp(x, y, 2, epochs=3)
    p = reg.publish("plain", mp, spec=spec, classes=list(range(10)), parent=v1.ref,
                    method="plain")
    gallery = str(root / "gallery")
    build_gallery(gallery, mnist1d_small, "test", registry=reg.uri, model=v1.ref,
                  engine="local")
    xq, yq, _ = load_split(mnist1d_small, "val")  # queries: not in the gallery
    return {"root": root, "reg": reg, "registry": reg.uri, "v1": v1.ref, "v2": v2.ref,
            "p": p.ref, "gallery": gallery, "x": xq.reshape(len(xq), -1), "y": yq}


def _config(world, name: str, prefix: str, candidate: str, **kw) -> ShadowConfig:
    small = Resources(num_cpus=0.1, max_ongoing_requests=64)
    base = dict(registry=world["registry"], baseline=world["v1"], candidate=candidate,
                storage=str(world["root"] / f"log-{name}"), app_name=name, route_prefix=prefix,
                shadow_fraction=1.0, max_inputs_per_request=16, gallery=world["gallery"],
                search_k=K, max_search_k=50, production_alias=None,
                primary_batching=Batching(16, 0.002), shadow_batching=Batching(16, 0.002),
                router=Resources(num_cpus=0.2), baseline_resources=small,
                candidate_resources=small, comparator=small, flush_interval_s=1.0,
                shadow_timeout_s=20.0, gates=GateConfig(min_labelled=20, min_latency_samples=5))
    base.update(kw)
    return ShadowConfig(**base).with_admin_token(TOKEN)


@pytest.fixture(scope="module")
def service(ray_module, world):
    with serve_apps(_config(world, "search", "/", world["v2"]), timeout_s=60.0) as svc:
        yield svc


@pytest.fixture(scope="module")
def offline(world):
    """What the retrieval package answers offline, per model, for the query rows."""
    from graceful_ray.retrieval import GallerySearcher

    out = {}
    for ref in (world["v1"], world["v2"]):
        s = GallerySearcher(world["gallery"], registry=world["registry"], query_model=ref,
                            reload="off")
        out[ref] = s.embed_and_search(world["x"], k=K)
        s.close()
    return out


# ------------------------------------------------------------------- tests
def test_primary_topk_is_what_the_gallery_searcher_returns(service, world, offline):
    x, want = world["x"], offline[world["v1"]]
    one = service.search("search", x[0])  # one sample, the default k
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"] == world["v1"] and body["k"] == K
    assert body["ids"] == want.ids[0].tolist() and body["request_id"]
    assert body["scores"] == pytest.approx(want.scores[0].tolist(), abs=1e-4)
    results = service.search_all("search", x[1:12])
    assert [r["ids"] for r in results] == want.ids[1:12].tolist()
    for r, s in zip(results, want.scores[1:12]):
        assert r["scores"] == pytest.approx(s.tolist(), abs=1e-4)
    assert len({r["request_id"] for r in results} | {body["request_id"]}) == 12
    r = service.search("search", x[:2], k=3)
    assert r.status_code == 200 and r.json()["k"] == 3
    assert [x["ids"] for x in r.json()["results"]] == want.ids[:2, :3].tolist()


def test_report_overlap_and_hits_match_an_offline_computation(service, world, offline):
    from graceful_ray.retrieval import retrieval_hits, topk_overlap

    before = service.settled("search")
    sl = slice(12, 52)
    x, y = world["x"][sl], world["y"][sl]
    a, b = offline[world["v1"]], offline[world["v2"]]
    results = service.search_all("search", x)
    assert [r["ids"] for r in results] == a.ids[sl].tolist()
    mid = service.settled("search")
    ids = [r["request_id"] for r in results]
    r = service.client.post(service.url("search", "/v1/feedback"), json={
        "labels": [{"request_id": i, "label": int(v)} for i, v in zip(ids, y)]})
    assert r.status_code == 200 and r.json()["status_counts"] == {"200": 40}, r.text
    answers = r.json()["results"]
    assert all(res["kind"] == "search" for res in answers)
    after = service.report("search")
    ret0, ret = before["retrieval"], after["retrieval"]

    # overlap: the sum of per-query overlaps is mean x compared
    ov = topk_overlap(a.ids[sl], b.ids[sl])
    assert ret["compared"] - ret0["compared"] == 40
    total = lambda rep: (rep["mean_topk_overlap"] or 0.0) * rep["compared"]  # noqa: E731
    assert total(ret) - total(ret0) == pytest.approx(ov.sum(), abs=1e-6)
    # hits over the labelled pairs: top-1 and top-k, for both models
    for ref, role in ((world["v1"], "baseline"), (world["v2"], "candidate")):
        res = offline[ref]
        sub = type(res)(ids=res.ids[sl], scores=res.scores[sl],
                        model_versions=res.model_versions[sl], labels=res.labels[sl],
                        snapshot=res.snapshot, embedding_space=res.embedding_space, k=res.k)
        h1, hk = retrieval_hits(sub, y, k=1), retrieval_hits(sub, y)
        m0, m = ret0["models"][role], ret["models"][role]
        assert m["hit_top1"]["count"] - m0["hit_top1"]["count"] == int(h1.sum()), role
        assert m["hit_topk"]["count"] - m0["hit_topk"]["count"] == int(hk.sum()), role
        assert [res_[f"{role}_hit"] for res_ in answers] == h1.tolist()
    b1 = retrieval_hits(a, world["y"], k=1)[sl]
    c1 = retrieval_hits(b, world["y"], k=1)[sl]
    assert ret["labelled_pairs"] - ret0["labelled_pairs"] == 40
    assert ret["top1_negative_flips"] - ret0["top1_negative_flips"] == int((b1 & ~c1).sum())
    assert ret["top1_positive_flips"] - ret0["top1_positive_flips"] == int((~b1 & c1).sum())
    assert ret["models"]["candidate"]["shadow_errors"]["count"] == 0
    # predict's comparison is untouched by searches and their labels
    for key in ("requests", "compared", "labelled", "labelled_pairs", "negative_flips",
                "positive_flips"):
        assert after[key] == mid[key] == before[key] == 0, key


def test_bad_search_input_gets_4xx_and_the_service_keeps_serving(service, world):
    c, url = service.client, service.url("search", "/v1/search")
    good = world["x"][0].tolist()
    nan = json.dumps({"inputs": [[float("nan")] + good[1:]]})  # Python's json writes NaN
    cases = [
        (c.post(url, json={"inputs": [good[:39]]}), 422, "40"),
        (c.post(url, json={"inputs": [["x"] * 40]}), 422, "numbers"),
        (c.post(url, json={"inputs": [good, [1.0]]}), 422, "input 1"),
        (c.post(url, content=nan, headers={"content-type": "application/json"}), 422, "NaN"),
        (c.post(url, json={"inputs": [good], "k": 0}), 422, "between 1 and 50"),
        (c.post(url, json={"inputs": [good], "k": 51}), 422, "max_search_k"),
        (c.post(url, json={"inputs": [good], "k": "5"}), 422, "k"),
        (c.post(url, json={"inputs": [good], "k": 2.5}), 422, "k"),
        (c.post(url, json={"inputs": [good] * 17}), 413, "too many"),
        (c.post(url, json={"inputs": []}), 422, "empty"),
        (c.post(url, json={"query": good}), 422, "query"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert words in r.text, r.text
    assert service.search("search", world["x"][1]).status_code == 200


def test_without_a_gallery_search_says_how_to_enable_it():
    import asyncio

    from fastapi import HTTPException

    from graceful_ray.serve.prometheus import RouterMetrics
    from graceful_ray.serve.schemas import SearchRequest

    router = router_without_replica()  # the route's own logic
    router._cfg = ShadowConfig(registry="reg", baseline="m@v1", candidate="m@v2", storage="log")
    router._started = True
    router._metrics = RouterMetrics("unit")
    with pytest.raises(HTTPException) as e:
        asyncio.run(router.search(SearchRequest(inputs=[[0.0] * 40])))
    assert e.value.status_code == 404
    assert "--gallery" in e.value.detail and "gallery build" in e.value.detail


def test_a_model_outside_the_gallery_space(world, tmp_path):
    from graceful_ray.retrieval import EmbeddingSpaceError
    from graceful_ray.serve.app import build_app
    from graceful_ray.serve.comparator import ComparatorCore
    from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE
    from graceful_ray.serve.kinds import PrimaryEvent, ShadowEvent
    from graceful_ray.serve.gallery_search import SearchAnswer, SearchBackend

    # as the primary: refused at deploy time, before anything starts
    with pytest.raises(EmbeddingSpaceError, match="may not search"):
        build_app(_config(world, "refused", "/refused", world["v1"], baseline=world["p"]))
    # as the shadow: its backend answers "refused" with the registry's reason...
    backend = SearchBackend(world["gallery"], world["registry"], world["p"], poll_s=60)
    answer = backend.search(lambda x: x, world["x"][:2], K)
    assert answer.ids is None and world["p"] in answer.refused
    assert "may not search" in answer.refused and backend.status()["searchable"] is False
    # ...which the comparator counts as skipped, not as a shadow error
    cfg = _config(world, "unit", "/", world["p"], storage=str(tmp_path / "log"))
    core = ComparatorCore(cfg, {BASELINE: world["v1"], CANDIDATE: world["p"]}, list(range(10)))
    top = np.arange(2 * K).reshape(2, K)
    primary = SearchAnswer(ids=top, scores=np.ones((2, K), np.float32), labels=top % 10,
                           snapshot=1, k=K)
    core.ingest([PrimaryEvent(kind="search", ids=["a", "b"], time_ms=0, epoch=0, role=BASELINE,
                              answer=primary, ms=1.0, shadowed=True),
                 ShadowEvent(kind="search", ids=["a", "b"], role=CANDIDATE,
                             skipped=answer.refused)])
    ret = core.report()["retrieval"]
    cand = ret["models"]["candidate"]
    assert ret["searches"] == 2 and ret["compared"] == 0 and cand["shadow_searches"] == 2
    assert cand["skipped"]["count"] == 2 and cand["shadow_errors"]["count"] == 0
    assert cand["skipped"]["reasons"][0]["reason"] == answer.refused
    assert core.report()["models"]["candidate"]["shadow_errors"]["count"] == 0
    assert core.label("a", 0)["flip"] == "unpaired"


def test_cutover_makes_the_candidate_answer_searches_and_rollback_undoes_it(service, world,
                                                                          offline):
    x = world["x"][60:66]
    r = service.client.post(service.url("search", "/v1/admin/cutover"), headers=AUTH,
                            json={"force": True, "reason": "search test"})
    assert r.status_code == 200, r.text
    before = service.settled("search")
    results = service.search_all("search", x)
    r = service.search("search", x[0])
    assert r.json()["model"] == world["v2"]
    assert [res["ids"] for res in results] == offline[world["v2"]].ids[60:66].tolist()
    after = service.settled("search")
    base0, base = (rep["retrieval"]["models"]["baseline"] for rep in (before, after))
    assert base["shadow_searches"] - base0["shadow_searches"] == 7  # v1 is the shadow now
    assert base["answered"] - base0["answered"] == 7
    r = service.client.post(service.url("search", "/v1/admin/rollback"), headers=AUTH, json={})
    assert r.status_code == 200, r.text
    assert service.search("search", x[0]).json()["model"] == world["v1"]


def test_search_records_are_in_parquet(service, world):
    from graceful_ray.serve.comparison_log import SEARCHES_DIR, RecordLog

    rep = service.settled("search")
    r = service.client.post(service.url("search", "/v1/admin/flush"), headers=AUTH)
    assert r.status_code == 200, r.text
    log = RecordLog(service.configs["search"].storage)
    table = log.read_table(SEARCHES_DIR)
    assert table is not None
    assert table.num_rows == service.searched["search"] == rep["retrieval"]["searches"]
    assert len(set(table.column("request_id").to_pylist())) == table.num_rows
    assert set(table.column("primary_ref").to_pylist()) == {world["v1"], world["v2"]}
    labelled = [v for v in table.column("label").to_pylist() if v is not None]
    late = log.read_table("labels")
    assert len(labelled) + (0 if late is None else late.num_rows) >= 40
    row = table.filter(table.column("overlap").is_valid()).slice(0, 1).to_pylist()[0]
    assert len(row["baseline_ids"]) == row["k"] and len(row["candidate_ids"]) == row["k"]


def test_cli_and_job_flags_set_the_gallery(tmp_path):
    import argparse

    from graceful_ray.errors import ConfigError
    from graceful_ray.serve.cli import add_serve_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)  # the options of `graceful-ray serve` and jobs/deploy_shadow.py
    base = ["--old", "m@v1", "--new", "m@v2", "--registry", str(tmp_path / "reg")]
    cfg = config_from_args(p.parse_args(base + ["--gallery", "s3://b/g", "--search-k", "20"]))
    assert (cfg.gallery, cfg.search_k, cfg.max_search_k) == ("s3://b/g", 20, 100)
    assert config_from_args(p.parse_args(base)).gallery is None
    assert config_from_args(p.parse_args(base + ["--search-k", "500"])).max_search_k == 500
    with pytest.raises(ConfigError, match="search_k"):
        config_from_args(p.parse_args(base + ["--search-k", "0"]))
    with pytest.raises(ConfigError, match="must not exceed"):
        ShadowConfig(registry="r", baseline="m@v1", candidate="m@v2", storage="s", search_k=20,
                     max_search_k=10)
