"""How trials are proposed (Optuna NSGA-II, study in an RDB) and stopped early.

Two details keep the front honest:

* :class:`ParetoOptunaSearch` tells Optuna a trial is ``COMPLETE`` only when the
  trial's final report (``trial_complete = 1``) arrived. Ray's ``OptunaSearch``
  would otherwise record the last epoch of a stopped trial as a finished
  two-objective value, and NSGA-II would breed from it. Stopped trials are
  ``PRUNED``, failed ones ``FAIL``.
* :class:`ParetoStopper` stops a trial only when, at the same epoch, another
  trial beats it on *every* objective by a margin: a trial that is merely
  worse on accuracy (the high-distillation end of the trade-off) is never
  stopped for it. Stopped trials then stay off the front (see ``pareto.py``).

The Optuna study lives in an RDB storage (SQLite file ``optuna.db`` in the run
directory by default), named after the run, so it survives the driver and can
be inspected with ``optuna.load_study(study_name=RUN, storage=URL)`` or
``optuna-dashboard sqlite:///.../optuna.db``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from graceful_ray.tune.trials import COMPLETE_FLAG, Objective

logger = logging.getLogger(__name__)


class ParetoOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that marks trials without a final report as pruned, not complete."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error and result is not None and not result.get(COMPLETE_FLAG):
            result = None  # OptunaSearch tells PRUNED when there is no value and no error
        super().on_trial_complete(trial_id, result=result, error=error)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, with its thread lock left out of its pickle.

    Ray Tune pickles the searcher (and with it the study and the sampler) into
    ``tuner.pkl`` when the Tuner is built, and into every searcher checkpoint.
    Optuna 5.1's genetic samplers hold a ``threading.Lock`` (``_thread_lock``)
    and define no ``__getstate__``, so every search failed at its start with
    "cannot pickle '_thread.lock' object". A fresh lock is made on unpickling.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()


def study_storage(url: str):
    """An Optuna RDB storage (``sqlite:///abs/path.db``, ``postgresql://...``)."""
    return optuna.storages.RDBStorage(url)


def default_population(trials: int) -> int:
    """NSGA-II generation size: several generations even for a small budget of trials.

    Optuna's default (50) would make a 16-trial search a single random
    generation; a quarter of the budget gives about four.
    """
    return max(4, min(50, trials // 4))


def make_searcher(objectives: Sequence[Objective], *, study_url: str, study_name: str, trials: int,
                  population: int | None = None, seed: int = 0,
                  points_to_evaluate: list[dict[str, Any]] | None = None) -> ParetoOptunaSearch:
    """``points_to_evaluate``: trials Optuna runs first, as given (the plain trial of a search across methods)."""
    sampler = PicklableNSGAIISampler(population_size=population or default_population(trials), seed=seed)
    return ParetoOptunaSearch(metric=[o.metric for o in objectives], mode=[o.mode for o in objectives],
                              sampler=sampler, storage=study_storage(study_url), study_name=study_name,
                              points_to_evaluate=points_to_evaluate or None)


def _stopper_base():
    from ray.tune.stopper import Stopper

    return Stopper


class ParetoStopper(_stopper_base()):
    """Stop a trial dominated, at the same epoch and by a margin on every objective, by another trial.

    ``grace_epochs`` epochs always run. Margins are per objective (in the
    objective's units), so a point within noise of another is never stopped.
    """

    def __init__(self, objectives: Sequence[Objective], *, grace_epochs: int = 1,
                 margins: Sequence[float] | None = None, epoch_metric: str = "epoch") -> None:
        self.objectives = tuple(objectives)
        self.grace_epochs = int(grace_epochs)
        self.margins = tuple(margins) if margins is not None else tuple(0.0 for _ in objectives)
        if len(self.margins) != len(self.objectives):
            raise ValueError("one margin per objective")
        self.epoch_metric = epoch_metric
        self._seen: dict[int, dict[str, tuple[float, ...]]] = {}
        self.stopped: list[str] = []

    def _beats(self, a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        for o, m, va, vb in zip(self.objectives, self.margins, a, b):
            gain = va - vb if o.mode == "max" else vb - va
            if not gain > m:
                return False
        return True

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get(COMPLETE_FLAG):
            return False
        epoch = result.get(self.epoch_metric)
        try:
            point = tuple(float(result[o.metric]) for o in self.objectives)
        except (KeyError, TypeError, ValueError):
            return False
        if epoch is None or any(v != v for v in point):
            return False
        at_epoch = self._seen.setdefault(int(epoch), {})
        at_epoch[trial_id] = point
        if int(epoch) < self.grace_epochs:
            return False
        if any(self._beats(other, point) for tid, other in at_epoch.items() if tid != trial_id):
            logger.info("stopping trial %s at epoch %s: dominated on every objective", trial_id, epoch)
            self.stopped.append(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        return False
