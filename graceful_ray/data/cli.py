"""`graceful-ray data ...`: make a built-in dataset, import your own, check one."""

from __future__ import annotations

import argparse
import time

from graceful_ray.data.builtin import make_digits, make_mnist1d
from graceful_ray.data.contract import DatasetInfo, SCENARIOS
from graceful_ray.data.read import validate_dataset
from graceful_ray.errors import ConfigError

# Lazy imports: the importer (pandas, about 1 s) loads only for `data import`, so the other commands
# answer at once.


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
    info = validate_dataset(args.dir)
    print(f"OK: every split follows the data contract and matches its checksums\n"
          f"{_summary(info, args.dir)}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names like a,b,c, not {text!r}")
    return names


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `data import` and `jobs/import_data.py`."""
    from graceful_ray.data.sources import FORMATS

    p.add_argument("source", metavar="SOURCE",
                   help="a Parquet, CSV or JSON Lines file or directory (split sub-directories "
                        "train/, val/, test/ allowed), an image folder ROOT/[split/]class/*.png|jpg, "
                        "or a .npz with x and y; local, s3:// or gs://")
    p.add_argument("--out", required=True, help="dataset directory or s3:// / gs:// URI")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="source format (default: from the file suffix or the directory's files)")
    p.add_argument("--name", default=None, help="dataset name (default: the --out directory's name)")
    g = p.add_argument_group("columns")
    g.add_argument("--label-col", default="label", help="label column: integer class indices or "
                   "class names (kept in dataset.json in sorted order unless --classes)")
    g.add_argument("--id-col", default=None, help="unique id column (default: 'id' if present, "
                   "else ids 0..N-1 from the row order of the source)")
    g.add_argument("--features-col", default=None,
                   help="one column holding a list of numbers per row (default: 'features')")
    g.add_argument("--feature-cols", type=_names, default=None, metavar="A,B,C",
                   help="scalar feature columns, in this order")
    g.add_argument("--feature-prefix", default=None, metavar="PREFIX",
                   help="every column starting with PREFIX is a feature (f_0, f_1, ... in number order)")
    g.add_argument("--image-col", default=None,
                   help="column of PNG/JPEG bytes, or of image paths relative to the source")
    g.add_argument("--classes", type=_names, default=None, metavar="A,B,C",
                   help="the classes in order (string labels), or the names of class indices "
                        "0, 1, ... (integer labels); a label not listed is an error")
    s = p.add_argument_group("splits")
    s.add_argument("--split-col", default=None,
                   help="column naming each row's split (train, val, test, ...)")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train carved out as val when the source has no val split")
    s.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of train carved out as test when the source has no test split")
    s.add_argument("--seed", type=int, default=0, help="seed of the stratified splits")
    o = s.add_mutually_exclusive_group()
    o.add_argument("--old-fraction", type=float, default=None,
                   help="v1 trained on this share of train (stratified): written as old_train")
    o.add_argument("--old-classes", type=_names, default=None, metavar="A,B",
                   help="v1 knew only these classes: old_train is their training rows")
    o.add_argument("--old-ids", default=None, metavar="FILE",
                   help="v1 trained on the rows with these ids (one per line)")
    p.add_argument("--batch-rows", type=int, default=65_536,
                   help="rows read at a time (memory stays bounded by a batch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def import_options(args: argparse.Namespace):
    from graceful_ray.data.importer import ImportOptions

    return ImportOptions(
        format=args.format, label_col=args.label_col, id_col=args.id_col,
        features_col=args.features_col, feature_cols=args.feature_cols,
        feature_prefix=args.feature_prefix, image_col=args.image_col, classes=args.classes,
        split_col=args.split_col, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, old_fraction=args.old_fraction,
        old_classes=args.old_classes, old_ids=args.old_ids, name=args.name,
        overwrite=args.overwrite, batch_rows=args.batch_rows)


def _import(args: argparse.Namespace) -> int:
    from graceful_ray.data.importer import import_source

    t0 = time.perf_counter()
    info = import_source(args.source, args.out, import_options(args))
    print(_summary(info, args.out))
    names = ", ".join(info.class_names[:10]) + (", ..." if info.num_classes > 10 else "")
    print(f"  classes: {names}")
    if "old_train" not in info.splits:
        print("  no old_train: v1's training rows are unknown (train --old still works; "
              "its outputs are computed on train)")
    print(f"  imported in {time.perf_counter() - t0:.1f}s")
    return 0


def add_parser(subparsers) -> None:
    """Register ``data make``, ``data import`` and ``data check``."""
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

    i = sub.add_parser("import", help="import your own data (Parquet, CSV, JSON Lines, images, .npz)",
                       description="Turn your own files into a graceful-ray dataset: map the columns, "
                                   "take or make the splits, check every row, write Parquet.")
    add_import_arguments(i)
    i.set_defaults(func=_import)

    c = sub.add_parser("check", help="validate a dataset and verify its checksums")
    c.add_argument("dir", help="dataset directory or URI")
    c.set_defaults(func=_check)
