"""A whole search: start or resume it, then front, selection, outputs and publishing.

What a finished search leaves in its run directory::

    <storage>/<run>/
      search.json          the settings (what --resume reads)
      optuna.db            the Optuna study (SQLite; NSGA-II state, every trial)
      <trial dirs>/        Tune's per-trial results, incl. TensorBoard event files
      train/<run>-<id>/    each trial's Ray Train run (epoch checkpoints)
      trials/<id>.json     each complete trial's final record
      pareto.json          every trial record, the front, the selection, the reference
      pareto.md            the same as a table
      pareto.png           all trials, the front, the old/cloud model

``tensorboard --logdir <storage>/<run>`` shows every trial's curves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from graceful_ray.data import load_split
from graceful_ray.errors import ConfigError
from graceful_ray.metrics import m_score
from graceful_ray.storage import resolve
from graceful_ray.tune.pareto import format_table, pareto_front
from graceful_ray.tune.plot import plot_trials
from graceful_ray.tune.publish import publish_trial
from graceful_ray.tune.trials import ACCURACY, CROSS_MAP, FLOPS, NFR, RUNNING, TrialRecord
from graceful_ray.tune.selection import (Selection, beats_plain, lowest_nfr_at_accuracy,
                                         most_accurate_under_budget, smallest_within)
from graceful_ray.tune.trainable import EDGE, TRADEOFF, model_cost_metrics
from graceful_ray.tune.tuner import SETTINGS_FILE, SearchSettings, build_tuner, records_from_results, restore_tuner

# Lazy imports: the trainer, evaluation and the registry (torch) load only when trials are trained or scored.

logger = logging.getLogger(__name__)


@dataclass
class SelectionRule:
    """How to pick the model to publish (may differ between a run and its resume)."""

    flip_budget: float | None = None  # trade-off: most accurate with NFR upper bound <= budget
    min_accuracy: float | None = None  # trade-off: lowest NFR at accuracy >= A
    # trade-off search across methods (plain among them): without min_accuracy, the
    # accuracy floor is plain's accuracy minus this (plain's error + 0.5 points)
    max_accuracy_drop: float = 0.005
    map_tolerance: float | None = None  # edge: smallest with M(small, large) >= M(large, large) - tol
    confidence: float = 0.95
    publish: bool = True
    alias: str = "candidate"


@dataclass
class SearchReport:
    run_name: str
    run_dir: str
    search: str
    records: list[TrialRecord]
    front: list[TrialRecord]
    selection: Selection | None
    reference: dict[str, Any] = field(default_factory=dict)
    published: Any = None  # registry Manifest
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def start_search(settings: SearchSettings, *, callbacks: list | None = None):
    """Validate, write ``search.json``, warm the old-output cache, run the Tuner; returns its ResultGrid."""
    from graceful_ray.train.trainer import prepare_upgrade

    loc = settings.run_dir
    if loc.join(SETTINGS_FILE).exists():
        raise ConfigError(f"a search named {settings.run_name!r} already exists in {loc.uri}: resume it with "
                          f"--resume {settings.run_name}, or pick another --run-name")
    space = settings.search_space()
    cfg = settings.upgrade_config()
    space.validate_for(cfg.method)
    # Fail now, with the usual clear message, on a bad dataset / old model / method, and compute
    # the old model's outputs once here rather than in every concurrent trial.
    probe = space.apply(cfg, {name: p.middle() for name, p in space.params.items()})
    prepare_upgrade(probe)
    loc.makedirs()
    settings.save()
    logger.info("search %s: %d trials over %s", settings.run_name, settings.trials, "; ".join(space.describe()))
    with _console(settings.verbose):
        return build_tuner(settings, callbacks=callbacks).fit()


def resume_search(settings: SearchSettings):
    """Continue an interrupted search: finished trials kept, the rest run."""
    logger.info("resuming search %s from %s", settings.run_name, settings.run_dir.uri)
    with _console(settings.verbose):
        return restore_tuner(settings).fit()


@contextlib.contextmanager
def _console(verbose: int):
    """``verbose=0`` silences Tune's console entirely: its default (new) output
    prints the experiment header and paths even at verbosity 0; the classic
    reporter honours it. Scoped to this fit: the variable is read per run."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before



def edge_reference(settings: SearchSettings) -> dict[str, Any]:
    """M(large, large) and the cloud model's cost: the bar the small models are held to."""
    from graceful_ray.evaluate import predict
    from graceful_ray.registry import Registry

    cfg = settings.upgrade_config()
    x, y, _ = load_split(cfg.data, cfg.val_split)
    cloud = predict(cfg.registry, cfg.old, x)
    manifest = Registry(cfg.registry).get(cfg.old)
    cost = model_cost_metrics(manifest.spec)
    return {"model": cloud.ref, "m_large_large": m_score(cloud.embeddings, cloud.embeddings, y).map,
            "flops_per_sample": cost["flops_per_sample"], "parameters": cost["parameters"]}


def tradeoff_reference(records: list[TrialRecord]) -> dict[str, Any]:
    olds = [r.value("val_old_accuracy") for r in records if r.has("val_old_accuracy")]
    return {"old_accuracy": olds[0] if olds else math.nan, "nfr": 0.0}


def select(settings: SearchSettings, records: list[TrialRecord], rule: SelectionRule,
           reference: dict[str, Any]) -> tuple[Selection | None, str]:
    """The selected trial and a sentence saying what was chosen, or why nothing was."""
    if settings.search == TRADEOFF and settings.search_space().plain_point() is not None:
        # A search with plain among its trials publishes only what credibly beats plain.
        sel, why = beats_plain(records, min_accuracy=rule.min_accuracy, max_accuracy_drop=rule.max_accuracy_drop,
                               flip_budget=rule.flip_budget, confidence=rule.confidence)
        if sel is None:
            return None, f"{why}. Nothing was published: plain training is as good here"
        return sel, _chosen(sel)
    if settings.search == TRADEOFF:
        if rule.flip_budget is not None:
            sel = most_accurate_under_budget(records, rule.flip_budget, confidence=rule.confidence)
            if sel is None:
                best = min((r for r in records if r.complete and r.has("nfr_upper")),
                           key=lambda r: r.value("nfr_upper"), default=None)
                lowest = f"; the lowest upper bound reached was {best.value('nfr_upper'):.4f} (trial " \
                         f"{best.trial_id})" if best else ""
                return None, (f"no trial meets the flip budget: none has an NFR upper "
                              f"{rule.confidence:.0%} bound <= {rule.flip_budget:g}{lowest}. Nothing was "
                              "published; raise --flip-budget, train longer, or widen the search")
            return sel, _chosen(sel)
        if rule.min_accuracy is not None:
            sel = lowest_nfr_at_accuracy(records, rule.min_accuracy, confidence=rule.confidence)
            if sel is None:
                return None, (f"no trial reaches accuracy >= {rule.min_accuracy:g}. Nothing was published")
            return sel, _chosen(sel)
        return None, "no selection rule given (--flip-budget or --min-accuracy): nothing published"
    tol = 0.02 if rule.map_tolerance is None else rule.map_tolerance
    sel = smallest_within(records, reference["m_large_large"], tol)
    if sel is None:
        return None, (f"no small model keeps M(small, large) within {tol:g} of M(large, large) = "
                      f"{reference['m_large_large']:.4f}. Nothing was published")
    return sel, _chosen(sel)


def _chosen(sel: Selection) -> str:
    r = sel.record
    parts = [f"selected trial {r.trial_id} ({sel.rule})"]
    if r.has("val_accuracy"):
        parts.append(f"accuracy {r.value('val_accuracy'):.4f}")
    if sel.nfr is not None:
        parts.append(f"NFR {sel.nfr}")
    if r.has("cross_map"):
        parts.append(f"M(small, large) {r.value('cross_map'):.4f}, {r.value('flops_per_sample'):,.0f} FLOPs")
    return ", ".join(parts)


def finish(settings: SearchSettings, grid, rule: SelectionRule) -> SearchReport:
    """Records, front, selection, outputs (JSON, table, PNG) and the published candidate."""
    space = settings.search_space()
    records = records_from_results(grid, sorted(space.params))
    return report_from_records(settings, records, rule)


def report_from_records(settings: SearchSettings, records: list[TrialRecord], rule: SelectionRule) -> SearchReport:
    """Front, selection, outputs; publishes only when every trial of the search has ended.

    An interrupted search (Ctrl-C, SIGTERM: Tune stops and returns) has trials
    still running or never started; selecting from it would pick from a partial
    front, so it only writes the outputs and says how to resume.
    """
    objectives = settings.objectives
    front = pareto_front(records, objectives)
    reference = edge_reference(settings) if settings.search == EDGE else tradeoff_reference(records)
    interrupted = any(r.status == RUNNING for r in records) or len(records) < settings.trials
    if interrupted:
        selection, message = None, (
            f"search interrupted with {sum(r.complete for r in records)} of {settings.trials} trials complete: "
            f"nothing selected or published; continue it with --resume {settings.run_name}")
    else:
        selection, message = select(settings, records, rule, reference)
    report = SearchReport(settings.run_name, settings.run_dir.uri, settings.search, records, front, selection,
                          reference, message=message, interrupted=interrupted)
    if selection is not None and rule.publish:
        report.published = publish_trial(settings, selection.record, alias=rule.alias)
        report.message += f"; published {report.published.ref}" + (f" as {rule.alias}" if rule.alias else "")
    write_outputs(settings, report)
    return report


def write_outputs(settings: SearchSettings, report: SearchReport) -> None:
    loc = settings.run_dir
    space = settings.search_space()
    selected = report.selection.record.trial_id if report.selection else None
    extra = ["val_old_accuracy", "nfr_upper", "val_negative_flips", "val_rows", "epoch"] \
        if settings.search == TRADEOFF else ["self_map", "val_accuracy", "parameters", "epoch"]
    table = format_table(report.records, report.front, settings.objectives, params=sorted(space.params),
                         extra_metrics=extra, selected=selected)
    if settings.search == TRADEOFF:
        ref = report.reference
        png = plot_trials(report.records, report.front, ACCURACY, NFR, selected=selected,
                          reference=(ref["old_accuracy"], 0.0, "old model") if ref["old_accuracy"] == ref["old_accuracy"]
                          else None,
                          annotate=_annotate(space), title=f"{settings.run_name}: accuracy vs NFR")
    else:
        ref = report.reference
        png = plot_trials(report.records, report.front, FLOPS, CROSS_MAP, selected=selected,
                          reference=(ref["flops_per_sample"], ref["m_large_large"], "cloud model M(large, large)"),
                          annotate=None, title=f"{settings.run_name}: cross-model mAP vs cost", log_x=True)
    summary = {
        "run_name": settings.run_name, "search": settings.search,
        "objectives": [o.to_dict() for o in settings.objectives],
        "space": space.to_dict(), "counts": report.counts, "reference": report.reference,
        "front": [r.trial_id for r in report.front],
        "selection": report.selection.to_dict() if report.selection else None,
        "message": report.message,
        "published": report.published.ref if report.published is not None else None,
        "trials": [r.to_dict() for r in report.records],
    }
    outputs = {"json": loc.join("pareto.json"), "table": loc.join("pareto.md"), "plot": loc.join("pareto.png")}
    outputs["json"].write_bytes(json.dumps(summary, indent=1, default=_default).encode())
    header = f"# {settings.run_name} ({settings.search} search)\n\n{report.message}\n\n"
    outputs["table"].write_bytes((header + table + "\n").encode())
    outputs["plot"].write_bytes(png)
    report.outputs = {k: v.uri for k, v in outputs.items()}


def _annotate(space) -> str | None:
    if "method" in space.params:
        return "method"
    for name in ("fd_lambda", "bct_lambda", "l2_lambda", "kd_lambda", "elodi_lambda", "ne_lambda"):
        if name in space.params:
            return name
    return None


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def load_report(run_dir_uri: str) -> dict[str, Any]:
    return json.loads(resolve(run_dir_uri).join("pareto.json").read_bytes())

