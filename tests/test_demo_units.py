"""The demo's pure helpers: reuse of a finished search, gates, the printed shadow report (no Ray)."""

from __future__ import annotations

import json

import pytest

from graceful_ray.demo import demo_gates, finished_search
from graceful_ray.keyvalue import parse_gates
from graceful_ray.serve.report_text import format_shadow_report
from graceful_ray.errors import ConfigError
from graceful_ray.serve.shadow_config import GateConfig
from graceful_ray.serve.stats import ShadowStats, compose_report
from graceful_ray.tune.sweep import load_report


def _write(run_dir, statuses) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    trials = [{"trial_id": f"t{i}", "status": s} for i, s in enumerate(statuses)]
    (run_dir / "pareto.json").write_text(json.dumps({"trials": trials}))


def test_only_a_search_whose_every_trial_ended_is_reused(tmp_path):
    run = tmp_path / "run"
    assert finished_search(str(run), 2, load_report) is None  # never ran
    _write(run, ["complete", "running"])
    assert finished_search(str(run), 2, load_report) is None  # interrupted: resume it
    _write(run, ["complete"])
    assert finished_search(str(run), 2, load_report) is None  # a trial never started
    _write(run, ["complete", "early_stopped"])
    assert [t["trial_id"] for t in finished_search(str(run), 2, load_report)["trials"]] == ["t0", "t1"]


def test_demo_gates_are_valid_and_overridable():
    gates = GateConfig(**{**demo_gates(0.05), **parse_gates(["min_agreement=0.7", "min_labelled=500"])})
    gates.validate()
    assert (gates.max_nfr, gates.min_agreement, gates.min_labelled) == (0.05, 0.7, 500)
    for bad in (["max_nfr"], ["=1"], ["max_nfr=abc"]):
        with pytest.raises(ConfigError):
            parse_gates(bad)


def test_shadow_report_lines_show_counts_intervals_and_every_gate():
    stats = ShadowStats()
    for i in range(300):
        b, c = i % 10, (i % 10 if i % 5 else (i + 1) % 10)  # the candidate disagrees on every fifth row
        stats.add_record("baseline", {"baseline": b, "candidate": c}, {"baseline": 1.0, "candidate": 2.0},
                         True, None)
        stats.add_label(b, c, b)  # labels side with the baseline: each disagreement is a negative flip
    gates = GateConfig(**demo_gates(0.05))
    report = compose_report(stats, gates, {"baseline": "m@v1", "candidate": "m@v2"}, "baseline", in_flight=0)
    text = format_shadow_report(report, sent=300)
    assert "requests recorded 300 (sent 300)" in text and "labelled 300" in text
    assert "NFR                20.00% [" in text and "(60/300)" in text
    assert "agreement          80.00% [" in text
    assert "gates: FAIL (max_nfr)" in text
    for name in ("min_labelled", "max_nfr", "min_agreement", "max_latency_ratio", "max_error_rate"):
        assert name in text


def test_an_offline_replay_report_leaves_latency_out():
    """`shadow replay` prints this table (not JSON) and judges decisions only: no
    latencies are recorded offline and the latency gate is named as not judged."""
    from graceful_ray.serve.replay import without_latency_gate

    stats = ShadowStats()
    for i in range(1000):  # enough for every decision gate to pass at its default
        stats.add_record("baseline", {"baseline": i % 10, "candidate": i % 10},
                         {"baseline": None, "candidate": None}, True, None)
        stats.add_label(i % 10, i % 10, i % 10)
    gates = GateConfig(min_labelled=100)
    live_style = compose_report(stats, gates, {"baseline": "m@v1", "candidate": "m@v2"}, "baseline")
    assert "max_latency_ratio" in live_style["gates"]["failing"]  # no samples: the gate fails
    report = without_latency_gate(compose_report(stats, gates, {"baseline": "m@v1", "candidate": "m@v2"},
                                                 "baseline", mode="replay"))
    assert report["gates"]["passed"] and report["gates"]["failing"] == []
    assert [c["name"] for c in report["gates"]["checks"]] == [
        "min_labelled", "max_nfr", "min_agreement", "max_error_rate"]
    text = format_shadow_report(report)
    assert "gates: PASS" in text and "p99 latency" not in text
    assert "[-] max_latency_ratio (offline" in text and "{" not in text


def test_the_demo_says_which_gates_it_relaxed_and_why():
    from graceful_ray.demo import relaxed_gates

    lines = relaxed_gates(GateConfig(**demo_gates(0.05)))
    assert [ln.split("=")[0] for ln in lines] == ["relaxed: max_nfr", "relaxed: min_agreement",
                                                 "relaxed: max_latency_ratio"]
    assert "max_nfr=0.05 (production default 0.02)" in lines[0] and "--flip-budget" in lines[0]
    assert relaxed_gates(GateConfig()) == []  # the defaults relax nothing
    assert relaxed_gates(GateConfig(**parse_gates(["min_labelled=50"]))) == [
        "relaxed: min_labelled=50 (production default 200): set with --gate"]


def test_the_demo_names_its_model_and_data_as_the_readme_s_commands_do(tmp_path):
    """A command copied from the README (``--old digits@production``, ``data/mnist1d``)
    runs on what the demo made; it created ``mnist1d-classifier`` and ``mnist1d-20000-s0``."""
    import argparse
    import os
    import re
    from pathlib import Path

    from graceful_ray.demo import MODEL_NAME, add_parser, demo_data_dir

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"--old {MODEL_NAME}@production" in readme
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo"])
    data = demo_data_dir(str(tmp_path), args.samples, args.seed)
    assert os.path.basename(data) == "mnist1d" and re.search(r"--data data/mnist1d\b", readme)
    assert demo_data_dir(str(tmp_path), 2000, 0) != data  # another size keeps its own directory


def test_upgrade_reports_side_by_side_show_a_dash_where_one_has_no_value():
    """The demo's step-4 table (graceful_ray.metrics.tables, shared with evaluate): one
    column per report, and ``-`` for M(new, old) across embedding dims."""
    from graceful_ray.metrics.tables import side_by_side

    def report(nfr: float, m_new_old):
        rate = {"value": nfr, "high": nfr + 0.01}
        return {"flips": {"metrics": {"error_rate_old": rate, "error_rate_new": rate, "nfr": rate, "pfr": rate}},
                "retrieval": {"m_old_old": {"top1": 0.5}, "m_new_old": m_new_old, "compatible_top1": True}}

    lines = side_by_side({"plain": report(0.02, None), "bct": report(0.01, {"top1": 0.75})}).splitlines()
    assert lines[0].split() == ["plain", "bct"]
    rows = {ln[:26].strip(): ln[26:].split() for ln in lines[1:]}
    assert rows["NFR"] == ["2.00%", "1.00%"] and rows["NFR 95% upper"] == ["3.00%", "2.00%"]
    assert rows["M(new,old) top-1"] == ["-", "0.7500"] and rows["M(old,old) top-1"] == ["0.5000", "0.5000"]


def test_the_closing_summary_prints_no_link_to_a_dashboard_that_stops_with_the_demo():
    from graceful_ray.demo import ray_dashboard_after

    local = ray_dashboard_after("127.0.0.1:8265", joined=False)
    assert "http" not in local and "stopped with the demo" in local
    assert ray_dashboard_after("10.0.0.1:8265", joined=True).startswith("http://10.0.0.1:8265 ")
    assert "http" not in ray_dashboard_after(None, joined=False)
