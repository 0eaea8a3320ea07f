"""Intervals, flip metrics, compatibility summaries and the flip report, on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from graceful_ray.errors import GracefulRayError, MetricsError
from graceful_ray.metrics import (
    CompatibilityMatrix,
    FlipMetrics,
    Rate,
    compatibility_matrix,
    compatibility_scores,
    flip_metrics,
    flip_report,
    is_compatible,
    m_score,
    update_gain,
    wilson_interval,
)

# -- Wilson interval -----------------------------------------------------------


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    # Newcombe (1998), Stat. Med. 17:857, method 3 examples.
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
])
def test_wilson_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges_and_confidence():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo95, hi95 = wilson_interval(5, 10)
    lo99, hi99 = wilson_interval(5, 10, confidence=0.99)
    assert lo99 < lo95 and hi99 > hi95
    assert wilson_interval(np.int64(3), np.int64(7)) == wilson_interval(3, 7)


@pytest.mark.parametrize("args", [(11, 10), (-1, 10), (1, -2), (1.5, 10), (1, 10, 1.0),
                                  (1, 10, 0.0), (True, 10)])
def test_wilson_rejects_bad_input(args):
    with pytest.raises(MetricsError):
        wilson_interval(*args)


def test_rate_of_and_to_dict():
    r = Rate.of(5, 10)
    assert (r.count, r.total, r.value) == (5, 10, 0.5)
    assert (r.low, r.high) == wilson_interval(5, 10)
    assert r.to_dict() == {"count": 5, "total": 10, "value": 0.5, "low": r.low, "high": r.high}
    empty = Rate.of(0, 0)
    assert math.isnan(empty.value) and (empty.low, empty.high) == (0.0, 1.0)
    assert json.loads(json.dumps(empty.to_dict(), allow_nan=False))["value"] is None
    with pytest.raises(Exception):  # frozen
        r.count = 3  # type: ignore[misc]


# -- flip metrics ----------------------------------------------------------------

# Hand case: old right at 0,1,2,4,6; new right at 0,2,3.
#   negative flips at 1,4,6 (3); positive flip at 3 (1); both wrong at 5 (1).
Y = [0, 1, 2, 2, 1, 0, 3]
OLD = [0, 1, 2, 1, 1, 1, 3]
NEW = [0, 2, 2, 2, 0, 1, 1]


def test_flip_metrics_hand_case():
    m = flip_metrics(Y, OLD, NEW)
    assert isinstance(m, FlipMetrics) and m.n == 7
    expect = {"error_rate_old": (2, 7), "error_rate_new": (4, 7), "nfr": (3, 7), "pfr": (1, 7),
              "nfi": (3, 4), "pfi": (1, 3), "btc": (2, 5), "bec": (1, 2)}
    for name, (count, total) in expect.items():
        rate = getattr(m, name)
        assert (rate.count, rate.total) == (count, total), name
        assert rate.value == pytest.approx(count / total)
        assert rate.low <= rate.value <= rate.high
    # (3/7) / ((5/7) * (4/7)) = 21/20
    assert m.relative_nfr == pytest.approx(1.05)
    assert (m.negative_flips, m.positive_flips) == (3, 1)


def test_flip_metrics_accepts_numpy_and_torch():
    a = flip_metrics(np.array(Y), np.array(OLD, dtype=np.int32), np.array(NEW, dtype=np.uint8))
    b = flip_metrics(torch.tensor(Y), torch.tensor(OLD), torch.tensor(NEW))
    assert a == b == flip_metrics(Y, OLD, NEW)


def test_flip_metrics_identities_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 400))
        y = rng.integers(0, 5, n)
        old = np.where(rng.random(n) < 0.6, y, rng.integers(0, 5, n))
        new = np.where(rng.random(n) < 0.7, y, rng.integers(0, 5, n))
        m = flip_metrics(y, old, new)
        acc_old = 1 - m.error_rate_old.value
        if m.btc.total:  # DESIGN identity: NFR = Acc_old * (1 - BTC)
            assert m.nfr.value == pytest.approx(acc_old * (1 - m.btc.value))
        else:
            assert m.nfr.count == 0
        # ER_new - ER_old = NFR - PFR, and the independent-errors denominator.
        assert m.error_rate_new.value - m.error_rate_old.value == pytest.approx(
            m.nfr.value - m.pfr.value)
        denom = acc_old * m.error_rate_new.value
        if denom:
            assert m.relative_nfr == pytest.approx(m.nfr.value / denom)
        else:
            assert math.isnan(m.relative_nfr)


def test_flip_metrics_degenerate_denominators_are_nan_not_errors():
    perfect = flip_metrics([0, 1, 2], [0, 1, 2], [0, 1, 2])
    assert perfect.nfr.count == 0 and math.isnan(perfect.relative_nfr)
    assert math.isnan(perfect.nfi.value) and math.isnan(perfect.bec.value)
    d = perfect.to_dict()
    assert d["relative_nfr"] is None and d["nfi"]["value"] is None
    json.dumps(d, allow_nan=False)


def test_flip_metrics_to_dict_is_json():
    d = flip_metrics(Y, OLD, NEW).to_dict()
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["nfr"]["count"] == 3 and back["n"] == 7
    assert set(back) == {"n", "error_rate_old", "error_rate_new", "nfr", "pfr", "nfi", "pfi",
                         "btc", "bec", "relative_nfr"}


@pytest.mark.parametrize("y, old, new, match", [
    ([0, 1], [0, 1, 1], [0, 1], "same length"),
    ([[0, 1]], [[0, 1]], [[0, 1]], "1-D"),
    ([0.0, 1.0], [0, 1], [0, 1], "integer"),
    ([], [], [], "empty"),
])
def test_flip_metrics_validation(y, old, new, match):
    with pytest.raises(MetricsError, match=match) as info:
        flip_metrics(np.array(y), np.array(old), np.array(new))
    assert isinstance(info.value, ValueError) and isinstance(info.value, GracefulRayError)


# -- compatibility ---------------------------------------------------------------


def test_is_compatible_is_strict():
    assert is_compatible(0.61, 0.60)
    assert not is_compatible(0.60, 0.60)
    assert not is_compatible(0.59, 0.60)
    assert not is_compatible(float("nan"), 0.6)


def test_update_gain():
    assert update_gain(0.6, 0.5, 0.7) == pytest.approx(0.5)
    assert update_gain(0.7, 0.5, 0.7) == pytest.approx(1.0)
    assert update_gain(0.4, 0.5, 0.7) == pytest.approx(-0.5)
    assert math.isnan(update_gain(0.6, 0.5, 0.5))


def test_compatibility_scores_hand_matrix():
    nan = float("nan")
    m = [[0.50, nan, nan],
         [0.55, 0.60, nan],
         [0.45, 0.65, 0.70]]
    ac, am = compatibility_scores(m)
    # pairs: (1,0) 0.55 > 0.50 yes; (2,0) 0.45 > 0.50 no; (2,1) 0.65 > 0.60 yes
    assert ac == pytest.approx(2 / 3)
    assert am == pytest.approx((0.50 + 0.55 + 0.60 + 0.45 + 0.65 + 0.70) / 6)
    ac1, am1 = compatibility_scores([[0.4]])
    assert math.isnan(ac1) and am1 == pytest.approx(0.4)
    with pytest.raises(MetricsError):
        compatibility_scores([[0.1, 0.2]])


def test_compatibility_matrix_matches_m_score():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 120)
    centers = rng.standard_normal((4, 8))
    base = centers[labels]
    gens = [base + s * rng.standard_normal(base.shape) for s in (1.2, 0.9, 0.6)]
    cm = compatibility_matrix(gens, labels, metric="top1")
    assert isinstance(cm, CompatibilityMatrix) and cm.generations == 3 and cm.metric == "top1"
    for i in range(3):
        for j in range(3):
            if j <= i:
                assert cm.matrix[i, j] == pytest.approx(m_score(gens[i], gens[j], labels).top1)
            else:
                assert math.isnan(cm.matrix[i, j])
    assert (cm.ac, cm.am) == compatibility_scores(cm.matrix)
    json.dumps(cm.to_dict(), allow_nan=False)

    full = compatibility_matrix(gens[:2], labels, metric="map", full=True)
    assert full.matrix[0, 1] == pytest.approx(m_score(gens[0], gens[1], labels).map)
    top3 = compatibility_matrix(gens[:1], labels, metric="top3")
    assert top3.matrix[0, 0] == pytest.approx(m_score(gens[0], gens[0], labels,
                                                      topk=(3,)).topk[3])
    with pytest.raises(MetricsError, match="unknown metric"):
        compatibility_matrix(gens, labels, metric="recall")
    with pytest.raises(MetricsError):
        compatibility_matrix([], labels)


# -- flip report -----------------------------------------------------------------


def test_flip_report_counts_and_confusion():
    r = flip_report(Y, OLD, NEW, class_names=["cat", "dog", "owl", "yak"])
    assert r.metrics == flip_metrics(Y, OLD, NEW)
    assert r.support.tolist() == [2, 2, 2, 1]
    assert r.negative_flips.tolist() == [0, 2, 0, 1]   # samples 1,4 (dog) and 6 (yak)
    assert r.positive_flips.tolist() == [0, 0, 1, 0]   # sample 3 (owl)
    assert r.old_correct.tolist() == [1, 2, 1, 1]
    assert r.new_correct.tolist() == [1, 0, 2, 0]
    expected = np.zeros((4, 4), int)
    for o, n in zip(OLD, NEW):
        expected[o, n] += 1
    np.testing.assert_array_equal(r.confusion, expected)
    assert r.confusion.sum() == 7


def test_flip_report_table_and_dict():
    r = flip_report(Y, OLD, NEW, class_names=["cat", "dog", "owl", "yak"])
    table = r.to_table()
    for needle in ("NFR", "0.4286", "3/7", "BTC", "2/5", "1.0500", "dog", "owl", "old \\ new"):
        assert needle in table, needle
    dog = next(line for line in table.splitlines() if line.startswith("dog "))
    assert dog.split() == ["dog", "2", "1.0000", "0.0000", "2", "0"]
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["per_class"][1] == {"class": 1, "name": "dog", "support": 2, "old_correct": 2,
                                 "new_correct": 0, "negative_flips": 2, "positive_flips": 0}
    assert d["confusion"] == r.confusion.tolist()


def test_flip_report_many_classes_truncates_table():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 30, 300)
    old = np.where(rng.random(300) < 0.8, y, rng.integers(0, 30, 300))
    new = np.where(rng.random(300) < 0.8, y, rng.integers(0, 30, 300))
    r = flip_report(y, old, new)
    assert r.num_classes == 30 and r.class_names[7] == "7"
    table = r.to_table(max_classes=5)
    assert "decision matrix omitted" in table and "showing the 5 classes" in table
    worst = int(np.argmax(r.negative_flips))
    assert any(line.split()[0] == str(worst) for line in table.splitlines()[1:] if line.strip())


def test_flip_report_save_png(tmp_path):
    r = flip_report(Y, OLD, NEW)
    path = tmp_path / "flips.png"
    r.save_png(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert data[12:16] == b"IHDR"


def test_flip_report_validation():
    with pytest.raises(MetricsError, match="no name"):
        flip_report(Y, OLD, NEW, class_names=["a", "b"])
    with pytest.raises(MetricsError, match=">= 0"):
        flip_report([0, -1], [0, 1], [0, 1])
    with pytest.raises(MetricsError, match="same length"):
        flip_report([0, 1], [0], [0, 1])


# -- argument errors at the edges: the package's MetricsError, naming the argument --


@pytest.mark.parametrize("successes,n,name", [(np.array([1]), 3, "successes"), (1, np.array([3, 4]), "n"),
                                              (1.0, 3, "successes"), (True, 3, "successes"), (1, "3", "n")])
def test_wilson_interval_refuses_non_counts(successes, n, name):
    with pytest.raises(MetricsError, match=name):
        wilson_interval(successes, n)
    assert wilson_interval(np.int64(1), np.int32(3)) == wilson_interval(1, 3)


@pytest.mark.parametrize("args,name", [(("x", 0.3), "m_new_old"), ((0.5, None), "m_old_old"),
                                       ((0.5, [0.3]), "m_old_old"), ((True, 0.3), "m_new_old")])
def test_is_compatible_refuses_non_scores(args, name):
    with pytest.raises(MetricsError, match=name):
        is_compatible(*args)
    with pytest.raises(MetricsError, match=name):
        update_gain(*args, 0.9)
    assert is_compatible(np.float32(0.5), 0.4) is True


def test_flip_report_without_names_refuses_absurd_labels():
    with pytest.raises(MetricsError, match="class indices 0..K-1"):
        flip_report([0, 10**6], [0, 0], [0, 1])
    # with names the count is the caller's; a normal inferred count still works
    assert flip_report([0, 2], [0, 0], [0, 2]).num_classes == 3
