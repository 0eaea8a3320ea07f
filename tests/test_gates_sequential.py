"""The gates' statistics: anytime-valid confidence sequences, the label-free
bound, slices with Bonferroni, and the watch after cutover (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import beta as beta_dist

from graceful_ray.errors import MetricsError
from graceful_ray.metrics.intervals import Rate, wilson_interval
from graceful_ray.metrics.sequential import (
    MIXTURE_KAPPA,
    MIXTURE_RHO,
    confidence_sequence,
    log_mixture_upper,
    lower_bound,
    rejects_above,
    upper_bound,
)
from graceful_ray.serve.shadow_config import BASELINE, CANDIDATE, GateConfig
from graceful_ray.serve.gates import evaluate, slice_verdicts, watch
from graceful_ray.serve.kinds import PrimaryEvent, ShadowEvent
from graceful_ray.serve.stats import ShadowStats


# ------------------------------------------------------------ the sequence
def test_sequence_contains_the_point_and_is_wider_than_wilson():
    for s, n in [(0, 50), (3, 200), (20, 1000), (500, 1000), (990, 1000), (200, 20000)]:
        lo, hi = confidence_sequence(s, n, 0.95)
        w_lo, w_hi = wilson_interval(s, n, 0.95)
        assert lo <= s / n <= hi
        # valid at every n at once costs width at any one n
        assert lo <= w_lo + 1e-12 and hi >= w_hi - 1e-12, (s, n)
    assert confidence_sequence(0, 0) == (0.0, 1.0)
    assert upper_bound(7, 7, 0.025) == 1.0


def test_sequence_is_monotone_in_alpha_and_shrinks_with_n():
    highs = [upper_bound(10, 1000, a) for a in (0.001, 0.01, 0.025, 0.1, 0.3)]
    assert highs == sorted(highs, reverse=True) and len(set(highs)) == len(highs)
    lows = [lower_bound(10, 1000, a) for a in (0.001, 0.01, 0.025, 0.1, 0.3)]
    assert lows == sorted(lows)
    widths = [np.subtract(*confidence_sequence(n // 50, n)[::-1]) for n in (200, 2000, 20000)]
    assert widths[0] > widths[1] > widths[2]


def test_bound_and_test_agree():
    """The gate's vectorised test is exactly the bound's inversion."""
    for s, n in [(2, 500), (10, 1000), (30, 1000), (100, 5000)]:
        u = upper_bound(s, n, 0.025)
        assert not rejects_above(s, n, u * (1 - 1e-9), 0.025)
        assert rejects_above(s, n, min(u * (1 + 1e-9), 1.0), 0.025)
        assert log_mixture_upper(s, n, s / n) <= 1e-12  # the MLE is never rejected


def test_mixture_matches_its_continuous_integral():
    """The discretised Beta mixing law is (to well under a nat) the continuous
    mixture of Robbins / Howard et al.: log E_w[LR(p0 - p0 w)] by quadrature."""
    a, b = MIXTURE_RHO * MIXTURE_KAPPA, (1 - MIXTURE_RHO) * MIXTURE_KAPPA
    for s, n, p0 in [(5, 1000, 0.02), (10, 1000, 0.02), (0, 300, 0.01), (40, 2000, 0.03)]:
        f = n - s

        def integrand(w):
            return math.exp(s * math.log1p(-w) + f * math.log1p(p0 * w / (1 - p0))) \
                * beta_dist.pdf(w, a, b)

        exact = math.log(integrate.quad(integrand, 0, 1, limit=200)[0])
        assert log_mixture_upper(s, n, p0) == pytest.approx(exact, abs=0.05)


def test_time_uniform_coverage_by_simulation():
    """Looked at after *every* observation, the true rate leaves the 95% sequence
    in <= 5% of streams (each end <= 2.5%); Wilson, looked at as often, fails
    far more often. 400 streams x 3000 observations, rates near 0, mid, near 1."""
    rng = np.random.default_rng(7)
    for p in (0.02, 0.3):
        x = rng.random((400, 3000)) < p
        s = x.cumsum(axis=1)
        n = np.arange(1, 3001)
        looks = np.arange(9, 3000, 10)  # every 10th: same stopping sets at 1/10 the cost
        above = np.zeros(400, bool)
        below = np.zeros(400, bool)
        for j in looks:
            above |= rejects_above(s[:, j], np.full(400, n[j]), p, 0.025)
            below |= rejects_above(n[j] - s[:, j], np.full(400, n[j]), 1 - p, 0.025)
        assert above.mean() <= 0.025 + 0.02 and below.mean() <= 0.025 + 0.02, (p, above.mean(),
                                                                                 below.mean())
        wilson_missed = np.zeros(400, bool)
        for j in looks:
            for i in range(400):
                lo, hi = wilson_interval(int(s[i, j]), int(n[j]))
                wilson_missed[i] |= not lo <= p <= hi
        assert wilson_missed.mean() > above.mean() + below.mean() + 0.05


def test_rate_keeps_wilson_labelled_fixed_sample_beside_the_sequence():
    d = Rate.anytime(10, 1000).to_dict()
    assert (d["low"], d["high"]) == pytest.approx(wilson_interval(10, 1000))
    assert "fixed-sample" in d["interval"]
    assert d["sequence"]["high"] == pytest.approx(upper_bound(10, 1000, 0.025))
    assert "sequence" not in Rate.of(10, 1000).to_dict()
    with pytest.raises(MetricsError, match="cannot exceed"):
        upper_bound(5, 4, 0.05)
    with pytest.raises(MetricsError, match="alpha"):
        upper_bound(1, 4, 1.5)


# ---------------------------------------------------------------- gates
def _stats(n, *, disagree_every=0, flip_every=0, labels=True, segment=None, label_of=None):
    """n compared pairs; every ``disagree_every``-th disagrees; of the labelled,
    every ``flip_every``-th is a negative flip (the candidate errs)."""
    stats = ShadowStats()
    add_rows(stats, n, disagree_every=disagree_every, flip_every=flip_every, labels=labels,
             segment=segment, label_of=label_of)
    return stats


def add_rows(stats, n, *, disagree_every=0, flip_every=0, labels=True, segment=None,
             label_of=None, start=0):
    for i in range(start, start + n):
        y = (i % 10) if label_of is None else label_of(i)
        b, c = y, y
        if flip_every and i % flip_every == 0:
            c = (y + 1) % 10
        elif disagree_every and i % disagree_every == 0:
            b, c = (y + 1) % 10, (y + 2) % 10  # both wrong: a disagreement, no flip
        seg = segment(i) if callable(segment) else segment
        stats.add_record(BASELINE, {BASELINE: b, CANDIDATE: c}, {BASELINE: 1.0, CANDIDATE: 1.0},
                         True, None, seg)
        if labels:
            stats.add_label(b, c, y, seg)


def _check(g, name):
    return next(c for c in g["checks"] if c["name"] == name)


GATES = dict(min_labelled=200, max_nfr=0.02, min_agreement=0.9, min_latency_samples=1,
             max_error_rate=0.05)


def test_label_free_bound_lets_a_near_identical_candidate_pass_without_labels():
    # 3000 identical answers, no label: disagreement 0/3000 bounds the NFR below 2%
    s = _stats(3000, labels=False).summary()
    assert s["disagreement"]["count"] == 0 and s["labelled_pairs"] == 0
    g = evaluate(s, GateConfig(**GATES))
    assert g["passed"], g["failing"]
    assert "waived" in _check(g, "min_labelled")["detail"]
    # too few compared pairs: the label-free route is closed, labels are needed
    g = evaluate(_stats(150, labels=False).summary(), GateConfig(**GATES))
    assert {"min_labelled", "max_nfr"} <= set(g["failing"])
    # a candidate that disagrees 5% of the time needs labels to show its NFR
    s = _stats(3000, disagree_every=20, labels=False).summary()
    g = evaluate(s, GateConfig(**GATES))
    assert "max_nfr" in g["failing"]
    # ... and passes once the labels show the disagreements are not negative flips
    s = _stats(3000, disagree_every=20).summary()
    assert evaluate(s, GateConfig(**GATES))["passed"]


def test_max_disagreement_gate():
    s = _stats(3000, disagree_every=20, labels=False).summary()
    g = evaluate(s, GateConfig(**GATES, max_disagreement=0.03))
    assert "max_disagreement" in g["failing"]
    g = evaluate(s, GateConfig(**GATES, max_disagreement=0.08))
    assert _check(g, "max_disagreement")["passed"]
    assert _check(g, "max_disagreement")["observed"] == s["disagreement"]["sequence"]["high"]


def test_gate_uses_the_sequence_not_wilson():
    # 10 flips in 1000: Wilson's upper end passes a 2% budget, the sequence's does not
    s = _stats(1000, flip_every=100).summary()
    assert s["nfr"]["high"] < 0.02 < s["nfr"]["sequence"]["high"]
    g = evaluate(s, GateConfig(**GATES))
    assert "max_nfr" in g["failing"]
    assert _check(g, "max_nfr")["observed"] == s["nfr"]["sequence"]["high"]


def test_slices_per_class_and_segment_with_bonferroni():
    # class 3 in segment "eu" regresses: every "eu" row of class 3 is a negative flip
    stats = ShadowStats()
    seg = lambda i: "eu" if i % 2 else "us"  # noqa: E731
    add_rows(stats, 4000, segment=seg)
    for i in range(300):  # class 3, segment eu: candidate wrong
        stats.add_record(BASELINE, {BASELINE: 3, CANDIDATE: 4}, {BASELINE: 1.0, CANDIDATE: 1.0},
                         True, None, "eu")
        stats.add_label(3, 4, 3, "eu")
    s = stats.summary()
    assert set(s["per_segment"]) == {"eu", "us"}
    eu, us = s["per_segment"]["eu"], s["per_segment"]["us"]
    assert eu["negative_flips"] == 300 and us["negative_flips"] == 0
    assert eu["labelled"] == 2300 and eu["compared"] == 2300
    assert "sequence" in eu["nfr"] and "sequence" in eu["agreement"]
    assert s["per_class"]["3"]["negative_flips"] == 300 and "agreement" in s["per_class"]["3"]
    cfg = GateConfig(**GATES, max_slice_nfr=0.05, min_slice_labelled=100)
    v = slice_verdicts(s, cfg)
    m = len(v["slices"])
    assert m == 12  # 10 classes + 2 segments
    assert v["alpha_per_slice"] == pytest.approx(0.025 / m)
    assert [x["slice"] for x in v["slices"][:2]] == ["class=3", "segment=eu"]  # worst first
    assert {x["slice"] for x in v["slices"] if x["regressed"]} == {"class=3", "segment=eu"}
    g = evaluate(s, cfg)
    assert "max_slice_nfr" in g["failing"] and "Bonferroni over 12" in _check(
        g, "max_slice_nfr")["detail"]
    # the Bonferroni lower bound is the one-sided bound at alpha / m
    x = v["slices"][0]
    assert x["nfr_low"] == pytest.approx(lower_bound(x["negative_flips"], x["labelled"],
                                                     0.025 / m))
    # slices below min_slice_labelled are not judged
    assert slice_verdicts(s, GateConfig(**GATES, max_slice_nfr=0.05,
                                        min_slice_labelled=10_000))["slices"] == []


def test_watch_rolls_back_only_when_the_regression_is_shown():
    cfg = GateConfig(**GATES, auto_rollback=True)
    fine = _stats(2000, flip_every=200)  # 0.5% NFR: no rollback
    assert not watch(fine.summary(), cfg)["rollback"]
    bad = _stats(2000, flip_every=200)
    add_rows(bad, 600, label_of=lambda i: 7, flip_every=1, start=2000)  # class 7 regresses
    w = watch(bad.summary(), cfg)
    assert w["rollback"] and "lower bound" in w["reasons"][0]
    # few labels of a regression are not yet proof
    few = _stats(300, flip_every=50)
    assert not watch(few.summary(), cfg)["rollback"]


def test_gate_config_validates_new_fields():
    from graceful_ray.errors import ConfigError

    for bad in ({"max_disagreement": 2}, {"max_slice_nfr": -0.1}, {"auto_rollback": "yes"},
                {"min_slice_labelled": -1}, {"min_compared": 1.5}):
        with pytest.raises(ConfigError):
            GateConfig.from_dict(bad)
    g = GateConfig.from_dict({"max_slice_nfr": 0.05, "auto_rollback": True})
    assert g.max_slice_nfr == 0.05 and g.auto_rollback and g.max_disagreement is None


# ------------------------------------------- the watch in the comparator
def test_auto_rollback_after_a_cutover_that_regresses_on_one_class(tmp_path):
    """Cut over to a candidate that is fine on the first traffic, then wrong on
    class 7: the comparator rolls back by itself, says why in the history, and
    every record served (before, during and after) reaches the Parquet log."""
    import asyncio

    from graceful_ray.serve.comparator import Comparator
    from graceful_ray.serve.shadow_config import ShadowConfig
    from graceful_ray.serve.comparison_log import RECORDS_DIR, RecordLog

    gates = GateConfig(**GATES, auto_rollback=True, max_slice_nfr=0.05, min_slice_labelled=50)
    config = ShadowConfig(registry=str(tmp_path / "reg"), baseline="m@v1", candidate="m@v2",
                          storage=str(tmp_path / "log"), gates=gates, production_alias=None,
                          background_nice=0, feedback_grace_s=0.0)
    comparator = Comparator.func_or_class(config, {BASELINE: "m@v1", CANDIDATE: "m@v2"},
                                          list(range(10)))
    served = 0

    async def traffic(n, epoch, primary, wrong_on=None):
        nonlocal served
        ids = [f"r{served + i}" for i in range(n)]
        y = np.array([(served + i) % 10 for i in range(n)])
        cand = np.where(y == wrong_on, (y + 1) % 10, y) if wrong_on is not None else y
        mine, other = (cand, y) if primary == CANDIDATE else (y, cand)
        shadow = BASELINE if primary == CANDIDATE else CANDIDATE
        await comparator.ingest([
            PrimaryEvent(kind="predict", ids=ids, time_ms=0, epoch=epoch, role=primary,
                         answer=mine, ms=1.0, shadowed=True, segment="eu"),
            ShadowEvent(kind="predict", ids=ids, role=shadow, answer=other, ms=1.0)])
        served += n
        return await comparator.feedback(list(zip(ids, y.tolist())))

    async def scenario():
        await traffic(3000, 0, BASELINE)  # identical answers: the gates pass
        cut = await comparator.cutover(reason="test")
        assert cut["status"] == 200, cut["detail"]
        epoch = cut["epoch"]
        results = await traffic(1000, epoch, CANDIDATE)  # still fine after the cutover
        assert all(r["status"] == 200 for r in results)
        assert comparator._core.state["primary"] == CANDIDATE
        report = await comparator.report()
        assert report["watch"]["rollback"] is False and report["watch"]["labelled_pairs"] == 1000
        for _ in range(20):  # then class 7 goes wrong, 100 rows at a time
            results = await traffic(100, epoch, CANDIDATE, wrong_on=7)
            assert all(r["status"] == 200 for r in results)
            if comparator._core.state["primary"] == BASELINE:
                break
        state = comparator._core.state
        assert state["primary"] == BASELINE, "no automatic rollback"
        last = state["history"][-1]
        assert last["action"] == "auto_rollback" and last["reason"].startswith("auto_rollback: ")
        assert "class=7" in last["reason"] or "NFR since the cutover" in last["reason"]
        flushed = await comparator.flush(include_open=True)
        assert flushed["status"] == 200
        comparator._loop_task.cancel()
        return served

    n = asyncio.run(scenario())
    table = RecordLog(str(tmp_path / "log")).read_table(RECORDS_DIR, ["request_id", "segment"])
    ids = table.column("request_id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n  # no record lost, none twice
    assert set(table.column("segment").to_pylist()) == {"eu"}


# ---------------------------------------------------------------- segments
def test_segment_is_validated_at_the_edge():
    from pydantic import ValidationError

    from graceful_ray.serve.schemas import PredictRequest, SearchRequest

    assert PredictRequest(input=[1.0], segment="eu-mobile:tier/2").segment == "eu-mobile:tier/2"
    assert PredictRequest(input=[1.0]).segment is None
    for bad in ("", "x" * 65, "eu mobile", "é", "a\nb", 7):
        with pytest.raises(ValidationError):
            PredictRequest(input=[1.0], segment=bad)
    with pytest.raises(ValidationError):  # search has no segment (its stats have no slices)
        SearchRequest(input=[1.0], segment="eu")


def test_segment_is_logged_and_restored(tmp_path):
    from graceful_ray.serve.comparator import ComparatorCore
    from graceful_ray.serve.shadow_config import ShadowConfig

    config = ShadowConfig(registry=str(tmp_path / "reg"), baseline="m@v1", candidate="m@v2",
                          storage=str(tmp_path / "log"))
    refs = {BASELINE: "m@v1", CANDIDATE: "m@v2"}
    core = ComparatorCore(config, refs, list(range(10)))
    ids = [f"r{i}" for i in range(6)]
    core.ingest([PrimaryEvent(kind="predict", ids=ids[:3], time_ms=0, epoch=0, role=BASELINE,
                              answer=np.array([1, 2, 3]), ms=1.0, shadowed=True, segment="eu"),
                 PrimaryEvent(kind="predict", ids=ids[3:], time_ms=0, epoch=0, role=BASELINE,
                              answer=np.array([1, 2, 3]), ms=1.0, shadowed=True),
                 ShadowEvent(kind="predict", ids=ids, role=CANDIDATE,
                             answer=np.array([1, 2, 4, 1, 2, 4]), ms=1.0)])
    for rid, y in zip(ids, [1, 2, 3, 1, 2, 3]):
        assert core.label(rid, y)["status"] == 200
    before = core.stats.summary()["per_segment"]
    assert before["eu"]["compared"] == 3 and before["eu"]["negative_flips"] == 1
    assert set(before) == {"eu"}  # rows without a segment are in no segment slice
    cols, labels = core.take_pending()
    assert cols["predict"]["segment"] == ["eu"] * 3 + [None] * 3
    core.write(cols, labels)
    restarted = ComparatorCore(config, refs, list(range(10)))
    assert restarted.stats.summary()["per_segment"] == before


def test_readme_gate_flags_parse():
    from graceful_ray.keyvalue import parse_gates

    g = GateConfig.from_dict(parse_gates(["auto_rollback=true", "max_slice_nfr=0.05",
                                           "max_disagreement=null", "min_compared=500"]))
    assert g.auto_rollback and g.max_slice_nfr == 0.05 and g.max_disagreement is None
    assert g.min_compared == 500
