"""The Tune trial: one Ray Train upgrade run per sampled configuration.

Ray 2.60 has no ``Tuner(trainer)``; the documented pattern (Train V2 user
guide, "Hyperparameter Tuning with Ray Tune") is a *function trainable* that
builds a ``TorchTrainer`` and calls ``fit()``. The trial process is only the
Train driver: the Train workers get their own placement group, so the trial
itself asks for a fraction of a CPU (see ``tuner.py``). Each epoch's metrics
reach Tune through :class:`~ray.tune.integration.ray_train.TuneReportCallback`
(a Train ``UserCallback`` on the Train controller that pushes rank 0's report
into the trial's result queue); the loop all-reduces its metrics, so rank 0's
numbers are the whole validation set's.

After training the trial reports once more, with everything the front and the
selection need (flip counts, the checkpoint, for the edge search the
cross-model mAP and FLOPs) and ``trial_complete = 1``. Only that report makes a
trial *complete*; a trial stopped early never sends it.

Resume: the Train run of a trial is named ``<tune run>-<trial id>`` and lives
under the tune run directory, so a trial restarted after the Tune driver died
resumes its Train run from the last epoch checkpoint. A trial that had already
finished wrote ``trials/<id>.json``; restarted, it re-reports that record and
trains nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from graceful_ray.data import load_split
from graceful_ray.errors import ConfigError
from graceful_ray.metrics import Rate, m_score
from graceful_ray.storage import Location, resolve
from graceful_ray.train.config import UpgradeConfig
from graceful_ray.tune.search_space import SearchSpace
from graceful_ray.tune.trials import COMPLETE, COMPLETE_FLAG

# Lazy imports: torch and Ray load only inside a trial.

logger = logging.getLogger(__name__)

TRADEOFF = "tradeoff"
EDGE = "edge"
SEARCHES = (TRADEOFF, EDGE)


@dataclass
class TrialSpec:
    """What every trial of one search shares (travels to trials via ``tune.with_parameters``)."""

    base: dict[str, Any]  # UpgradeConfig.to_dict(), paths absolute
    space: dict[str, Any]  # SearchSpace.to_dict()
    run_dir: str  # the Tune run directory (local path or URI)
    run_name: str
    search: str = TRADEOFF
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.search not in SEARCHES:
            raise ConfigError(f"unknown search {self.search!r}; use one of {SEARCHES}")


def train_storage(run_dir: str) -> str:
    """Where the trials' Ray Train runs live: inside the Tune run directory."""
    return resolve(run_dir).join("train").uri


def trial_record_location(run_dir: str, trial_id: str) -> Location:
    return resolve(run_dir).join("trials", f"{trial_id}.json")


def trial_config(spec: TrialSpec, sample: dict[str, Any], trial_id: str):
    """The :class:`UpgradeConfig` of one trial (no publish: the search publishes the selected one)."""

    cfg = SearchSpace.from_dict(spec.space).apply(UpgradeConfig(**spec.base), sample)
    return replace(cfg, run_name=f"{spec.run_name}-{trial_id}", storage=train_storage(spec.run_dir), publish=False)


def _epoch_forwarder(extra: dict[str, Any], last_epoch: int):
    """A ``TuneReportCallback`` that adds per-trial constants to every epoch's report.

    Tune checks that every result carries the search's objective metrics; for
    the edge search FLOPs are known before training and the cross-model mAP
    only after it (NaN until then). The last epoch is not forwarded: the
    trial's final report carries it (with the flip counts and the checkpoint),
    so TensorBoard's step ``E`` is epoch ``E`` for every trial.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochForwarder(TuneReportCallback):
        def __init__(self, constants: dict[str, Any], last: int):
            super().__init__()
            self._constants = dict(constants)
            self._last = int(last)

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch") == self._last:
                return
            merged = [{**self._constants, **m, COMPLETE_FLAG: 0} for m in metrics]
            super().after_report(run_context, merged, checkpoint)

    return EpochForwarder(extra, last_epoch)


def checkpoint_uri(checkpoint) -> str:
    """A URI for a Ray Train checkpoint (its ``path`` has no scheme on object stores)."""

    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path}"


def load_checkpoint(uri: str) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, progress) of a trial's checkpoint, wherever it lives."""
    from graceful_ray.train.loop import load_checkpoint_dir

    loc = resolve(uri)
    if loc.is_local:
        return load_checkpoint_dir(loc.path)
    import ray.train

    with ray.train.Checkpoint(path=loc.path, filesystem=loc.fs).as_directory() as d:
        return load_checkpoint_dir(d)


def edge_metrics(cfg, spec, state_dict: dict) -> dict[str, float]:
    """Cross-model retrieval on the validation split: queries by the small model, gallery by the cloud model.

    Also ``self_map`` (M(small, small)) so a report can tell a small model that
    is compatible but weak from one that is strong on its own.
    """
    import torch

    from graceful_ray.evaluate import predict
    from graceful_ray.models import build_model
    from graceful_ray.train.trainer import export_for_registry

    x, y, _ = load_split(cfg.data, cfg.val_split)
    state, fmt = export_for_registry(cfg, spec, state_dict)
    if fmt != "network":
        raise ConfigError(f"method {cfg.method!r} exports {fmt!r} weights; the edge search needs a plain network")
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        small = np.concatenate([model.embed(torch.as_tensor(np.ascontiguousarray(x[i:i + 4096]))).numpy()
                                for i in range(0, len(x), 4096)])
    cloud = predict(cfg.registry, cfg.old, x).embeddings
    return {"cross_map": m_score(small, cloud, y).map, "self_map": m_score(small, small, y).map}


def model_cost_metrics(spec) -> dict[str, float]:
    """FLOPs per sample (torch's counter, one sample) and parameter count of a model spec."""
    from graceful_ray.models import build_model, model_cost

    cost = model_cost(build_model(spec))
    return {"flops_per_sample": float(cost.flops_per_sample), "parameters": float(cost.parameters)}


def _nfr_upper(metrics: dict[str, Any]) -> float:
    flips, rows = metrics.get("val_negative_flips"), metrics.get("val_rows")
    if flips is None or rows is None:
        return math.nan
    return Rate.of(int(round(flips)), int(round(rows))).high


def upgrade_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Tune function trainable: train one configuration on Ray Train, report per epoch and at the end."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    sample = {k: _plain(v) for k, v in config.items()}
    record_loc = trial_record_location(spec.run_dir, trial_id)
    if record_loc.exists():
        done = json.loads(record_loc.read_bytes())
        if done.get("status") == COMPLETE and done.get("params") == sample:
            logger.info("trial %s already finished before the interruption: re-reporting it", trial_id)
            ray.tune.report(done["metrics"])
            return

    from graceful_ray.train.trainer import build_trainer, fit, prepare_upgrade

    cfg = trial_config(spec, sample, trial_id)
    loop, datasets, _ = prepare_upgrade(cfg)
    model_spec = loop.spec
    constants: dict[str, Any] = {}
    if spec.search == EDGE:
        constants.update(model_cost_metrics(model_spec), cross_map=math.nan)
    trainer = build_trainer(cfg, loop, datasets)
    # build_trainer builds the RunConfig without callbacks; Train reads them at fit().
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), _epoch_forwarder(constants, cfg.epochs)]
    result = fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: Train run {cfg.run_name} finished without a checkpoint")
    ckpt = checkpoint_uri(result.checkpoint)
    state_dict, _, progress = load_checkpoint(ckpt)
    history = progress["history"]
    final: dict[str, Any] = {**constants, **history[-1]}
    if spec.search == EDGE:
        final.update(edge_metrics(cfg, model_spec, state_dict))
    final.update({COMPLETE_FLAG: 1, "nfr_upper": _nfr_upper(final), "checkpoint_path": ckpt,
                  "train_run": cfg.run_name, "epochs_run": len(history)})
    record = {"trial_id": trial_id, "status": COMPLETE, "params": sample, "metrics": final,
              "checkpoint_path": ckpt, "train_run": cfg.run_name}
    record_loc.write_bytes(json.dumps(record, indent=1, default=_json_default).encode())
    ray.tune.report(final)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def absolute(path: str | None) -> str | None:
    """Local paths made absolute (Tune runs trials in their own working directory); URIs unchanged."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))

