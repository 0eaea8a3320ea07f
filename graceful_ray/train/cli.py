"""`graceful-ray train`: one upgrade-training run on Ray Train."""

from __future__ import annotations

import argparse
import logging
import shutil
import textwrap

from graceful_ray.keyvalue import parse_kv
from graceful_ray.methods import catalog
# ensure_ray is looked up when it is called, not bound at import: this module is
# imported lazily by the first command that needs it, and a name bound then keeps
# whatever raycluster held at that moment (a test's stand-in, for the whole session).
from graceful_ray import raycluster
from graceful_ray.train.checks import check_upgrade
from graceful_ray.train.config import LR_SCHEDULES, UpgradeConfig

# Lazy imports: the trainer and the registry (torch, Ray) load only after the arguments are checked
# (issue 16).

logger = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by `train`, `jobs/train_upgrade.py` and `tune`."""
    p.add_argument("--data", required=True, help="dataset directory or URI (graceful-ray data make ...)")
    p.add_argument("--model", default="cnn1d", help="zoo model (mlp, cnn1d, resnet, resnet18, resnet50) or package.module:factory")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model factory argument, e.g. channels=64 (repeatable)")
    p.add_argument("--method", default="plain",
                   help=f"training objective, composable with '+' (e.g. bct+fd): {', '.join(catalog.names())}")
    p.add_argument("--hp", action="append", metavar="KEY=VALUE",
                   help="method hyperparameter, e.g. fd_lambda=1 fd_beta=5 bct_lambda=1 (repeatable)")
    p.add_argument("--old", help="the old model as NAME@VERSION or NAME@ALIAS (omit to train a first version)")
    p.add_argument("--init-from-old", action="store_true",
                   help="warm start: initialise the new model from --old's weights (same --model and --model-arg)")
    p.add_argument("--name", default="model", help="registry name the new model is published under")
    p.add_argument("--train-split", default="train", help="split to train on (old_train: what v1 sees)")
    p.add_argument("--val-split", default="val")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch per optimizer step, split evenly across --workers (each takes "
                        "batch-size / workers rows), so results do not depend on the worker count")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="cosine decay to 0 over the run (default), or a constant learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment-noise", type=float, default=0.0,
                   help="Gaussian input noise; with augmentation the old model runs online on the same batch")
    p.add_argument("--augment-shift", type=int, default=0, help="random circular shift of the input, in steps")
    p.add_argument("--augment-images", action="store_true",
                   help="random crop (after padding by --augment-pad) and horizontal flip of the training "
                        "images, done by Ray Data's decode tasks; validation is never augmented")
    p.add_argument("--augment-pad", type=int, default=4, help="padding of --augment-images' random crop, in pixels")
    p.add_argument("--workers", type=int, default=1,
                   help="Ray Train workers (DDP); 0 runs the loop in this process (Ray Train local mode)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--decode-cpus", type=float, default=UpgradeConfig.decode_cpus,
                   help="CPUs Ray Data may use in all to decode inputs (images) while the workers train "
                        "(default %(default)s: one decode task; 2 or more run that many tasks of 1 CPU)")
    p.add_argument("--cache-budget-mb", type=float, default=1024.0,
                   help="a worker keeps a split in memory after its first pass when it fits this; "
                        "larger splits stream from Ray Data every epoch (0: always stream)")
    p.add_argument("--stream-buffer-mb", type=float, default=UpgradeConfig.stream_buffer_mb,
                   help="object store Ray Data may fill with decoded blocks ahead of the workers, per "
                        "dataset (default %(default)s; 0: Ray Data's own limit, half the object store)")
    p.add_argument("--shuffle-buffer-mb", type=float, default=UpgradeConfig.shuffle_buffer_mb,
                   help="a worker's local shuffle buffer holds at most this much of decoded inputs, and at most "
                        f"{UpgradeConfig.shuffle_buffer_rows} rows, but at least one batch (default %(default)s)")
    p.add_argument("--memory-per-worker-mb", type=float, default=0.0,
                   help="memory each worker may use (0: no limit): reserved as Ray's memory resource and "
                        "enforced on its own memory (not object-store pages), a worker over it is stopped")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL and bf16 autocast")
    p.add_argument("--spread", action="store_true", help="place workers on different nodes (SPREAD)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("--registry", help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    p.add_argument("--storage", help="Ray Train run storage: local/NFS path or s3:// (default $GRACEFUL_RAY_ROOT/runs)")
    p.add_argument("--run-name", help="unique run name; re-using one resumes that run")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def config_from_args(args: argparse.Namespace):
    return UpgradeConfig(
        data=args.data, model=args.model, model_kwargs=parse_kv(args.model_arg), method=args.method,
        hparams=parse_kv(args.hp), old=args.old, init_from_old=args.init_from_old, name=args.name, train_split=args.train_split,
        val_split=args.val_split, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay, seed=args.seed, augment_noise=args.augment_noise,
        augment_shift=args.augment_shift, augment_images=args.augment_images, augment_pad=args.augment_pad,
        workers=args.workers, use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker, decode_cpus=args.decode_cpus,
        memory_per_worker_mb=args.memory_per_worker_mb,
        cache_budget_mb=args.cache_budget_mb, stream_buffer_mb=args.stream_buffer_mb,
        shuffle_buffer_mb=args.shuffle_buffer_mb, placement_strategy="SPREAD" if args.spread else "PACK",
        max_failures=args.max_failures, registry=args.registry, storage=args.storage, run_name=args.run_name,
    )


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args).resolved()
    check_upgrade(cfg)  # every argument, before Ray starts
    # Ray and torch only now: importing them takes seconds, and bad arguments are refused before.
    from graceful_ray.train.trainer import run_upgrade

    raycluster.ensure_ray(args.address)
    print(f"run {cfg.run_name}: {cfg.method} on {cfg.data} ({cfg.workers} worker(s), "
          f"{'GPU' if cfg.use_gpu else 'CPU'})")
    result = run_upgrade(cfg)
    if result.resumed:
        print(f"resumed existing run {cfg.run_name} from its latest checkpoint")
    m = result.metrics
    line = f"epochs {m.get('epoch')}: val accuracy {m.get('val_accuracy', float('nan')):.4f}"
    if "val_nfr" in m:
        line += f", NFR {m['val_nfr']:.4f}, PFR {m['val_pfr']:.4f} (old accuracy {m['val_old_accuracy']:.4f})"
    print(line)
    if result.published is not None:
        if getattr(args, "alias", None):
            from graceful_ray.registry import Registry

            Registry(cfg.registry).set_alias(result.published.name, args.alias, result.model_ref)
        print(f"published {result.model_ref} (embedding space {result.published.embedding_space})")
    print(f"run directory: {result.run_path}")
    return 0


def _width() -> int:
    return max(shutil.get_terminal_size().columns - 2, 40)  # what argparse wraps the options to


def methods_help() -> str:
    """The method list of ``train --help``: each declared method, its help line and
    its hyperparameters with their defaults (from the methods' own declarations)."""
    infos = list(catalog.declared().values())
    pad = max(len(i.name) for i in infos) + 4
    width = _width()
    lines = textwrap.wrap("methods (--method NAME, several joined by '+'; hyperparameters with --hp NAME=VALUE; "
                          f"methods from other modules with ${catalog.MODULES_ENV}=module,...):", width)
    for i in infos:
        text = i.help
        if i.hyperparameters:
            text += " [" + ", ".join(f"{k}={v!r}" for k, v in i.hyperparameters.items()) + "]"
        lines += textwrap.wrap(text, width, initial_indent=f"  {i.name:<{pad - 2}}", subsequent_indent=" " * pad)
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a new model compatible with an old one (Ray Train)",
        description=textwrap.fill("Train a model on Ray Train with a compatibility objective and publish it to "
                                  "the registry with its lineage. Re-using --run-name resumes that run.", _width()),
        epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--alias", help="point this registry alias (e.g. production) at the new version")
    p.set_defaults(func=run_train)
