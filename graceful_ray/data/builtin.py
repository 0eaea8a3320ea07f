"""Built-in datasets, generated locally and deterministically (no downloads).

- MNIST-1D (Greydanus 2020): 1-D signals of length 40 drawn from 10 digit
  templates, any size, through the ``mnist1d`` package's ``make_dataset``
  (never ``get_dataset``, which downloads or caches a pickle).
- scikit-learn's digits: 1797 8x8 images, shipped inside scikit-learn, as
  features (64,) or PNG images (1, 8, 8).

Both write ``train``, ``val``, ``test`` and ``old_train``, the rows the old
model (v1) trains on, chosen by the upgrade scenario:

- ``data_growth``: v2 gets more data; ``old_train`` is a seeded
  ``old_fraction`` subset of ``train``;
- ``class_incremental``: v2 learns new classes; ``old_train`` is the ``train``
  rows whose label is in ``old_classes`` (default: the first half);
- ``none``: ``old_train`` equals ``train``.

Same arguments, same bytes, same checksum.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from graceful_ray.data.contract import SCENARIOS, DatasetInfo, features_type
from graceful_ray.data.images import encode_png
from graceful_ray.data.read import PathLike
from graceful_ray.data.write import check_target, write_dataset

BUILTIN_SPLITS = ("train", "val", "test", "old_train")
from graceful_ray.errors import ConfigError

# Lazy imports: mnist1d and scikit-learn (seconds each) load only for the dataset being made.

log = logging.getLogger(__name__)

MNIST1D_CLASSES = 10
MNIST1D_LENGTH = 40


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for n, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < v < 1:
            raise ConfigError(f"{n} must be in (0, 1), not {v}")
    if val_fraction + test_fraction >= 0.9:
        raise ConfigError("val_fraction + test_fraction must leave at least 10% for training")


def scenario_dict(scenario: str, num_classes: int, old_fraction: float,
                  old_classes: Sequence[int] | None) -> dict[str, Any]:
    """The scenario as recorded in ``dataset.json``."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}: use one of {list(SCENARIOS)}")
    if scenario == "data_growth":
        if not 0 < old_fraction <= 1:
            raise ConfigError(f"old_fraction must be in (0, 1], not {old_fraction}")
        return {"kind": scenario, "old_fraction": float(old_fraction), "old_split": "old_train"}
    if scenario == "class_incremental":
        classes = (list(range(num_classes // 2)) if old_classes is None
                   else sorted({int(c) for c in old_classes}))
        if not classes or any(c < 0 or c >= num_classes for c in classes):
            raise ConfigError(f"old_classes must be a non-empty subset of 0..{num_classes - 1}, "
                              f"not {old_classes!r}")
        return {"kind": scenario, "old_classes": classes, "old_split": "old_train"}
    return {"kind": "none", "old_split": "old_train"}


def split_indices(labels: np.ndarray, *, seed: int, scenario: dict[str, Any],
                  val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Seeded row indices per split (each sorted, so files follow id order)."""
    n = len(labels)
    rng = np.random.default_rng([int(seed), 20240501])
    perm = rng.permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    out = {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
           "train": np.sort(perm[n_test + n_val:])}
    train = out["train"]
    kind = scenario["kind"]
    if kind == "data_growth":
        k = max(1, int(round(len(train) * scenario["old_fraction"])))
        out["old_train"] = np.sort(rng.choice(train, size=k, replace=False))
    elif kind == "class_incremental":
        out["old_train"] = train[np.isin(labels[train], scenario["old_classes"])]
    else:
        out["old_train"] = train.copy()
    for name, idx in out.items():
        if len(idx) == 0:
            raise ConfigError(f"split {name!r} would be empty: use more samples or larger "
                              f"fractions")
    return out


def _features_tables(X: np.ndarray, y: np.ndarray,
                     splits: dict[str, np.ndarray]) -> dict[str, pa.Table]:
    X = np.ascontiguousarray(X, dtype=np.float32)
    length = int(np.prod(X.shape[1:]))
    out = {}
    for name, idx in splits.items():
        flat = pa.array(X[idx].reshape(-1), type=pa.float32())
        out[name] = pa.table({
            "id": pa.array(idx.astype(np.int64)),
            "label": pa.array(y[idx].astype(np.int64)),
            "features": pa.FixedSizeListArray.from_arrays(flat, type=features_type(length)),
        })
    return out


def generate_mnist1d(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D signals (N, 40) float32 and labels (N,) int64, generated locally.

    ``make_dataset`` seeds numpy's global RNG; the caller's RNG state is
    restored afterwards so generating a dataset never perturbs other code.
    N is ``samples`` rounded down to a multiple of 10 (equal classes).
    """
    import mnist1d.data as m1d

    if samples < MNIST1D_CLASSES:
        raise ConfigError(f"samples must be at least {MNIST1D_CLASSES}, not {samples}")
    args = m1d.get_dataset_args()
    args.num_samples = int(samples)
    args.seed = int(seed)
    args.train_split = 1.0  # we split ourselves
    np_state, py_state = np.random.get_state(), random.getstate()
    t0 = time.perf_counter()
    try:
        d = m1d.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    log.info("generated MNIST-1D: %d samples in %.1fs", len(d["y"]), time.perf_counter() - t0)
    return np.asarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64)


def make_mnist1d(out: PathLike, *, samples: int = 10_000, seed: int = 0,
                 scenario: str = "data_growth", old_fraction: float = 0.3,
                 old_classes: Sequence[int] | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, overwrite: bool = False,
                 name: str = "mnist1d") -> DatasetInfo:
    """Generate MNIST-1D (features of length 40, 10 classes) and write it to ``out``.

    Generation is single-threaded Python (about 4.5 s per 10k samples on one
    core), so 100k samples take under a minute.
    """
    _check_fractions(val_fraction, test_fraction)
    scen = scenario_dict(scenario, MNIST1D_CLASSES, old_fraction, old_classes)
    check_target(out, BUILTIN_SPLITS, overwrite)  # fail before the slow generation
    X, y = generate_mnist1d(samples, seed)
    splits = split_indices(y, seed=seed, scenario=scen, val_fraction=val_fraction,
                           test_fraction=test_fraction)
    return write_dataset(
        out, _features_tables(X, y, splits), name=name, num_classes=MNIST1D_CLASSES,
        class_names=[str(i) for i in range(MNIST1D_CLASSES)], feature_shape=(MNIST1D_LENGTH,),
        scenario=scen, seed=seed, overwrite=overwrite,
        extra={"source": "mnist1d", "samples": int(len(y)),
               "val_fraction": val_fraction, "test_fraction": test_fraction})


def make_digits(out: PathLike, *, seed: int = 0, scenario: str = "data_growth",
                old_fraction: float = 0.3, old_classes: Sequence[int] | None = None,
                val_fraction: float = 0.1, test_fraction: float = 0.2,
                as_images: bool = False, overwrite: bool = False,
                name: str = "digits") -> DatasetInfo:
    """scikit-learn's 8x8 digits (1797 rows, 10 classes), shipped with sklearn.

    Features are the pixels scaled to [0, 1], shape (64,); with ``as_images``
    each row is an 8x8 grayscale PNG, shape (1, 8, 8), decoding to the same
    values up to 8-bit rounding.
    """
    from sklearn.datasets import load_digits

    _check_fractions(val_fraction, test_fraction)
    digits = load_digits()
    X = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    k = int(y.max()) + 1
    scen = scenario_dict(scenario, k, old_fraction, old_classes)
    splits = split_indices(y, seed=seed, scenario=scen, val_fraction=val_fraction,
                           test_fraction=test_fraction)
    if as_images:
        pixels = np.clip(np.rint(X * 255.0), 0, 255).astype(np.uint8).reshape(-1, 8, 8)
        tables = {
            s: pa.table({"id": pa.array(idx.astype(np.int64)),
                         "label": pa.array(y[idx]),
                         "image": pa.array([encode_png(pixels[i]) for i in idx],
                                           type=pa.binary())})
            for s, idx in splits.items()
        }
        shape: tuple[int, ...] = (1, 8, 8)
    else:
        tables = _features_tables(X, y, splits)
        shape = (64,)
    return write_dataset(
        out, tables, name=name, num_classes=k, class_names=[str(i) for i in range(k)],
        feature_shape=shape, scenario=scen, seed=seed, overwrite=overwrite,
        extra={"source": "sklearn.datasets.load_digits", "as_images": bool(as_images),
               "val_fraction": val_fraction, "test_fraction": test_fraction})
