"""`graceful-ray tune`: search the accuracy / flip-rate trade-off (or edge architectures) on Ray Tune.

Exit status: 0 when a model was selected (and published unless --no-publish),
3 when the search ran but no trial meets the selection rule (nothing is
published), 4 when the search was interrupted (Ctrl-C; resume it), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging

from graceful_ray.data import read_info
from graceful_ray.errors import ConfigError
from graceful_ray.keyvalue import parse_kv
from graceful_ray.methods import catalog
from graceful_ray.paths import registry_root, under_root
from graceful_ray import raycluster  # raycluster.ensure_ray looked up when called: see train/cli.py
from graceful_ray.train.checks import check_method_names, check_upgrade
from graceful_ray.train.config import LR_SCHEDULES, UpgradeConfig, generate_run_name
from graceful_ray.tune import search_space as sp
from graceful_ray.tune.pareto import format_table
from graceful_ray.tune.sweep import SelectionRule, finish, resume_search, start_search
from graceful_ray.tune.trainable import absolute
from graceful_ray.tune.tuner import SearchSettings, absolutize_base

# Lazy imports: torch, Ray and the registry load only after the arguments are checked (issue 16).

logger = logging.getLogger(__name__)

NO_CANDIDATE = 3
INTERRUPTED = 4


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `graceful-ray tune` and `jobs/tune_tradeoff.py`."""
    g = p.add_argument_group("what to train (ignored with --resume: the run's search.json has it)")
    g.add_argument("--data", help="dataset directory or URI (required unless --resume)")
    g.add_argument("--old", help="old model NAME@VERSION; for --search edge the large cloud model")
    g.add_argument("--method", default=None,
                   help="one objective to search (fd, fd-kl, bct+fd, ...; bct is the edge default). Default for "
                        "tradeoff: search across methods (--methods), their weights and the lr schedule, with plain "
                        "always among the trials")
    g.add_argument("--methods", default=None, metavar="A,B",
                   help="the methods a search across methods chooses from (default: "
                        f"{','.join(i.name for i in catalog.tradeoff_methods())}; plain is always added)")
    g.add_argument("--init-from-old", action="store_true",
                   help="warm start every trial from --old's weights (same --model and --model-arg)")
    g.add_argument("--model", default="cnn1d", help="zoo model (for --search edge: the small-model family)")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="fixed model argument (repeatable)")
    g.add_argument("--hp", action="append", metavar="KEY=VALUE",
                   help="fixed method hyperparameter, not searched (e.g. fd_kind=kl) (repeatable)")
    g.add_argument("--space", action="append", metavar="NAME=RANGE",
                   help="replace a searched range: fd_lambda=loguniform:0.1:100, fd_beta=uniform:0:10, "
                        "model.depth=int:1:4, model.channels=choice:8,16 or fix it: fd_beta=5 (repeatable)")
    g.add_argument("--name", default="model", help="registry name the selected model is published under")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128,
                   help="global batch per step of each trial, split evenly across --workers-per-trial")
    g.add_argument("--lr", type=float, default=3e-3, help="learning rate when it is not searched")
    g.add_argument("--no-search-lr", action="store_true", help="do not search the learning rate (trade-off search)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="every trial's schedule: cosine decay to 0 or a constant learning rate (default: searched "
                        "in a search across methods, else cosine)")
    g.add_argument("--seed", type=int, default=0, help="training seed and the NSGA-II sampler's seed")
    g.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers (DDP) per trial")
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument("--gpu", action="store_true", help="one GPU per Train worker")

    s = p.add_argument_group("the search")
    s.add_argument("--search", choices=("tradeoff", "edge"), default="tradeoff",
                   help="tradeoff: method hyperparameters, accuracy up / NFR down; edge: small architectures "
                        "trained with BCT against --old, M(small, large) up / FLOPs down")
    s.add_argument("--trials", type=int, default=16)
    s.add_argument("--max-concurrent", type=int, help="trials in flight (default: what the cluster holds)")
    s.add_argument("--population", type=int, help="NSGA-II population size (default: trials/4, 4..50)")
    s.add_argument("--early-stop", action="store_true",
                   help="stop trials dominated on both objectives at the same epoch (never put on the front)")
    s.add_argument("--grace-epochs", type=int, help="epochs every trial runs before it may be stopped")
    s.add_argument("--driver-cpus", type=float, default=0.25, help="CPUs for each trial's Train driver")
    s.add_argument("--study-url", help="Optuna RDB storage URL (default sqlite:///<run dir>/optuna.db)")
    s.add_argument("--run-name", help="name of the search (default tune-<method>-<time>)")
    s.add_argument("--resume", metavar="RUN", help="resume the interrupted search RUN (finished trials are kept)")
    s.add_argument("--storage", help="root of tune runs (default $GRACEFUL_RAY_ROOT/tune)")
    s.add_argument("--registry", help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    s.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")

    c = p.add_argument_group("selection and publishing")
    c.add_argument("--flip-budget", type=float,
                   help="publish the most accurate trial whose NFR upper 95%% bound is <= this (e.g. 0.02)")
    c.add_argument("--min-accuracy", type=float, help="or: publish the lowest-NFR trial with accuracy >= this")
    c.add_argument("--max-accuracy-drop", type=float, default=0.005,
                   help="search across methods without --min-accuracy: the accuracy floor is plain's minus this "
                        "(default 0.005: plain's error + 0.5 points)")
    c.add_argument("--map-tolerance", type=float, default=0.02,
                   help="edge: publish the smallest model with M(small, large) >= M(large, large) - this")
    c.add_argument("--alias", default="candidate", help="registry alias for the selected model")
    c.add_argument("--no-publish", action="store_true", help="report the selection, publish nothing")


def check_search_arguments(args: argparse.Namespace) -> None:
    """What is wrong with a new search's arguments that names and the dataset's
    ``dataset.json`` tell, checked before torch and Ray are imported (each takes
    seconds: ``tune --method bogus`` took 2.8 s to answer, ``train`` had the same
    fix). The rest (hyperparameters, the model, the old model) follows in
    :func:`settings_from_args` and ``check_upgrade``, which need torch."""

    _check_required(args)
    for spec in [args.method or "", *(args.methods or "").split(",")]:
        check_method_names(spec)
    info = read_info(args.data)  # a missing or foreign dataset
    for split in (args.train_split, args.val_split):
        if split not in info.splits:
            raise ConfigError(f"dataset {args.data} has no split {split!r}; it has {sorted(info.splits)}")


def _check_required(args: argparse.Namespace) -> None:
    if not args.data:
        raise ConfigError("--data is required for a new search (or pass --resume RUN)")
    if not args.old:
        raise ConfigError("--old NAME@VERSION is required: the search measures flips against the old model "
                          "(for --search edge: the large cloud model)")
    if args.workers_per_trial < 1:
        raise ConfigError("--workers-per-trial must be >= 1: each trial is a Ray Train run with workers "
                          "(Train's local mode cannot report to Tune)")


def settings_from_args(args: argparse.Namespace):
    """:class:`SearchSettings` for a new search (``--resume`` loads them from the run instead);
    reads no dataset (``run_tune`` checks it first, with :func:`check_search_arguments`)."""
    from graceful_ray.models.factory import ZOO

    _check_required(args)
    across = args.search == "tradeoff" and not args.method
    if args.methods and not across:
        raise ConfigError("--methods is for the default search across methods; drop --method to use it")
    method = args.method or ("bct" if args.search == "edge" else sp.PLAIN)
    schedule = args.lr_schedule or "cosine"
    registry = absolute(registry_root(args.registry))
    storage = absolute(args.storage or under_root("tune"))
    run_name = args.run_name or generate_run_name("tune-methods" if across else f"tune-{method.replace('+', '-')}")
    hparams = parse_kv(args.hp)
    model_kwargs = parse_kv(args.model_arg)
    if args.search == "edge":
        emb = _cloud_embedding_dim(registry, args.old)
        if "embedding_dim" in model_kwargs and int(model_kwargs["embedding_dim"]) != emb and "bct" in method:
            raise ConfigError(f"BCT needs the small model's embedding_dim to equal the cloud model's ({emb}); "
                              f"got model.embedding_dim={model_kwargs['embedding_dim']}")
        model_kwargs.pop("embedding_dim", None)
        space = sp.architecture(args.model, embedding_dim=emb, fixed_kwargs=model_kwargs)
        model_kwargs = {}
    else:
        if args.model not in ZOO and ":" not in args.model:
            raise ConfigError(f"unknown model {args.model!r}; zoo models are {sorted(ZOO)}")
        if across:
            methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
            space = sp.across_methods(methods, hparams,
                                      schedules=(args.lr_schedule,) if args.lr_schedule else sp.SCHEDULES)
            hparams = {}  # pinned values travel in the space; each trial keeps what its method takes
        else:
            space = sp.for_method(method, hparams)
        space = space + (sp.SearchSpace() if args.no_search_lr else sp.learning_rate())
    space = space.with_overrides({k: str(v) for k, v in parse_kv(args.space).items()})
    base = UpgradeConfig(
        data=args.data, model=args.model, model_kwargs=model_kwargs, method=method, hparams=hparams, old=args.old,
        init_from_old=args.init_from_old, name=args.name, train_split=args.train_split, val_split=args.val_split,
        epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, lr_schedule=schedule, seed=args.seed,
        workers=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu, max_failures=1, registry=registry,
        storage=storage, run_name=run_name, publish=False)
    return SearchSettings(
        base=absolutize_base(base.to_dict()), search=args.search, space=space.to_dict(), trials=args.trials,
        max_concurrent=args.max_concurrent, run_name=run_name, storage=storage, seed=args.seed,
        population=args.population, study_url=args.study_url, driver_cpus=args.driver_cpus,
        early_stop=args.early_stop, grace_epochs=args.grace_epochs)


def _cloud_embedding_dim(registry: str, ref: str) -> int:
    from graceful_ray.registry import Registry

    return int(Registry(registry).get(ref).embedding_dim)


def rule_from_args(args: argparse.Namespace):
    if args.flip_budget is not None and args.min_accuracy is not None:
        raise ConfigError("give one selection rule: --flip-budget or --min-accuracy")
    if args.max_accuracy_drop < 0:
        raise ConfigError(f"--max-accuracy-drop must be >= 0, got {args.max_accuracy_drop}")
    return SelectionRule(flip_budget=args.flip_budget, min_accuracy=args.min_accuracy,
                         max_accuracy_drop=args.max_accuracy_drop,
                         map_tolerance=args.map_tolerance, publish=not args.no_publish, alias=args.alias)


def run_tune(args: argparse.Namespace) -> int:
    rule = rule_from_args(args)
    if args.resume:
        storage = absolute(args.storage or under_root("tune"))
        settings = SearchSettings.load(storage, args.resume)
    else:
        check_search_arguments(args)  # names and the dataset, before torch is imported
        settings = settings_from_args(args)
    if settings.search == "tradeoff" and rule.flip_budget is None and rule.min_accuracy is None \
            and settings.search_space().plain_point() is None:
        raise ConfigError("give a selection rule: --flip-budget B (e.g. 0.02) or --min-accuracy A")
    # every argument before Ray starts (the edge search's space picks the architecture)
    check_upgrade(UpgradeConfig(**settings.base), check_model=settings.search != "edge")
    raycluster.ensure_ray(args.address)
    _say_where(settings)
    grid = resume_search(settings) if args.resume else start_search(settings)
    report = finish(settings, grid, rule)
    print(search_summary(settings, report))
    if report.interrupted:
        return INTERRUPTED
    return 0 if report.selection is not None else NO_CANDIDATE


def _say_where(settings) -> None:
    import ray

    print(f"search {settings.run_name} ({settings.search}): {settings.trials} trials, run directory "
          f"{settings.run_dir.uri}")
    print(f"  TensorBoard: tensorboard --logdir {settings.run_dir.uri}")
    print(f"  Optuna study: {settings.study} (study name {settings.run_name})")
    url = _dashboard_url() if ray.is_initialized() else None
    if url:
        print(f"  Ray dashboard: http://{url}")


def _dashboard_url() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:  # pragma: no cover
        return None


def search_summary(settings, report) -> str:
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(report.counts.items()))
    lines = [f"trials: {counts}; Pareto front: {len(report.front)} trial(s)"]
    if settings.search == "tradeoff":
        lines.append(f"old model accuracy {report.reference.get('old_accuracy', float('nan')):.4f} (NFR 0 by definition)")
        extra = ["nfr_upper", "val_negative_flips", "val_rows"]
    else:
        ref = report.reference
        lines.append(f"cloud model {ref['model']}: M(large, large) {ref['m_large_large']:.4f}, "
                     f"{ref['flops_per_sample']:,.0f} FLOPs/sample")
        extra = ["self_map", "parameters"]
    sel = report.selection.record.trial_id if report.selection else None
    lines.append(format_table(report.front, report.front, settings.objectives,
                              params=sorted(settings.search_space().params), extra_metrics=extra, selected=sel))
    lines.append(report.message)
    lines.append("outputs: " + ", ".join(f"{k} {v}" for k, v in report.outputs.items()))
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="search the accuracy / flip-rate trade-off (or edge architectures) on Ray Tune",
        description="Run Ray Train upgrade trainings as Ray Tune trials over the method's hyperparameters, "
                    "with accuracy and NFR as two objectives (Optuna NSGA-II); write the Pareto front "
                    "(table, JSON, PNG), TensorBoard logs for every trial, and publish the selected model "
                    "as 'candidate'. --search edge searches small architectures trained with BCT against a "
                    "large cloud model (M(small, large) up, FLOPs down). Exit status 3: no trial met the "
                    "selection rule, nothing published.")
    add_tune_arguments(p)
    p.set_defaults(func=run_tune)
