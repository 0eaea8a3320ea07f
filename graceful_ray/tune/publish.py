"""Publish the selected trial's model to the registry, with lineage, as ``candidate``.

The trial's checkpoint (from its Ray Train run) is published through the same
:func:`graceful_ray.train.trainer.publish_result` as ``graceful-ray train``, so
the manifest records the parent (the old model), the method and its
hyperparameters, the dataset checksum, the final metrics and the Train run
name (``<tune run>-<trial id>``). Then the alias moves to it. Nothing else in
the registry changes: ``production`` stays where it was until a cutover.
"""

from __future__ import annotations

import logging

from graceful_ray.errors import ConfigError
from graceful_ray.tune.trainable import load_checkpoint, trial_config
from graceful_ray.tune.trials import TrialRecord

# Lazy imports: the trainer and the registry (torch) load only when a trial is published.

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "candidate"


def publish_trial(settings, record: TrialRecord, *, alias: str | None = DEFAULT_ALIAS):
    """Publish ``record``'s checkpoint; returns the registry :class:`Manifest`."""
    from graceful_ray.registry import Registry
    from graceful_ray.train.trainer import prepare_upgrade, publish_result

    if not record.complete:
        raise ConfigError(f"trial {record.trial_id} is {record.status}: only complete trials can be published")
    if not record.checkpoint_path:
        raise ConfigError(f"trial {record.trial_id} reported no checkpoint; nothing to publish")
    cfg = trial_config(settings.trial_spec(), record.params, record.trial_id)
    loop, _, info = prepare_upgrade(cfg)  # the old outputs are cached: cheap
    state_dict, _, progress = load_checkpoint(record.checkpoint_path)
    metrics = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    manifest = publish_result(cfg, loop, info, state_dict, metrics)
    if alias:
        Registry(cfg.registry).set_alias(manifest.name, alias, manifest.version)
    logger.info("published trial %s as %s@v%d%s", record.trial_id, manifest.name, manifest.version,
                f" (alias {alias})" if alias else "")
    return manifest
