"""Everything about an upgrade run that can be wrong, checked before Ray starts.

A bad method name, hyperparameter, dataset, split, model argument or old-model
reference used to surface only from inside ``prepare_upgrade``, 10-12 s later,
after a local Ray had started. These checks read only small things (the
dataset's ``dataset.json``, the old model's manifest, not its weights) and
raise the same :class:`~graceful_ray.errors.GracefulRayError` subclasses the run
would, so the CLI prints one line and exits non-zero at once.
"""

from __future__ import annotations

from graceful_ray.data import read_info
from graceful_ray.errors import ConfigError
from graceful_ray.methods import catalog
from graceful_ray.train.config import UpgradeConfig

# Lazy imports: the model factory, the methods' classes and the registry (torch) load only after the
# cheap checks pass.


def check_method_names(spec: str) -> None:
    """The cheap part of the method check: every name in ``spec`` (``a+b``) is declared.
    The names come from the methods' declarations, read without importing torch
    (graceful_ray.methods.catalog); the registry's own checks (hyperparameters,
    repeats) follow in build_method."""
    known = catalog.names()
    for name in (n.strip() for n in spec.split("+")):
        if name and name not in known:
            raise ConfigError(f"unknown method {name!r} in spec {spec!r}; valid methods are "
                              f"{sorted(known)} (combine several with '+', e.g. 'bct+fd')")


def check_upgrade(cfg: UpgradeConfig, *, check_model: bool = True) -> None:
    """Raise on the first thing wrong with ``cfg``; ``check_model=False`` when a
    search space, not ``cfg``, decides the architecture."""

    cfg.validate()
    check_method_names(cfg.method)
    info = read_info(cfg.data)  # a missing or foreign dataset
    for split in (cfg.train_split, cfg.val_split):
        if split not in info.splits:
            raise ConfigError(f"dataset {cfg.data} has no split {split!r}; it has {sorted(info.splits)}")
    check_augmentation(cfg, info.feature_shape)
    # torch from here on (methods, models): what is left needs them
    from graceful_ray.methods import build_method

    method = build_method(cfg.method, **cfg.hparams)  # hyperparameters
    if check_model:
        from graceful_ray.models import ModelSpec, build_model

        build_model(ModelSpec(cfg.model, tuple(info.feature_shape), info.num_classes,
                              dict(cfg.model_kwargs)))
    if cfg.old:
        from graceful_ray.registry import Registry

        Registry(cfg.registry).get(cfg.old)  # the manifest: a reference that names nothing
    elif method.needs_old_model:
        raise ConfigError(f"method {cfg.method!r} needs an old model: pass --old NAME@VERSION "
                          "(or use method 'plain' to train a first version)")


def check_augmentation(cfg: UpgradeConfig, feature_shape) -> None:
    """Image augmentation needs images (C, H, W), not feature vectors."""
    if cfg.augment_images and len(feature_shape) != 3:
        raise ConfigError(f"augment_images crops and flips images, but dataset {cfg.data} holds inputs of "
                          f"shape {list(feature_shape)}: use it on an image dataset (C, H, W)")
