"""`graceful-ray data ...`: make a built-in dataset, check one."""

from __future__ import annotations

import argparse
import time

from graceful_ray.data.contract import DatasetInfo, SCENARIOS
from graceful_ray.errors import ConfigError


def _classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--old-classes takes comma-separated class indices like 0,1,2, not {text!r}"
        ) from None


def _summary(info: DatasetInfo, root: str) -> str:
    lines = [f"dataset {info.name} at {root}",
             f"  kind {info.kind}, feature_shape {tuple(info.feature_shape)}, "
             f"{info.num_classes} classes, scenario {info.scenario}",
             f"  checksum {info.checksum}"]
    for name in sorted(info.splits):
        si = info.splits[name]
        sub = f" (subset of {si.subset_of})" if si.subset_of else ""
        lines.append(f"  {name:<10} {si.rows:>8} rows  {len(si.files)} file(s){sub}")
    return "\n".join(lines)


def _make(args: argparse.Namespace) -> int:
    from graceful_ray.data.builtin import make_digits, make_mnist1d

    common = dict(seed=args.seed, scenario=args.scenario, old_fraction=args.old_fraction,
                  old_classes=args.old_classes, val_fraction=args.val_fraction,
                  test_fraction=args.test_fraction, overwrite=args.overwrite)
    t0 = time.perf_counter()
    if args.dataset == "mnist1d":
        if args.images:
            raise ConfigError("--images applies to digits only; MNIST-1D is 1-D signals")
        info = make_mnist1d(args.out, samples=args.samples or 10_000, **common)
    else:
        if args.samples is not None:
            raise ConfigError("digits has a fixed size (1797 rows); drop --samples")
        info = make_digits(args.out, as_images=args.images, **common)
    print(_summary(info, args.out))
    print(f"  made in {time.perf_counter() - t0:.1f}s")
    return 0


def _check(args: argparse.Namespace) -> int:
    from graceful_ray.data.validate import validate_dataset

    info = validate_dataset(args.dir)
    print(f"OK: every split follows the data contract and matches its checksums\n"
          f"{_summary(info, args.dir)}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``data make`` and ``data check``."""
    p = subparsers.add_parser("data", help="make and check Parquet datasets",
                              description="Datasets in the graceful-ray Parquet contract.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    m = sub.add_parser("make", help="generate a built-in dataset (no download)")
    m.add_argument("dataset", choices=["mnist1d", "digits"])
    m.add_argument("--out", required=True, help="directory or s3:// / gs:// URI")
    m.add_argument("--samples", type=int, default=None,
                   help="MNIST-1D rows (default 10000, rounded down to a multiple of 10)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--scenario", choices=list(SCENARIOS), default="data_growth",
                   help="what the old model (v1) trains on: a fraction of train "
                        "(data_growth), a subset of classes (class_incremental) or all (none)")
    m.add_argument("--old-fraction", type=float, default=0.3,
                   help="data_growth: share of train in old_train")
    m.add_argument("--old-classes", type=_classes, default=None,
                   help="class_incremental: the old model's classes, e.g. 0,1,2,3,4")
    m.add_argument("--val-fraction", type=float, default=0.1)
    m.add_argument("--test-fraction", type=float, default=0.2)
    m.add_argument("--images", action="store_true", help="digits as 8x8 PNG images")
    m.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    m.set_defaults(func=_make)

    c = sub.add_parser("check", help="validate a dataset and verify its checksums")
    c.add_argument("dir", help="dataset directory or URI")
    c.set_defaults(func=_check)
