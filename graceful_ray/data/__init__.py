"""Parquet datasets: the data contract, validation, reading, writing, importing, built-in datasets.

See :mod:`graceful_ray.data.contract` for what a dataset is.
"""

import importlib

from graceful_ray.data.contract import (
    DATASET_JSON, KINDS, SCENARIOS, DatasetInfo, Expectations, SplitInfo, dataset_checksum,
    features_type,
)
from graceful_ray.data.images import decode_image, decode_images, encode_png
from graceful_ray.data.read import (
    batch_to_numpy, dataset_exists, load_split, ray_dataset, read_file, read_info, read_split, split_paths,
    to_numpy, validate_dataset, verify_split,
)
from graceful_ray.data.tensors import fixed_size_list, inputs_from_arrow
from graceful_ray.data.validate import validate_table
from graceful_ray.data.write import conform, import_dataset, write_dataset

# Imported on first use: the importer brings pandas (about 1 s), and reading a
# dataset's dataset.json, which every command's argument checks do, needs neither.
_LAZY = {"make_digits": "graceful_ray.data.builtin", "make_mnist1d": "graceful_ray.data.builtin",
         "ImportOptions": "graceful_ray.data.importer", "import_source": "graceful_ray.data.importer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DATASET_JSON", "KINDS", "SCENARIOS", "DatasetInfo", "Expectations", "SplitInfo",
    "batch_to_numpy", "conform", "dataset_checksum", "dataset_exists", "decode_image", "decode_images",
    "encode_png", "features_type", "fixed_size_list", "ImportOptions", "import_dataset", "import_source",
    "inputs_from_arrow", "load_split", "make_digits", "make_mnist1d", "ray_dataset", "read_file", "read_info", "read_split", "split_paths", "to_numpy",
    "validate_dataset", "validate_table", "verify_split", "write_dataset",
]
