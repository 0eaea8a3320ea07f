"""The search's pure parts: spaces, the Pareto front, selection rules, the plot,
early stopping, and how trials are told to Optuna. No Ray cluster needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from graceful_ray.errors import ConfigError
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.tune import search_space as sp
from graceful_ray.tune.pareto import dominates, format_table, pareto_front
from graceful_ray.tune.trials import (COMPLETE, COMPLETE_FLAG, EARLY_STOPPED, EDGE_OBJECTIVES, ERROR, RUNNING,
                                       TRADEOFF_OBJECTIVES, TrialRecord)
from graceful_ray.tune.selection import (lowest_nfr_at_accuracy, most_accurate_under_budget, nfr_rate,
                                         smallest_within)


def rec(tid: str, acc: float, nfr: float, status: str = COMPLETE, rows: int = 2000, **params) -> TrialRecord:
    return TrialRecord(tid, status, params=params, metrics={
        "val_accuracy": acc, "val_nfr": nfr, "val_rows": float(rows),
        "val_negative_flips": float(round(nfr * rows))})


# -- Pareto front ---------------------------------------------------------------

def test_front_drops_dominated_and_sorts_by_accuracy():
    records = [rec("a", 0.90, 0.030), rec("b", 0.88, 0.010), rec("c", 0.85, 0.020),  # c dominated by b
               rec("d", 0.80, 0.005), rec("e", 0.89, 0.030)]  # e dominated by a
    front = pareto_front(records)
    assert [r.trial_id for r in front] == ["a", "b", "d"]
    assert dominates(records[1], records[2]) and not dominates(records[0], records[1])


def test_duplicates_stay_on_the_front_together():
    records = [rec("a", 0.9, 0.02), rec("b", 0.9, 0.02), rec("c", 0.8, 0.03)]
    assert [r.trial_id for r in pareto_front(records)] == ["a", "b"]
    assert not dominates(records[0], records[1]) and not dominates(records[1], records[0])


def test_trials_that_did_not_finish_never_enter_the_front():
    records = [
        rec("done", 0.85, 0.020),
        rec("stopped", 0.95, 0.001, status=EARLY_STOPPED),  # would dominate everything
        rec("failed", 0.99, 0.000, status=ERROR),
        rec("running", 0.97, 0.000, status=RUNNING),
        TrialRecord("nometrics", COMPLETE, metrics={"val_accuracy": 0.99}),  # no NFR: cannot be placed
    ]
    front = pareto_front(records)
    assert [r.trial_id for r in front] == ["done"]  # not dominated by the unfinished ones
    table = format_table(records, front)
    assert "| done | complete | yes |" in table
    assert "| stopped | early stopped | - |" in table and "| failed | error | - |" in table


def test_edge_objectives_trade_quality_for_cost():
    records = [TrialRecord(t, COMPLETE, metrics={"cross_map": m, "flops_per_sample": f}) for t, m, f in
               [("big", 0.80, 9e5), ("mid", 0.78, 2e5), ("bad", 0.70, 3e5), ("tiny", 0.60, 1e4)]]
    assert [r.trial_id for r in pareto_front(records, EDGE_OBJECTIVES)] == ["big", "mid", "tiny"]


def test_empty_and_all_incomplete_give_an_empty_front():
    assert pareto_front([]) == []
    assert pareto_front([rec("x", 0.9, 0.01, status=EARLY_STOPPED)]) == []


# -- selection -----------------------------------------------------------------

def test_budget_uses_the_wilson_upper_bound_not_the_point_estimate():
    few = rec("few-rows", 0.95, 0.0, rows=50)  # 0/50 flips: upper bound ~0.071
    many = rec("measured", 0.90, 0.005, rows=3000)  # 15/3000: upper bound ~0.0082
    sel = most_accurate_under_budget([few, many], 0.02)
    assert sel.record.trial_id == "measured"
    assert sel.nfr.count == 15 and sel.nfr.total == 3000 and sel.nfr.high <= 0.02
    assert nfr_rate(few).high > 0.02


def test_most_accurate_feasible_trial_is_chosen_and_ties_are_deterministic():
    records = [rec("a", 0.90, 0.030), rec("b", 0.88, 0.008), rec("c", 0.88, 0.006), rec("d", 0.80, 0.001)]
    assert most_accurate_under_budget(records, 0.02).record.trial_id == "c"  # b and c tie: lower bound wins
    assert most_accurate_under_budget(records, 0.05).record.trial_id == "a"


def test_no_feasible_trial_gives_none():
    records = [rec("a", 0.90, 0.030), rec("b", 0.88, 0.025)]
    assert most_accurate_under_budget(records, 0.02) is None
    assert most_accurate_under_budget([], 0.02) is None
    # an early-stopped trial is never selected, however good it looks
    assert most_accurate_under_budget([rec("s", 0.99, 0.0, status=EARLY_STOPPED)], 0.5) is None
    # without the counts the bound cannot be computed: not feasible
    assert most_accurate_under_budget([TrialRecord("n", COMPLETE, metrics={"val_accuracy": 0.9,
                                                                           "val_nfr": 0.0})], 0.5) is None


def test_lowest_nfr_at_accuracy():
    records = [rec("a", 0.90, 0.030), rec("b", 0.88, 0.010), rec("c", 0.80, 0.001),
               rec("s", 0.95, 0.000, status=EARLY_STOPPED)]
    assert lowest_nfr_at_accuracy(records, 0.85).record.trial_id == "b"
    assert lowest_nfr_at_accuracy(records, 0.70).record.trial_id == "c"
    assert lowest_nfr_at_accuracy(records, 0.91) is None


def test_smallest_edge_model_within_tolerance():
    records = [TrialRecord(t, s, metrics={"cross_map": m, "flops_per_sample": f}) for t, s, m, f in
               [("big", COMPLETE, 0.80, 9e5), ("mid", COMPLETE, 0.785, 2e5), ("tiny", COMPLETE, 0.60, 1e4),
                ("stopped", EARLY_STOPPED, 0.80, 1e3)]]
    assert smallest_within(records, 0.80, 0.02).record.trial_id == "mid"
    assert smallest_within(records, 0.80, 0.0).record.trial_id == "big"
    assert smallest_within(records, 0.90, 0.02) is None


@pytest.mark.parametrize("budget", [-0.1, 1.5])
def test_budget_must_be_a_rate(budget):
    with pytest.raises(ConfigError, match="flip budget"):
        most_accurate_under_budget([], budget)


# -- search spaces ---------------------------------------------------------------

def test_method_spaces_compose():
    fd = sp.for_method("fd")
    assert set(fd.params) == {"fd_lambda", "fd_beta"} and fd.params["fd_lambda"].kind == "loguniform"
    assert "fd_temperature" in sp.for_method("fd-kl").params
    assert "fd_temperature" in sp.for_method("fd", {"fd_kind": "kl"}).params
    pinned = sp.for_method("fd", {"fd_beta": 5})
    assert "fd_beta" not in pinned.params and pinned.fixed == {"fd_beta": 5}
    both = sp.for_method("bct+fd") + sp.learning_rate()
    assert set(both.params) == {"bct_lambda", "fd_lambda", "fd_beta", "lr"}
    with pytest.raises(ConfigError, match="both define"):
        sp.learning_rate() + sp.learning_rate()


def test_apply_routes_values_to_the_config():
    base = UpgradeConfig(data="/d", method="fd", hparams={"fd_kind": "lm"}, model_kwargs={"channels": 8})
    space = sp.for_method("fd") + sp.learning_rate() + sp.SearchSpace(fixed={"model.depth": 2})
    cfg = space.apply(base, {"fd_lambda": 0.5, "fd_beta": 3.0, "lr": 0.004})
    assert cfg.hparams == {"fd_kind": "lm", "fd_lambda": 0.5, "fd_beta": 3.0}
    assert cfg.lr == 0.004 and cfg.model_kwargs == {"channels": 8, "depth": 2}
    assert base.hparams == {"fd_kind": "lm"}  # the base is not mutated


def test_ranges_parse_and_override():
    assert sp.Param.parse("x", "loguniform:0.1:100") == sp.Param("x", "loguniform", 0.1, 100.0)
    assert sp.Param.parse("x", "int:1:4") == sp.Param("x", "int", 1, 4)
    assert sp.Param.parse("x", "choice:8,16,a").choices == (8, 16, "a")
    space = sp.for_method("fd").with_overrides({"fd_lambda": "loguniform:1:1000", "fd_beta": "5"})
    assert space.params["fd_lambda"].high == 1000 and space.fixed["fd_beta"] == 5
    for bad in ("loguniform:0:1", "uniform:2:1", "gauss:0:1", "uniform:x"):
        with pytest.raises(ConfigError):
            sp.Param.parse("x", bad)


def test_space_names_are_checked_against_the_method():
    sp.for_method("fd").validate_for("fd")
    with pytest.raises(ConfigError, match="bct_lambda"):
        sp.for_method("bct").validate_for("fd")


def test_space_round_trips_and_converts_to_tune():
    space = sp.for_method("fd") + sp.learning_rate() + sp.architecture("cnn1d", embedding_dim=64)
    again = sp.SearchSpace.from_dict(space.to_dict())
    assert again == space
    tuned = space.to_tune()
    assert set(tuned) == {"fd_lambda", "fd_beta", "lr", "model.channels", "model.depth"}
    assert space.fixed["model.embedding_dim"] == 64
    for _ in range(20):
        assert 1 <= tuned["model.depth"].sample() <= 3  # randint's bound is made inclusive
    with pytest.raises(ConfigError, match="empty"):
        sp.SearchSpace().to_tune()


# -- early stopping and Optuna ---------------------------------------------------

def test_stopper_stops_only_trials_beaten_on_every_objective():
    from graceful_ray.tune.search_algorithm import ParetoStopper

    stop = ParetoStopper(TRADEOFF_OBJECTIVES, grace_epochs=2, margins=(0.01, 0.005))
    r = lambda acc, nfr, epoch, **kw: {"val_accuracy": acc, "val_nfr": nfr, "epoch": epoch, **kw}  # noqa: E731
    assert not stop("good", r(0.90, 0.010, 1))
    assert not stop("bad", r(0.70, 0.050, 1))  # within the grace epochs
    assert not stop("good", r(0.91, 0.010, 2))
    assert not stop("safe", r(0.60, 0.002, 2))  # worse accuracy but fewer flips: the front's other end
    assert not stop("close", r(0.905, 0.012, 2))  # within the margins
    assert stop("bad", r(0.70, 0.050, 2))
    assert not stop("late", r(0.10, 0.9, 3, **{COMPLETE_FLAG: 1}))  # a final report is never stopped
    assert stop.stopped == ["bad"] and not stop.stop_all()


def _searcher(tmp_path):
    from ray import tune

    from graceful_ray.tune.search_algorithm import make_searcher

    s = make_searcher(TRADEOFF_OBJECTIVES, study_url=f"sqlite:///{tmp_path}/optuna.db", study_name="unit",
                      trials=8, seed=0)
    s.set_search_properties(None, None, {"fd_lambda": tune.loguniform(0.01, 10)})
    return s


def test_only_final_reports_complete_an_optuna_trial(tmp_path):
    import optuna

    s = _searcher(tmp_path)
    for tid in ("done", "stopped", "failed"):
        assert 0.01 <= s.suggest(tid)["fd_lambda"] <= 10
    s.on_trial_complete("done", {"val_accuracy": 0.9, "val_nfr": 0.01, COMPLETE_FLAG: 1})
    s.on_trial_complete("stopped", {"val_accuracy": 0.99, "val_nfr": 0.0, COMPLETE_FLAG: 0})
    s.on_trial_complete("failed", None, error=True)
    study = optuna.load_study(study_name="unit", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.trials[0].values == [0.9, 0.01]
    assert [t.number for t in study.best_trials] == [0]  # the stopped trial's better numbers are not counted


def test_the_searcher_survives_the_pickle_the_tuner_writes(tmp_path):
    """Ray Tune pickles the searcher into tuner.pkl when the Tuner is built (and into
    searcher checkpoints); Optuna 5.1's NSGA-II holds a thread lock, which made every
    search fail at its start. Pickled and restored, it must go on suggesting."""
    from ray import cloudpickle

    s = _searcher(tmp_path)
    assert 0.01 <= s.suggest("before")["fd_lambda"] <= 10
    restored = cloudpickle.loads(cloudpickle.dumps(s))
    assert 0.01 <= restored.suggest("after")["fd_lambda"] <= 10
    restored.on_trial_complete("after", {"val_accuracy": 0.9, "val_nfr": 0.01, COMPLETE_FLAG: 1})


def test_population_keeps_several_generations():
    from graceful_ray.tune.search_algorithm import default_population

    assert default_population(16) == 4 and default_population(400) == 50 and default_population(3) == 4


# -- results into records, settings -----------------------------------------------

def test_records_from_results_classifies_trials():
    from graceful_ray.tune.tuner import records_from_results

    res = lambda metrics, config, error=None, path="/x/upgrade_trial_abc12_00001_1_a=1_date": SimpleNamespace(  # noqa: E731
        metrics=metrics, config=config, error=error, path=path)
    grid = [
        res({"trial_id": "t1", COMPLETE_FLAG: 1, "val_accuracy": 0.9, "val_nfr": 0.01, "checkpoint_path": "/c",
             "train_run": "run-t1"}, {"fd_lambda": 1.0, "other": 3}),
        res({"trial_id": "t2", COMPLETE_FLAG: 0, "val_accuracy": 0.8, "val_nfr": 0.02}, {"fd_lambda": 2.0}),
        res(None, {"fd_lambda": 3.0}, error=RuntimeError("boom\nsecond line")),
    ]
    records = records_from_results(grid, ["fd_lambda"])
    by_id = {r.trial_id: r for r in records}
    assert by_id["t1"].status == COMPLETE and by_id["t1"].params == {"fd_lambda": 1.0}
    assert by_id["t1"].checkpoint_path == "/c" and by_id["t1"].train_run == "run-t1"
    assert by_id["t2"].status == EARLY_STOPPED
    assert by_id["abc12_00001"].status == ERROR and by_id["abc12_00001"].error == "RuntimeError: boom"
    assert records_from_results(grid[1:2], ["fd_lambda"], finished=False)[0].status == RUNNING


def test_settings_round_trip_and_checks(tmp_path):
    from graceful_ray.tune.tuner import SearchSettings

    base = UpgradeConfig(data="/d", method="fd", old="m@v1").to_dict()
    s = SearchSettings(base=base, space=sp.for_method("fd").to_dict(), trials=4, run_name="r",
                       storage=str(tmp_path), margins=(0.01, 0.005))
    assert SearchSettings.from_json(s.to_json()) == s
    assert s.study == f"sqlite:///{tmp_path}/r/optuna.db"
    with pytest.raises(ConfigError, match="early stopping"):
        SearchSettings(base=base, search="edge", early_stop=True)
    with pytest.raises(ConfigError, match="trials"):
        SearchSettings(base=base, trials=0)
    with pytest.raises(ConfigError, match="no search named"):
        SearchSettings.load(str(tmp_path), "missing")


def test_plot_marks_trials_front_and_old_model():
    from graceful_ray.tune.plot import plot_trials
    from graceful_ray.tune.trials import ACCURACY, NFR

    records = [rec("a", 0.9, 0.03, fd_lambda=0.1), rec("b", 0.85, 0.01, fd_lambda=3.0),
               rec("c", 0.8, 0.02), rec("s", 0.95, 0.0, status=EARLY_STOPPED)]
    png = plot_trials(records, pareto_front(records), ACCURACY, NFR, reference=(0.8, 0.0, "old model"),
                      selected="b", annotate="fd_lambda", title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert plot_trials([], [], ACCURACY, NFR)[:4] == b"\x89PNG"


def test_cli_rejects_bad_searches(tmp_path, capsys):
    from graceful_ray.cli import main

    assert main(["tune", "--old", "m@v1", "--flip-budget", "0.02", "--storage", str(tmp_path)]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["tune", "--resume", "nope", "--flip-budget", "0.02", "--storage", str(tmp_path)]) == 2
    assert "no search named 'nope'" in capsys.readouterr().err
    assert main(["tune", "--resume", "nope", "--flip-budget", "0.02", "--min-accuracy", "0.9"]) == 2
    assert "one selection rule" in capsys.readouterr().err


def test_nan_metrics_are_not_numbers():
    r = TrialRecord("x", COMPLETE, metrics={"val_accuracy": None, "val_nfr": "n/a", "a": float("nan")})
    assert math.isnan(r.value("val_accuracy")) and math.isnan(r.value("val_nfr")) and not r.has("a")
    assert TrialRecord.from_dict(rec("y", 0.5, 0.1).to_dict()) == rec("y", 0.5, 0.1)
    with pytest.raises(ConfigError, match="status"):
        TrialRecord("z", "finished")


def test_interrupted_search_writes_outputs_but_selects_nothing(tmp_path):
    from graceful_ray.tune.sweep import SelectionRule, report_from_records
    from graceful_ray.tune.tuner import SearchSettings, records_from_results

    results = [SimpleNamespace(metrics={"trial_id": "t1", COMPLETE_FLAG: 1, "val_accuracy": 0.9, "val_nfr": 0.001,
                                        "val_rows": 2000.0, "val_negative_flips": 2.0}, config={}, error=None,
                               path=""),
               SimpleNamespace(metrics={"trial_id": "t2", COMPLETE_FLAG: 0, "val_accuracy": 0.8, "val_nfr": 0.02},
                               config={}, error=None, path="")]

    class Grid(list):
        _experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(trial_id="t1", status="TERMINATED"),
                                                       SimpleNamespace(trial_id="t2", status="RUNNING")])

    records = records_from_results(Grid(results), [])
    assert [r.status for r in records] == [COMPLETE, RUNNING]
    settings = SearchSettings(base=UpgradeConfig(data="/d", method="fd", old="m@v1").to_dict(),
                              space=sp.for_method("fd").to_dict(), trials=2, run_name="r", storage=str(tmp_path))
    report = report_from_records(settings, records, SelectionRule(flip_budget=0.5))
    assert report.interrupted and report.selection is None and report.published is None
    assert "--resume r" in report.message
    assert [r.trial_id for r in report.front] == ["t1"]
    assert (tmp_path / "r" / "pareto.png").exists() and (tmp_path / "r" / "pareto.json").exists()
    # the same trials, all ended: the rule applies
    records[1].status = EARLY_STOPPED
    done = report_from_records(settings, records, SelectionRule(flip_budget=0.5, publish=False))
    assert not done.interrupted and done.selection.record.trial_id == "t1"
    assert "| t2 | early stopped |" in (tmp_path / "r" / "pareto.md").read_text()


def test_cli_passes_the_learning_rate_schedule_to_every_trial(tmp_path):
    import argparse

    from graceful_ray.tune.cli import add_tune_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_tune_arguments(p)
    common = ["--data", str(tmp_path / "d"), "--old", "m@v1", "--storage", str(tmp_path), "--run-name", "r"]
    assert settings_from_args(p.parse_args(common)).base["lr_schedule"] == "cosine"
    settings = settings_from_args(p.parse_args(common + ["--lr-schedule", "constant"]))
    assert settings.base["lr_schedule"] == "constant"


# -- the default search: across methods, plain always a trial, a candidate only if it beats plain ----------

def mrec(tid: str, method: str, acc: float, flips: int, rows: int = 2000, status: str = COMPLETE) -> TrialRecord:
    return TrialRecord(tid, status, params={"method": method}, metrics={
        "val_accuracy": acc, "val_nfr": flips / rows, "val_rows": float(rows), "val_negative_flips": float(flips)})


def test_a_candidate_must_beat_plains_nfr_with_its_interval():
    from graceful_ray.tune.selection import beats_plain, plain_reference

    plain = mrec("p", "plain", 0.900, 60)  # NFR 3.0%
    # fd: 1.5%, its Wilson upper bound (~2.1%) below 3%: beats plain; new-error 2.8%: within noise of plain
    records = [plain, mrec("fd", "fd", 0.897, 30), mrec("ne", "new-error", 0.902, 56),
               mrec("elodi", "elodi", 0.880, 10),  # fewest flips, but 2 points less accurate than plain
               mrec("stopped", "fd", 0.95, 0, status=EARLY_STOPPED)]
    assert plain_reference(records).trial_id == "p"
    sel, why = beats_plain(records)
    assert sel.record.trial_id == "fd" and sel.nfr.high < 0.03, why
    assert "0.9000 - 0.005" in why  # plain's error + 0.5 points
    # the user's accuracy floor replaces plain's: elodi qualifies at 0.88
    assert beats_plain(records, min_accuracy=0.88)[0].record.trial_id == "elodi"
    # with a flip budget: the most accurate that beats plain and is within the budget
    assert beats_plain(records, min_accuracy=0.88, flip_budget=0.03)[0].record.trial_id == "fd"
    # nothing beats plain credibly -> None and a reason naming plain's NFR
    sel, why = beats_plain([plain, mrec("ne", "new-error", 0.902, 56), mrec("bad", "fd", 0.85, 5)])
    assert sel is None and "no trial beats plain" in why and "60/2000" in why
    # a search without a complete plain trial selects nothing
    sel, why = beats_plain([mrec("fd", "fd", 0.9, 1), mrec("p", "plain", 0.9, 60, status=ERROR)])
    assert sel is None and "plain trial did not complete" in why
    # few validation rows: 0 flips of 100 has an upper bound (~3.7%) above plain's 3%: not shown to beat it
    assert beats_plain([plain, mrec("tiny", "fd", 0.95, 0, rows=100)])[0] is None


def test_the_default_space_searches_methods_weights_and_schedule_with_plain_first():
    space = sp.across_methods() + sp.learning_rate()
    assert space.methods == ("plain", "fd", "new-error", "elodi")
    assert {"fd_lambda", "fd_beta", "ne_lambda", "ne_kind", "elodi_lambda", "elodi_xi", "lr_schedule", "lr"} \
        <= set(space.params)
    assert space.fixed["fd_kind"] == "lm-std"
    point = space.plain_point(lr=0.003, schedule="constant")
    assert set(point) == set(space.params)  # Tune wants every searched name in a given point
    assert point["method"] == "plain" and point["lr"] == 0.003 and point["lr_schedule"] == "constant"
    assert all(space.params[k].contains(v) for k, v in point.items())
    space.validate_for("plain")  # every name is some candidate's hyperparameter
    base = UpgradeConfig(data="/d")
    sample = {"method": "new-error", "fd_lambda": 0.1, "fd_beta": 5.0, "ne_lambda": 2.0, "ne_kind": "strict",
              "elodi_lambda": 1.0, "elodi_xi": 0.5, "lr_schedule": "constant", "lr": 0.004}
    cfg = space.apply(base, sample)  # a trial keeps only its method's hyperparameters
    assert cfg.method == "new-error" and cfg.hparams == {"ne_lambda": 2.0, "ne_kind": "strict"}
    assert cfg.lr_schedule == "constant" and cfg.lr == 0.004
    fd = space.apply(base, {**sample, "method": "fd"})
    assert fd.hparams == {"fd_kind": "lm-std", "fd_lambda": 0.1, "fd_beta": 5.0}
    assert space.apply(base, {**sample, "method": "plain"}).hparams == {}
    # pinned values and a subset of methods; an unknown one is refused
    only = sp.across_methods(("fd",), {"fd_beta": 5}, schedules=("cosine",))
    assert only.methods == ("plain", "fd") and "fd_beta" not in only.params and only.fixed["fd_beta"] == 5
    assert "lr_schedule" not in only.params
    with pytest.raises(ConfigError, match="no default search range"):
        sp.across_methods(("lqf",))
    # a one-method search has no plain trial (its selection rules are unchanged)
    assert sp.for_method("fd").plain_point() is None
    assert sp.SearchSpace.from_dict(space.to_dict()) == space


def test_tune_cli_defaults_to_the_search_across_methods(tmp_path):
    import argparse

    from graceful_ray.tune.cli import add_tune_arguments, rule_from_args, settings_from_args

    parser = argparse.ArgumentParser()
    add_tune_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path), "--old", "m@v1", "--storage", str(tmp_path / "t"),
                              "--registry", str(tmp_path / "r"), "--run-name", "x"])
    settings = settings_from_args(args)
    space = settings.search_space()
    assert space.methods == ("plain", "fd", "new-error", "elodi") and "lr_schedule" in space.params
    assert settings.base["method"] == "plain" and settings.base["hparams"] == {}
    rule = rule_from_args(args)
    assert rule.flip_budget is None and rule.min_accuracy is None and rule.max_accuracy_drop == 0.005
    one = settings_from_args(parser.parse_args(["--data", str(tmp_path), "--old", "m@v1", "--method", "fd",
                                                "--storage", str(tmp_path / "t"), "--run-name", "y"]))
    assert one.search_space().plain_point() is None and one.base["lr_schedule"] == "cosine"
    with pytest.raises(ConfigError, match="--methods is for the default search"):
        settings_from_args(parser.parse_args(["--data", str(tmp_path), "--old", "m@v1", "--method", "fd",
                                              "--methods", "fd", "--run-name", "z"]))
