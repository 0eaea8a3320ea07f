"""Build, run and resume a search; turn its trials into records.

:class:`SearchSettings` is everything that defines a search. It is written to
``<run dir>/search.json`` before the first trial, so ``--resume RUN`` needs
nothing but the run name: the Tuner is restored from Tune's experiment state
(finished trials are kept, unfinished ones restarted and their Train runs
resumed), the Optuna study from its RDB storage.

Trial resources follow the Train V2 + Tune guide: the trial is the Train
driver and asks for ``driver_cpus`` (a fraction of a CPU); Train acquires the
workers' placement group itself; ``max_concurrent_trials`` keeps the number of
in-flight Train runs within what the cluster can hold, leaving one CPU for
Ray Data. That CPU is a total over the nodes, not one node's: Ray Data's read
and decode tasks ask for a quarter CPU each (``data.reader.READ_TASK_CPUS``,
``UpgradeConfig.decode_cpus``), so a node with any quarter free runs them. (At
Ray Data's default of 1 CPU per task, two trials on cluster/local.sh's 2 nodes x
2 CPUs left no node a whole CPU and the search hung; the trainable and Train's
controller are not the cause: the controller and the split coordinator ask for
0 CPUs.)
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from graceful_ray.errors import ConfigError
from graceful_ray.storage import Location, resolve
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.tune.trials import (COMPLETE, COMPLETE_FLAG, EARLY_STOPPED, EDGE_OBJECTIVES, ERROR, RUNNING,
                                       TRADEOFF_OBJECTIVES, Objective, TrialRecord)
from graceful_ray.tune.search_space import SearchSpace
from graceful_ray.tune.trainable import EDGE, SEARCHES, TRADEOFF, TrialSpec, absolute, upgrade_trial

# Lazy imports: Ray Tune (and search_algorithm, whose classes subclass Ray Tune's) loads only when a
# search starts, after the arguments are checked.

logger = logging.getLogger(__name__)

SETTINGS_FILE = "search.json"
STUDY_FILE = "optuna.db"


@dataclass
class SearchSettings:
    """One search. ``base`` is the training config every trial starts from."""

    base: dict[str, Any]  # UpgradeConfig.to_dict()
    search: str = TRADEOFF
    space: dict[str, Any] = field(default_factory=dict)  # SearchSpace.to_dict()
    trials: int = 16
    max_concurrent: int | None = None
    run_name: str = ""
    storage: str = ""  # root of tune runs; the run is <storage>/<run_name>
    seed: int = 0
    population: int | None = None
    study_url: str | None = None  # Optuna RDB URL; default sqlite:///<run dir>/optuna.db
    driver_cpus: float = 0.25
    early_stop: bool = False
    grace_epochs: int | None = None
    margins: tuple[float, ...] | None = None
    verbose: int = 1  # Tune's console output: 0 silent (the demo prints its own summary), 1 trial tables

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(f"unknown search {self.search!r}; use one of {SEARCHES}")
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.driver_cpus < 0:
            raise ConfigError(f"driver_cpus must be >= 0, got {self.driver_cpus}")
        if self.early_stop and self.search == EDGE:
            raise ConfigError("early stopping is for the trade-off search: the edge objective (cross-model mAP) "
                              "is only known once a trial has finished")

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return TRADEOFF_OBJECTIVES if self.search == TRADEOFF else EDGE_OBJECTIVES

    @property
    def run_dir(self) -> Location:
        return resolve(self.storage).join(self.run_name)

    @property
    def study(self) -> str:
        if self.study_url:
            return self.study_url
        loc = self.run_dir
        if not loc.is_local:
            raise ConfigError(f"the run directory {loc.uri} is not local, so the Optuna study cannot be a SQLite "
                              "file in it: pass --study-url (e.g. postgresql://user@host/db)")
        return f"sqlite:///{loc.path}/{STUDY_FILE}"

    def upgrade_config(self):
        return UpgradeConfig(**self.base)

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "SearchSettings":
        d = json.loads(text)
        if d.get("margins") is not None:
            d["margins"] = tuple(d["margins"])
        return cls(**d)

    def save(self) -> None:
        self.run_dir.join(SETTINGS_FILE).write_bytes(self.to_json().encode())

    @classmethod
    def load(cls, storage: str, run_name: str) -> "SearchSettings":
        loc = resolve(storage).join(run_name, SETTINGS_FILE)
        if not loc.exists():
            raise ConfigError(f"no search named {run_name!r} under {storage} ({loc.uri} is missing); "
                              "check --storage and the run name")
        return cls.from_json(loc.read_bytes())

    def trial_spec(self) -> TrialSpec:
        return TrialSpec(base=self.base, space=self.space, run_dir=self.run_dir.uri, run_name=self.run_name,
                         search=self.search)


def absolutize_base(base: dict[str, Any]) -> dict[str, Any]:
    """Trials run in their own working directory: make local data/registry paths absolute."""
    out = dict(base)
    for key in ("data", "registry", "storage"):
        out[key] = absolute(out.get(key))
    return out


def default_max_concurrent(settings: SearchSettings) -> int:
    """As many Train runs as the cluster holds at once, keeping one CPU for Ray Data."""
    import ray

    base = settings.base
    per_trial = settings.driver_cpus + base["workers"] * base["cpus_per_worker"]
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    n = int(max(1.0, cpus - 1.0) // max(per_trial, 1e-6))
    if base.get("use_gpu"):
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        n = min(n, int(gpus // base["workers"]))
    return max(1, min(n, settings.trials))


def _trainable(settings: SearchSettings):
    from ray import tune

    trainable = tune.with_parameters(upgrade_trial, spec=settings.trial_spec())
    return tune.with_resources(trainable, {"CPU": settings.driver_cpus})


def _run_config(settings: SearchSettings, stopper):
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback

    storage = resolve(settings.storage)
    return tune.RunConfig(
        name=settings.run_name,
        storage_path=storage.path if storage.is_local else storage.path,
        storage_filesystem=None if storage.is_local else storage.fs,
        # TensorBoard for every trial (Tune also adds it by default unless
        # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1; naming it makes that explicit).
        callbacks=[TBXLoggerCallback()],
        stop=stopper,
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=settings.verbose,
    )


def make_stopper(settings: SearchSettings):
    if not settings.early_stop:
        return None
    from graceful_ray.tune.search_algorithm import ParetoStopper

    epochs = int(settings.base["epochs"])
    grace = settings.grace_epochs if settings.grace_epochs is not None else max(1, epochs // 3)
    margins = settings.margins or (0.01, 0.005)  # accuracy, NFR: about twice their noise on 2k rows
    return ParetoStopper(settings.objectives, grace_epochs=grace, margins=margins)


def build_tuner(settings: SearchSettings, *, callbacks: list | None = None):
    """A fresh ``Tuner`` for ``settings`` (``callbacks``: extra Tune callbacks, e.g. for tests)."""
    from ray import tune

    from graceful_ray.tune.search_algorithm import make_searcher

    space = settings.search_space()
    plain = space.plain_point(lr=settings.base.get("lr"), schedule=settings.base.get("lr_schedule"))
    searcher = make_searcher(settings.objectives, study_url=settings.study, study_name=settings.run_name,
                             trials=settings.trials, population=settings.population, seed=settings.seed,
                             points_to_evaluate=[plain] if plain else None)
    run_config = _run_config(settings, make_stopper(settings))
    if callbacks:
        run_config.callbacks = [*run_config.callbacks, *callbacks]
    return tune.Tuner(
        _trainable(settings),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=settings.trials,
                                    max_concurrent_trials=settings.max_concurrent or default_max_concurrent(settings),
                                    reuse_actors=False),
        run_config=run_config,
    )


def restore_tuner(settings: SearchSettings):
    """The interrupted ``Tuner``: finished trials kept, unfinished ones restarted (their Train runs resume)."""
    from ray import tune

    loc = settings.run_dir
    path = loc.path if loc.is_local else loc.uri
    fs = None if loc.is_local else loc.fs
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise ConfigError(f"{loc.uri} has no Tune experiment state to resume (did the search start?)")
    return tune.Tuner.restore(path, trainable=_trainable(settings), resume_unfinished=True,
                              resume_errored=False, restart_errored=False, storage_filesystem=fs)


def trial_statuses(grid) -> dict[str, str]:
    """Tune's own status per trial id (``TERMINATED``, ``ERROR``, ``RUNNING``, ``PENDING`` ...).

    ``ResultGrid`` exposes results, not trial states; the states tell a trial a
    stopper ended (``TERMINATED`` without a final report) from one an
    interruption left unfinished. Empty when Tune's internals are not there.
    """
    try:
        return {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    except AttributeError:  # pragma: no cover - depends on Tune internals
        return {}


def records_from_results(grid, space_names: list[str], *, finished: bool = True) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial of a ``ResultGrid``.

    A trial is complete only if its last report carries ``trial_complete = 1``;
    an errored one is ``error``; a trial Tune still counts as pending or running
    (the search was interrupted) is ``running``; any other was stopped early.
    ``finished=False`` treats every trial without a final report as running.
    """
    statuses = trial_statuses(grid)
    records = []
    for res in grid:
        metrics = dict(res.metrics or {})
        config = dict(res.config or {})
        trial_id = str(metrics.get("trial_id") or _trial_id_from_path(res.path))
        tune_status = statuses.get(trial_id)
        if res.error is not None:
            status = ERROR
        elif metrics.get(COMPLETE_FLAG) == 1:
            status = COMPLETE
        elif not finished or tune_status in ("PENDING", "RUNNING", "PAUSED"):
            status = RUNNING
        else:
            status = EARLY_STOPPED
        params = {k: _plain(config[k]) for k in space_names if k in config}
        keep = {k: _plain(v) for k, v in metrics.items()
                if isinstance(v, (int, float, str, bool)) and k not in ("config",)}
        records.append(TrialRecord(
            trial_id=trial_id, status=status, params=params, metrics=keep,
            checkpoint_path=metrics.get("checkpoint_path"), train_run=metrics.get("train_run"),
            error=_one_line(res.error) if res.error is not None else None))
    return sorted(records, key=lambda r: r.trial_id)


def _trial_id_from_path(path: str | None) -> str:
    """Tune trial directories are ``<trainable>_<trial id>_<index>_...``; the id is ``xxxxx_NNNNN``."""

    m = re.search(r"_([0-9a-f]{5}_\d{5})_", path or "")
    return m.group(1) if m else (path or "unknown")


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    if isinstance(v, float) and math.isinf(v):
        return None
    return v
