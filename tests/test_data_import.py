"""`graceful-ray data import`: a team's own files become a dataset the rest accepts."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graceful_ray.cli import main
from graceful_ray.data import (
    ImportOptions, import_source, layout, read_info, read_split, to_numpy, validate_dataset,
)
from graceful_ray.data.images import encode_png
from graceful_ray.errors import ConfigError, DatasetError
from graceful_ray.storage import resolve

CLASSES = 20


# -- sources the way a team has them -----------------------------------------
def _write_csv(path, n=600, features=12, seed=0, label=lambda i: f"cat{i % CLASSES:02d}",
               edit=None):
    """A 20-class product table: sku, category, f_0..f_11 (what issue 13 tried)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = i % CLASSES
        x = np.round(rng.standard_normal(features) + 0.5 * c, 4)
        rows.append([f"s{i:05d}", label(i), *map(str, x)])
    if edit:
        edit(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "category", *[f"f_{j}" for j in range(features)]])
        w.writerows(rows)
    return str(path)


def _list_table(n=200, length=6, seed=0, **cols):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, length)).astype(np.float32)
    base = {"id": pa.array(np.arange(1000, 1000 + n, dtype=np.int64)),
            "label": pa.array((np.arange(n) % 4).astype(np.int64)),
            "features": pa.array(list(x), pa.list_(pa.float32()))}
    base.update(cols)
    return pa.table(base)


def _png(value, size=6, rgb=False):
    shape = (size, size, 3) if rgb else (size, size)
    return encode_png(np.full(shape, value, dtype=np.uint8))


def _image_folder(root, splits=("train", "val", "test"), per_class=4, classes=("cat", "dog")):
    for s in splits:
        for ci, c in enumerate(classes):
            d = os.path.join(root, s, c) if s else os.path.join(root, c)
            os.makedirs(d, exist_ok=True)
            for k in range(per_class):
                with open(os.path.join(d, f"{k:03d}.png"), "wb") as f:
                    f.write(_png(40 * ci + k))
    return str(root)


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- what gets written ---------------------------------------------------------
def test_csv_with_string_labels_imports_and_passes_data_check(tmp_path, capsys):
    src = _write_csv(tmp_path / "products.csv")
    out = str(tmp_path / "ds")
    rc, stdout, err = _cli(capsys, "data", "import", src, "--out", out, "--label-col", "category",
                           "--id-col", "sku", "--feature-prefix", "f_", "--old-fraction", "0.5")
    assert rc == 0, err
    info = read_info(out)
    assert info.class_names == [f"cat{c:02d}" for c in range(CLASSES)]  # sorted, stable
    assert info.feature_shape == (12,) and info.id_type == "string"
    assert set(info.splits) == {"train", "val", "test", "old_train"}
    assert info.splits["old_train"].subset_of == "train"
    assert info.scenario == {"kind": "data_growth", "old_fraction": 0.5, "old_split": "old_train"}
    # Stratified: 30 rows per class give each class 6 test, 3 val, 21 train, ~10-11 old rows.
    for split, want in (("test", 6), ("val", 3), ("train", 21)):
        y = read_split(out, split).column("label").to_numpy()
        assert np.bincount(y, minlength=CLASSES).tolist() == [want] * CLASSES, split
    old = read_split(out, "old_train").column("label").to_numpy()
    assert set(np.bincount(old, minlength=CLASSES).tolist()) <= {10, 11}
    # Rows keep their values and their label; ids are the skus.
    table = read_split(out, "train")
    ids, X, y = to_numpy(table, info)
    with open(src) as f:
        source = {r["sku"]: r for r in csv.DictReader(f)}
    r = source[str(ids[0])]
    assert info.class_names[y[0]] == r["category"]
    np.testing.assert_allclose(X[0], [float(r[f"f_{j}"]) for j in range(12)], rtol=1e-6)
    rc, stdout, err = _cli(capsys, "data", "check", out)
    assert rc == 0 and stdout.startswith("OK"), err


def test_same_options_same_checksum_and_the_seed_changes_the_splits(tmp_path):
    src = _write_csv(tmp_path / "t.csv", n=200)
    opts = ImportOptions(label_col="category", id_col="sku", feature_prefix="f_")
    a = import_source(src, str(tmp_path / "a"), opts)
    b = import_source(src, str(tmp_path / "b"), opts)
    c = import_source(src, str(tmp_path / "c"), opts, seed=1)
    assert a.checksum == b.checksum
    assert a.checksum != c.checksum


def test_small_batches_and_many_files_write_the_same_rows(tmp_path):
    """Streaming (batches of 7 rows, files of 50) changes how, not what, is written."""
    src = _write_csv(tmp_path / "t.csv", n=300)
    opts = ImportOptions(label_col="category", id_col="sku", feature_prefix="f_", old_fraction=0.3)
    big = import_source(src, str(tmp_path / "big"), opts)
    small = import_source(src, str(tmp_path / "small"), opts, batch_rows=7, rows_per_file=50)
    assert len(small.splits["train"].files) == -(-small.splits["train"].rows // 50) > 1
    for split in big.splits:
        assert read_split(str(tmp_path / "big"), split).equals(read_split(str(tmp_path / "small"), split))
    validate_dataset(str(tmp_path / "small"))


def test_parquet_list_column_int_labels_split_column_and_class_names(tmp_path):
    t = _list_table(n=200).append_column(
        "part", pa.array(["train"] * 140 + ["validation"] * 30 + ["test"] * 30))
    pq.write_table(t, tmp_path / "data.parquet")
    info = import_source(str(tmp_path / "data.parquet"), str(tmp_path / "ds"),
                         split_col="part", classes=("red", "green", "blue", "grey"))
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 140, "val": 30, "test": 30}
    assert info.class_names == ["red", "green", "blue", "grey"]
    assert info.scenario == {"kind": "none"} and "old_train" not in info.splits
    assert read_split(str(tmp_path / "ds"), "val").column("id").to_pylist() == list(range(1140, 1170))
    validate_dataset(str(tmp_path / "ds"))


def test_split_directories_and_a_missing_val_carved_from_train(tmp_path):
    for split, n, seed in (("train", 160, 0), ("test", 40, 1)):
        os.makedirs(tmp_path / "src" / split)
        t = _list_table(n=n, seed=seed).drop_columns(["id"])
        pq.write_table(t, tmp_path / "src" / split / "part-0.parquet")
    info = import_source(str(tmp_path / "src"), str(tmp_path / "ds"), val_fraction=0.25)
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 120, "val": 40, "test": 40}
    assert info.extra["splits_from"].startswith("source directories")
    # No id column: ids are the row numbers over the source's files in path order
    # (test/ sorts before train/).
    ids = np.sort(np.concatenate([read_split(str(tmp_path / "ds"), s).column("id").to_numpy()
                                  for s in info.splits]))
    assert ids.tolist() == list(range(200))
    assert np.sort(read_split(str(tmp_path / "ds"), "test").column("id").to_numpy()).tolist() == \
        list(range(40))


def test_jsonl_with_a_list_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"uid": i * 3, "y": ["a", "b", "c"][i % 3],
                                "emb": [i * 0.5, 1.0, -1.0]}) + "\n")
    info = import_source(str(path), str(tmp_path / "ds"), label_col="y", id_col="uid",
                         features_col="emb", old_classes=("a", "b"))
    assert info.class_names == ["a", "b", "c"] and info.feature_shape == (3,)
    assert info.scenario["kind"] == "class_incremental" and info.scenario["old_classes"] == [0, 1]
    old = read_split(str(tmp_path / "ds"), "old_train")
    assert set(old.column("label").to_pylist()) == {0, 1}
    validate_dataset(str(tmp_path / "ds"))


def test_npz_with_x_and_y_keeps_the_feature_shape(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 4, 4)).astype(np.float32)
    y = np.arange(100) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    info = import_source(str(tmp_path / "d.npz"), str(tmp_path / "ds"))
    assert info.feature_shape == (1, 4, 4) and info.num_classes == 5
    ids, X, Y = to_numpy(read_split(str(tmp_path / "ds"), "test"), info)
    np.testing.assert_array_equal(X, x[ids])
    np.testing.assert_array_equal(Y, y[ids])
    # Keras-style x_train/y_train/x_test/y_test: splits from the keys, val carved from train.
    np.savez(tmp_path / "k.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    info = import_source(str(tmp_path / "k.npz"), str(tmp_path / "k"))
    assert {k: v.rows for k, v in info.splits.items()} == {"train": 72, "test": 20, "val": 8}


@pytest.mark.parametrize("layout", ["split", "flat"])
def test_image_folder(tmp_path, layout):
    root = _image_folder(tmp_path / "imgs", splits=("train", "val", "test") if layout == "split"
                         else ("",), per_class=10)
    info = import_source(root, str(tmp_path / "ds"))
    assert info.kind == "image" and info.feature_shape == (1, 6, 6)
    assert info.class_names == ["cat", "dog"]
    want = {"train": 20, "val": 20, "test": 20} if layout == "split" else \
        {"train": 14, "val": 2, "test": 4}
    assert {k: v.rows for k, v in info.splits.items()} == want
    ids, X, y = to_numpy(read_split(str(tmp_path / "ds"), "train"), info)
    assert X.shape[1:] == (1, 6, 6) and set(y.tolist()) == {0, 1}
    validate_dataset(str(tmp_path / "ds"))


def test_image_column_of_relative_paths_and_of_bytes(tmp_path):
    _image_folder(tmp_path / "src" / "pics", splits=("",), per_class=10)
    paths = sorted(f"pics/{c}/{k:03d}.png" for c in ("cat", "dog") for k in range(10))
    labels = [p.split("/")[1] for p in paths]
    pq.write_table(pa.table({"path": paths, "animal": labels}), tmp_path / "src" / "index.parquet")
    a = import_source(str(tmp_path / "src" / "index.parquet"), str(tmp_path / "a"),
                      image_col="path", label_col="animal")
    data = [open(tmp_path / "src" / p, "rb").read() for p in paths]
    pq.write_table(pa.table({"img": pa.array(data, pa.binary()), "animal": labels}),
                   tmp_path / "bytes.parquet")
    b = import_source(str(tmp_path / "bytes.parquet"), str(tmp_path / "b"), image_col="img",
                      label_col="animal")
    assert a.kind == b.kind == "image"
    for split in a.splits:
        assert read_split(str(tmp_path / "a"), split).equals(read_split(str(tmp_path / "b"), split))


def test_imported_images_are_written_in_bounded_row_groups(tmp_path):
    """However the source is batched, no row group or file is larger than the bounds."""
    n = 6000
    png = encode_png(np.full((32, 32, 3), 9, np.uint8))  # decodes to 12 KiB a row
    pq.write_table(pa.table({"img": pa.array([png] * n, pa.binary()),
                             "animal": [("cat", "dog")[i % 2] for i in range(n)]}),
                   tmp_path / "src.parquet")
    info = import_source(str(tmp_path / "src.parquet"), str(tmp_path / "ds"), image_col="img",
                         label_col="animal", batch_rows=999, rows_per_file=3000)
    per_row = 4 * int(np.prod(info.feature_shape))
    for split, si in info.splits.items():
        groups = []
        for rel in si.files:
            md = pq.read_metadata(tmp_path / "ds" / rel)
            assert md.num_rows <= 3000
            groups += [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert sum(groups) == si.rows
        assert all(rows * per_row <= layout.ROW_GROUP_BYTES for rows in groups), (split, groups)
    train = info.splits["train"]
    assert train.rows * per_row > 2 * layout.ROW_GROUP_BYTES and len(train.files) >= 2
    validate_dataset(str(tmp_path / "ds"))


def test_old_ids_file(tmp_path):
    src = _write_csv(tmp_path / "t.csv", n=200)
    probe = import_source(src, str(tmp_path / "probe"), label_col="category", id_col="sku",
                          feature_prefix="f_")
    train_ids = read_split(str(tmp_path / "probe"), "train").column("id").to_pylist()
    (tmp_path / "v1_ids.txt").write_text("\n".join(train_ids[:50]) + "\n")
    info = import_source(src, str(tmp_path / "ds"), label_col="category", id_col="sku",
                         feature_prefix="f_", old_ids=str(tmp_path / "v1_ids.txt"))
    assert sorted(read_split(str(tmp_path / "ds"), "old_train").column("id").to_pylist()) == \
        sorted(train_ids[:50])
    assert info.scenario["old_fraction"] == pytest.approx(50 / probe.splits["train"].rows)
    test_id = read_split(str(tmp_path / "probe"), "test").column("id")[0].as_py()
    (tmp_path / "bad_ids.txt").write_text(f"{train_ids[0]}\n{test_id}\n")
    with pytest.raises(DatasetError, match="is in split 'test'"):
        import_source(src, str(tmp_path / "bad"), label_col="category", id_col="sku",
                      feature_prefix="f_", old_ids=str(tmp_path / "bad_ids.txt"))
    (tmp_path / "unknown.txt").write_text("s00001\nnope\n")
    with pytest.raises(DatasetError, match=r"'nope' \(line 2\) is not in the source"):
        import_source(src, str(tmp_path / "bad"), label_col="category", id_col="sku",
                      feature_prefix="f_", old_ids=str(tmp_path / "unknown.txt"))


def test_s3_source_and_target(tmp_path, s3_root):
    src = _write_csv(tmp_path / "t.csv", n=200)
    resolve(f"{s3_root}/raw/t.csv").write_bytes(open(src, "rb").read())
    out = f"{s3_root}/data/products"
    info = import_source(f"{s3_root}/raw/t.csv", out, label_col="category", id_col="sku",
                         feature_prefix="f_", old_fraction=0.5)
    assert validate_dataset(out).checksum == info.checksum
    local = import_source(src, str(tmp_path / "local"), label_col="category", id_col="sku",
                          feature_prefix="f_", old_fraction=0.5)
    assert local.checksum == info.checksum  # same bytes wherever they live
    # A bad S3 import writes nothing: the rows are checked before the first PUT.
    bad = _write_csv(tmp_path / "bad.csv", n=200, edit=lambda rows: rows[150].__setitem__(4, "x"))
    resolve(f"{s3_root}/raw/bad.csv").write_bytes(open(bad, "rb").read())
    with pytest.raises(DatasetError, match="row 150"):
        import_source(f"{s3_root}/raw/bad.csv", f"{s3_root}/data/bad", label_col="category",
                      id_col="sku", feature_prefix="f_")
    assert not resolve(f"{s3_root}/data/bad").exists()


# -- bad input: one line naming file, row and column; nothing written ------------
def _bad_csv(edit):
    return lambda tmp: (_write_csv(tmp / "bad.csv", n=200, edit=edit),
                        ["--label-col", "category", "--id-col", "sku", "--feature-prefix", "f_"])


def _bad_parquet(table, *flags):
    def make(tmp):
        pq.write_table(table, tmp / "bad.parquet")
        return str(tmp / "bad.parquet"), list(flags)
    return make


def _bad_images(tmp):
    root = _image_folder(tmp / "imgs", splits=("",), per_class=10)
    with open(os.path.join(root, "dog", "003.png"), "wb") as f:
        f.write(_png(1)[:40])  # truncated
    return root, []


def _missing_image_path(tmp):
    _image_folder(tmp / "pics", splits=("",), per_class=10)
    paths = [f"pics/cat/{k:03d}.png" for k in range(10)] + ["pics/cat/gone.png"]
    pq.write_table(pa.table({"path": paths, "label": [0] * 5 + [1] * 6}), tmp / "bad.parquet")
    return str(tmp / "bad.parquet"), ["--image-col", "path"]


_ragged = _list_table(n=50)
_ragged = _ragged.set_column(2, "features", pa.array(
    [[0.0] * 6] * 17 + [[0.0] * 5] + [[0.0] * 6] * 32, pa.list_(pa.float32())))

BAD = {
    # name: (make source, what the one line must say)
    "missing feature": (_bad_csv(lambda r: r[42].__setitem__(5, "")),
                        ["missing feature value", "bad.csv", "column f_3", "row 42"]),
    "non-numeric feature": (_bad_csv(lambda r: r[7].__setitem__(13, "n/a")),
                            ["non-numeric feature value 'n/a'", "column f_11", "row 7"]),
    "non-finite feature": (_bad_csv(lambda r: r[9].__setitem__(2, "inf")),
                           ["non-finite", "column f_0", "row 9"]),
    "ragged features": (_bad_parquet(_ragged), ["ragged features", "bad.parquet",
                                                "column features", "row 17"]),
    "missing label": (_bad_csv(lambda r: r[99].__setitem__(1, "")),
                      ["missing label", "column category", "row 99"]),
    "label not among --classes": (
        _bad_csv(lambda r: r[3].__setitem__(1, "mystery")),
        ["label 'mystery' is not among --classes", "column category", "row 3"]),
    "duplicate id": (_bad_csv(lambda r: r[120].__setitem__(0, "s00011")),
                     ["duplicate id 's00011'", "row 11 has it too", "column sku", "row 120"]),
    "corrupt image": (_bad_images, ["unreadable or corrupt image", "imgs", "column image",
                                    "row 13"]),
    "unreadable image path": (_missing_image_path, ["unreadable image 'pics/cat/gone.png'",
                                                    "column path", "row 10"]),
    "empty split": (_bad_parquet(_list_table(n=8), "--val-fraction", "0.05"),
                    ["split 'val' would be empty", "bad.parquet"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_file_row_column_and_writes_nothing(tmp_path, capsys, case):
    make, expected = BAD[case]
    src, flags = make(tmp_path)
    if case == "label not among --classes":
        flags += ["--classes", ",".join(f"cat{c:02d}" for c in range(CLASSES))]
    out = tmp_path / "out" / "ds"
    rc, stdout, err = _cli(capsys, "data", "import", src, "--out", str(out), *flags)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graceful-ray: error:"), err
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_a_failed_import_leaves_an_existing_dataset_as_it_was(tmp_path):
    good = _write_csv(tmp_path / "good.csv", n=200)
    out = str(tmp_path / "ds")
    opts = dict(label_col="category", id_col="sku", feature_prefix="f_")
    before = import_source(good, out, **opts)
    with pytest.raises(DatasetError, match="already holds"):
        import_source(good, out, **opts)
    # The bad row is the last one: the streaming pass has written the rest by then.
    bad = _write_csv(tmp_path / "bad.csv", n=200, edit=lambda r: r[199].__setitem__(4, "oops"))
    with pytest.raises(DatasetError, match="row 199"):
        import_source(bad, out, overwrite=True, **opts)
    assert validate_dataset(out).checksum == before.checksum
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "ds", "good.csv"]  # no staging left


@pytest.mark.parametrize("kwargs, match", [
    (dict(feature_prefix="f_", features_col="x"), "give one input"),
    (dict(old_fraction=0.5, old_classes=("a",)), "once"),
    (dict(val_fraction=0.5, test_fraction=0.5), "at least 10%"),
    (dict(format="xlsx"), "unknown format"),
    (dict(classes=("a", "a")), "twice"),
])
def test_bad_options(tmp_path, kwargs, match):
    src = _write_csv(tmp_path / "t.csv", n=40)
    with pytest.raises(ConfigError, match=match):
        import_source(src, str(tmp_path / "ds"), label_col="category", **kwargs)


def test_missing_columns_are_named(tmp_path):
    src = _write_csv(tmp_path / "t.csv", n=40)
    with pytest.raises(DatasetError, match=r"missing column 'label'.*column label"):
        import_source(src, str(tmp_path / "ds"), feature_prefix="f_")
    with pytest.raises(DatasetError, match="CSV has no list type"):
        import_source(src, str(tmp_path / "ds"), label_col="category", features_col="sku")
    with pytest.raises(DatasetError, match="no input column"):
        import_source(src, str(tmp_path / "ds"), label_col="category")


def test_job_script_takes_the_cli_options(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "import_data", os.path.join(os.path.dirname(__file__), "..", "jobs", "import_data.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    src = _write_csv(tmp_path / "t.csv", n=100)
    assert job.main([src, "--out", str(tmp_path / "ds"), "--label-col", "category",
                     "--feature-prefix", "f_"]) == 0
    assert read_info(str(tmp_path / "ds")).num_classes == CLASSES


# -- the rest of graceful-ray accepts it -------------------------------------------
def test_train_v1_and_v2_on_an_imported_csv_without_old_train(tmp_path, capsys, ray_session):
    """An imported v1's training rows are unknown (no old_train): v1 trains on train and
    v2's old-output cache is computed on train and val all the same."""
    src = _write_csv(tmp_path / "products.csv", n=400)
    data, root = str(tmp_path / "ds"), str(tmp_path / "root")
    rc, _, err = _cli(capsys, "data", "import", src, "--out", data, "--label-col", "category",
                      "--id-col", "sku", "--feature-prefix", "f_")
    assert rc == 0, err
    assert "old_train" not in read_info(data).splits
    common = ["--root", root, "train", "--data", data, "--model", "mlp", "--epochs", "1",
              "--workers", "0", "--batch-size", "64", "--name", "products"]
    rc, out, err = _cli(capsys, *common, "--run-name", "v1", "--alias", "production")
    assert rc == 0, err
    assert "published products@v1" in out
    rc, out, err = _cli(capsys, *common, "--run-name", "v2", "--old", "products@production",
                        "--method", "fd")
    assert rc == 0, err
    assert "published products@v2" in out and "NFR" in out
    caches = os.listdir(os.path.join(data, "cache", "old-outputs"))
    assert len(caches) == 1
    assert sorted(os.listdir(os.path.join(data, "cache", "old-outputs", caches[0]))) == ["train", "val"]


def _readme_commands(prefix: str) -> list[list[str]]:
    import shlex

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("**Import your own data.**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in section.strip().splitlines()
            if line.startswith(f"graceful-ray {prefix}")]


def test_readme_import_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """The README's commands, exactly, on files laid out the way they assume."""
    monkeypatch.chdir(tmp_path)
    _write_csv(tmp_path / "products.csv", n=400)
    _image_folder(tmp_path / "photos", per_class=5, classes=("bird", "cat", "dog"))
    commands = _readme_commands("data")
    assert [c[:2] for c in commands] == [["data", "import"], ["data", "import"], ["data", "check"]]
    for argv in commands:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 0, (argv, err)
    products = read_info("data/products")
    assert products.num_classes == CLASSES and "old_train" in products.splits
    photos = read_info("data/photos")
    assert photos.class_names == ["bird", "cat", "dog"]
    assert photos.scenario["old_classes"] == [1, 2]
    old = read_split("data/photos", "old_train").column("label").to_pylist()
    assert set(old) == {1, 2}
