"""Accuracy vs. flip-rate trade-off search (and edge architecture search) on Ray Tune.

One concept per module:

* ``space``: what a search varies (method hyperparameters, lr, architecture);
* ``trainable``: the Tune trial, a Ray Train upgrade run reporting per epoch;
* ``search``: Optuna NSGA-II with an RDB study; early stopping that keeps the front honest;
* ``tuner``: settings, building / restoring the ``Tuner``, results into records;
* ``records``, ``pareto``, ``selection``, ``plot``: pure functions over trial records;
* ``publish``: the selected trial into the registry as ``candidate``;
* ``runner``: a whole search, start or resume to outputs; ``cli``: ``graceful-ray tune``.
"""

from graceful_ray.tune.pareto import dominates, format_table, pareto_front
from graceful_ray.tune.trials import (ACCURACY, CROSS_MAP, EDGE_OBJECTIVES, FLOPS, NFR, TRADEOFF_OBJECTIVES,
                                       Objective, TrialRecord)
from graceful_ray.tune.sweep import (SearchReport, SelectionRule, finish, report_from_records, resume_search,
                                      start_search)
from graceful_ray.tune.selection import (Selection, lowest_nfr_at_accuracy, most_accurate_under_budget,
                                         smallest_within)
from graceful_ray.tune.search_space import Param, SearchSpace, architecture, for_method, learning_rate
from graceful_ray.tune.tuner import SearchSettings, build_tuner, restore_tuner

__all__ = [
    "dominates", "format_table", "pareto_front", "ACCURACY", "CROSS_MAP", "EDGE_OBJECTIVES", "FLOPS", "NFR",
    "TRADEOFF_OBJECTIVES", "Objective", "TrialRecord", "SearchReport", "SelectionRule", "finish",
    "report_from_records", "resume_search", "start_search", "Selection", "lowest_nfr_at_accuracy",
    "most_accurate_under_budget", "smallest_within", "Param", "SearchSpace", "architecture", "for_method",
    "learning_rate", "SearchSettings", "build_tuner", "restore_tuner",
]
