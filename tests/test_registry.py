"""The model registry on a local directory and on S3 (moto on loopback)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from dataclasses import dataclass

import pyarrow.fs as pafs
import pytest
import torch

from graceful_ray.cli import main as cli_main
from graceful_ray.errors import (IntegrityError, ModelError, RegistryError, StorageError,
                                 VersionNotFoundError)
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Manifest, Registry, load_model
from graceful_ray.storage import Staged, resolve

SPEC = ModelSpec("mlp", (6,), 3, {"width": 8, "depth": 1, "embedding_dim": 4})
CLASSES = [0, 1, 2]


def tiny(seed: int = 0, spec: ModelSpec = SPEC):
    torch.manual_seed(seed)
    return build_model(spec)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def root(storage_root):
    # a prefix below the bucket / directory, as a real deployment would use
    return f"{storage_root}/registry"


@dataclass
class Hyper:
    lr: float = 0.1
    epochs: int = 3


# ------------------------------------------------------------------ roundtrip
def test_publish_load_roundtrip(root):
    reg = Registry(root)
    model = tiny(1)
    m = reg.publish("toy", model, spec=SPEC, classes=CLASSES, method="bct",
                    hyperparameters=Hyper(), dataset_checksum="abc123",
                    metrics={"acc": torch.tensor(0.75), "nfr": 0.01},
                    extra={"note": "first"}, extra_files={"notes/readme.txt": b"hello"})
    assert (m.ref, m.version, m.embedding_space, m.parent) == ("toy@v1", 1, "toy@v1", None)
    assert m.hyperparameters == {"lr": 0.1, "epochs": 3}
    assert m.metrics == {"acc": 0.75, "nfr": 0.01}
    assert m.embedding_dim == 4 and m.classes == CLASSES and m.format == "network"
    assert set(m.files) == {"model.safetensors", "notes/readme.txt"}

    for ref in ("toy", "toy@latest", "toy@v1", "toy@1"):
        assert Registry(root).get(ref) == m  # a fresh instance reads it from storage

    manifest, state = Registry(root).load_state_dict("toy")
    assert manifest == m and same_weights(state, model.state_dict())
    _, loaded = load_model(root, "toy@v1")
    assert not loaded.training
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), model.eval()(x))
    assert reg.read_file("toy", "notes/readme.txt") == b"hello"
    with pytest.raises(RegistryError, match="no file 'nope'"):
        reg.read_file("toy", "nope")

    # safetensors on disk (8-byte header length, then a JSON header), never a pickle
    raw = resolve(root).join("toy", "v1", "model.safetensors").read_bytes()
    assert raw[8:9] == b"{"
    assert Manifest.from_json(
        resolve(root).join("toy", "v1", "manifest.json").read_bytes()) == m


def test_versions_increment(root):
    reg = Registry(root)
    assert reg.list_models() == [] and reg.versions("toy") == []
    refs = [reg.publish("toy", tiny(i), spec=SPEC, classes=CLASSES).ref for i in range(3)]
    reg.publish("other", tiny(9), spec=SPEC, classes=[5, 7, 9])
    assert refs == ["toy@v1", "toy@v2", "toy@v3"]
    assert [m.version for m in reg.versions("toy")] == [1, 2, 3]
    assert reg.get("toy").version == 3
    assert reg.list_models() == ["other", "toy"]
    assert reg.get("other").classes == [5, 7, 9]
    # each version keeps its own weights
    assert same_weights(reg.load_state_dict("toy@2")[1], tiny(1).state_dict())


def test_aliases_move_and_resolve(root):
    reg = Registry(root)
    for i in range(3):
        reg.publish("toy", tiny(i), spec=SPEC, classes=CLASSES)
    assert reg.aliases("toy") == {}
    assert reg.set_alias("toy", "production", 1).version == 1
    reg.set_alias("toy", "candidate", "latest")
    assert reg.aliases("toy") == {"candidate": 3, "production": 1}
    assert reg.get("toy@production").version == 1

    reg.set_alias("toy", "production", "v2")
    reg.set_alias("toy", "production", "toy@candidate")
    assert Registry(root).get("toy@production").version == 3
    record = reg.alias_record("toy", "production")
    assert record["version"] == 3 and record["previous"] == 2
    assert [h["version"] for h in record["history"]] == [1, 2, 3]
    assert same_weights(reg.load_state_dict("toy@production")[1], tiny(2).state_dict())

    with pytest.raises(VersionNotFoundError, match="v1, v2, v3"):
        reg.set_alias("toy", "production", 7)
    for bad in ("latest", "v2", "3", "bad/alias"):
        with pytest.raises(RegistryError, match="invalid alias"):
            reg.set_alias("toy", bad, 1)
    with pytest.raises(RegistryError, match="its own model"):
        reg.set_alias("toy", "production", "other@v1")

    reg.delete_alias("toy", "candidate")
    assert reg.aliases("toy") == {"production": 3}
    with pytest.raises(VersionNotFoundError, match="no alias 'candidate'"):
        reg.get("toy@candidate")
    with pytest.raises(VersionNotFoundError):
        reg.delete_alias("toy", "candidate")


# ------------------------------------------------------------------ integrity
def test_tampered_truncated_missing_refused(root):
    reg = Registry(root)
    m = reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES,
                    extra_files={"gallery.bin": b"x" * 64})
    weights = resolve(root).join("toy", "v1", "model.safetensors")
    good = weights.read_bytes()

    tampered = bytearray(good)
    tampered[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError) as err:
        Registry(root).load_state_dict("toy")
    msg = str(err.value)
    assert "model.safetensors" in msg and m.files["model.safetensors"] in msg
    assert hashlib.sha256(bytes(tampered)).hexdigest() in msg
    with pytest.raises(IntegrityError):
        load_model(reg, "toy@v1")

    weights.write_bytes(good[: len(good) // 2])  # truncated upload
    with pytest.raises(IntegrityError, match="truncated"):
        reg.load_state_dict("toy@v1")

    weights.write_bytes(good)
    assert same_weights(reg.load_state_dict("toy")[1], tiny().state_dict())

    extra = resolve(root).join("toy", "v1", "gallery.bin")
    extra.write_bytes(b"y" * 64)
    with pytest.raises(IntegrityError, match="gallery.bin"):
        reg.read_file("toy", "gallery.bin")
    extra.delete_file()
    with pytest.raises(IntegrityError, match="missing"):
        reg.read_file("toy", "gallery.bin")
    weights.delete_file()
    with pytest.raises(IntegrityError, match="missing"):
        load_model(reg, "toy")


def test_damaged_manifest_is_a_clear_error(root):
    reg = Registry(root)
    reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES)
    resolve(root).join("toy", "v1", "manifest.json").write_bytes(b'{"name": "toy"')
    with pytest.raises(RegistryError, match="not valid JSON"):
        Registry(root).get("toy")


# ---------------------------------------------------------------- concurrency
def test_concurrent_publishers_threads(root):
    n_threads, each = 4, 2
    refs: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)
    # built up front: torch's global RNG is shared, so seeding inside threads races
    models = {100 * t + i: tiny(100 * t + i) for t in range(n_threads) for i in range(each)}

    def work(t: int) -> None:
        try:
            reg = Registry(root)  # one client per publisher, as separate jobs would have
            barrier.wait()
            for i in range(each):
                m = reg.publish("toy", models[100 * t + i], spec=SPEC, classes=CLASSES,
                                extra={"seed": 100 * t + i})
                refs.append(m.ref)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(refs) == sorted(f"toy@v{i}" for i in range(1, n_threads * each + 1))
    reg = Registry(root)
    seeds = set()
    for m in reg.versions("toy"):
        manifest, state = reg.load_state_dict(m.ref)
        assert same_weights(state, models[manifest.extra["seed"]].state_dict())
        seeds.add(manifest.extra["seed"])
    assert len(seeds) == n_threads * each  # nobody's version was lost or overwritten


def _publish_in_process(root: str, seed: int, count: int, barrier, results) -> None:
    reg = Registry(root)
    models = [tiny(seed + i) for i in range(count)]
    barrier.wait()  # all processes publish at the same moment
    results.put([reg.publish("toy", m, spec=SPEC, classes=CLASSES, extra={"seed": seed + i}).version
                 for i, m in enumerate(models)])


def test_concurrent_publishers_processes(tmp_path):
    root = str(tmp_path / "registry")
    ctx = multiprocessing.get_context("spawn")  # fork after torch/OpenMP use can hang
    n_procs, each = 2, 5
    barrier, results = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_publish_in_process, args=(root, 100 * p, each, barrier, results))
             for p in range(n_procs)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(v for r in got for v in r) == list(range(1, n_procs * each + 1))
    reg = Registry(root)
    for m in reg.versions("toy"):
        assert same_weights(reg.load_state_dict(m.ref)[1], tiny(m.extra["seed"]).state_dict())
    assert not [p for p in (tmp_path / "registry" / "toy").iterdir()
                if p.name.startswith(".staging")]


def test_stale_listing_collides_and_retries(root, monkeypatch):
    """Deterministic race: a publisher whose listing predates another's commit."""
    reg = Registry(root)
    first = reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    stale = Registry(root)
    monkeypatch.setattr(stale, "_scan", lambda name: ([], set()))  # sees no versions
    second = stale.publish("toy", tiny(1), spec=SPEC, classes=CLASSES)
    assert (first.version, second.version) == (1, 2)
    monkeypatch.undo()
    reg = Registry(root)
    assert same_weights(reg.load_state_dict("toy@1")[1], tiny(0).state_dict())
    assert same_weights(reg.load_state_dict("toy@2")[1], tiny(1).state_dict())
    assert reg.get("toy@2").embedding_space == "toy@v2"  # manifest rewritten for the new number


def test_a_version_committed_without_a_claim_is_never_written_over(root, monkeypatch):
    """Registries from before claims (locally: a staging directory renamed to v<N>)
    have versions with a manifest and no ``.claim``: a publisher that claims such a
    number must withdraw and take the next, leaving the version as it was."""
    reg = Registry(root)
    reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    resolve(root).join("toy", "v1", ".claim").delete_file(missing_ok=False)
    monkeypatch.setattr(reg, "_scan", lambda name: ([], set()))  # a listing that predates v1
    second = reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES)
    monkeypatch.undo()
    assert second.version == 2
    fresh = Registry(root)
    assert same_weights(fresh.load_state_dict("toy@1")[1], tiny(0).state_dict())
    assert not resolve(root).join("toy", "v1", ".claim").exists()


def test_staged_files_are_invisible_until_the_pointer_and_removed_if_it_is_taken(storage_root):
    """The one commit primitive, on a local path and on S3: write under a prefix,
    then create the pointer only if absent; the loser's files are gone."""
    root = resolve(storage_root)
    pointer = root.join("commits", "1.json")
    with Staged(root.join("a")) as first:
        first.write("data/x.bin", b"first")
        assert not pointer.exists()  # nothing points at it yet
        assert first.commit(pointer, b"a")
    with Staged(root.join("b")) as second:
        second.write("data/x.bin", b"second")
        assert not second.commit(pointer, b"b")
    assert pointer.read_bytes() == b"a" and root.join("a", "data", "x.bin").read_bytes() == b"first"
    assert not root.join("b", "data", "x.bin").exists()
    with pytest.raises(RuntimeError):
        with Staged(root.join("c")) as third:
            third.write("y.bin", b"third")
            raise RuntimeError("killed before the commit")
    assert not root.join("c", "y.bin").exists()


def test_create_exclusive_is_honoured(storage_root):
    """The object-store claim rests on If-None-Match: check the server honours it."""
    loc = resolve(storage_root).join("x", ".claim")
    assert loc.create_exclusive(b"first") is True
    assert loc.create_exclusive(b"second") is False
    assert loc.read_bytes() == b"first"


# ---------------------------------------------------------------------- crash
class Crash(RuntimeError):
    pass


def _crash_on_manifest(monkeypatch):
    def boom(self):
        raise Crash("killed while publishing")
    monkeypatch.setattr(Manifest, "to_json", boom)


def test_crash_mid_publish_leaves_nothing_visible(root, monkeypatch):
    reg = Registry(root)
    reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    with monkeypatch.context() as mp:
        _crash_on_manifest(mp)  # weights are already written when this fires
        with pytest.raises(Crash):
            reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES)
    fresh = Registry(root)
    assert [m.version for m in fresh.versions("toy")] == [1]
    assert fresh.get("toy@latest").version == 1
    m = fresh.publish("toy", tiny(2), spec=SPEC, classes=CLASSES)
    assert same_weights(fresh.load_state_dict(m.ref)[1], tiny(2).state_dict())
    # the failed attempt cleaned up after itself
    files = resolve(root).fs.get_file_info(
        pafs.FileSelector(resolve(root).join("toy").path, recursive=True))
    names = {f.path.rsplit("/", 1)[-1] for f in files if f.type.name == "File"}
    assert names <= {"model.safetensors", "manifest.json", ".claim"}
    assert not any(".staging" in f.path for f in files)


def test_hard_crash_debris_is_invisible_and_skipped(root, monkeypatch):
    """A publisher killed outright cannot clean up: its leftovers must stay invisible."""
    reg = Registry(root)
    reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    with monkeypatch.context() as mp:
        _crash_on_manifest(mp)
        mp.setattr(Staged, "discard", lambda self: None)  # killed: nothing is cleaned up
        with pytest.raises(Crash):
            reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES)

    toy = resolve(root).join("toy")
    debris = [i for i in toy.list() if i.base_name not in ("v1", "aliases")]
    assert debris, "the simulated crash should have left a claimed directory"
    leftovers = toy.fs.get_file_info(
        pafs.FileSelector(debris[0].path, recursive=True))
    assert any(i.path.endswith("model.safetensors") for i in leftovers)

    fresh = Registry(root)
    assert [m.version for m in fresh.versions("toy")] == [1]
    with pytest.raises(VersionNotFoundError):
        fresh.get("toy@v2")
    m = fresh.publish("toy", tiny(2), spec=SPEC, classes=CLASSES)
    assert m.version == 3  # the crashed publisher's claimed number is skipped
    assert [v.version for v in fresh.versions("toy")] == [1, m.version]
    assert same_weights(fresh.load_state_dict("toy")[1], tiny(2).state_dict())


def test_uncommitted_version_dir_is_ignored(root):
    """A ``v<N>`` holding files but no manifest (claimed, or damaged) is not a version."""
    vdir = resolve(root).join("toy", "v1")
    vdir.join("model.safetensors").write_bytes(b"partial")
    vdir.join(".claim").write_bytes(b"{}")
    reg = Registry(root)
    assert reg.list_models() == [] and reg.versions("toy") == []
    with pytest.raises(VersionNotFoundError, match="no model 'toy'"):
        reg.get("toy")
    assert reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES).version == 2


# ------------------------------------------------------------ lineage / space
def test_lineage_and_embedding_space(root):
    reg = Registry(root)
    v1 = reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    reg.set_alias("toy", "production", 1)
    v2 = reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES, method="bct",
                     parent="toy@production", compatible_with_parent=True)
    v3 = reg.publish("toy", tiny(2), spec=SPEC, classes=CLASSES, parent="toy@2")
    edge_spec = ModelSpec("mlp", (6,), 3, {"width": 4, "depth": 1, "embedding_dim": 4})
    edge = reg.publish("edge", tiny(3, edge_spec), spec=edge_spec, classes=CLASSES,
                       parent="toy@v2", compatible_with_parent=True)

    assert v2.parent == "toy@v1" and v2.embedding_space == v1.embedding_space == "toy@v1"
    assert v3.parent == "toy@v2" and v3.embedding_space == "toy@v3"
    assert edge.embedding_space == "toy@v1"
    assert reg.same_space("toy@1", "toy@2") and reg.same_space("edge", "toy@v1")
    assert not reg.same_space("toy@3", "toy@2")
    assert [m.ref for m in reg.lineage("toy@v3")] == ["toy@v3", "toy@v2", "toy@v1"]
    assert [m.ref for m in reg.lineage("edge")] == ["edge@v1", "toy@v2", "toy@v1"]

    with pytest.raises(RegistryError, match="needs a parent"):
        reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES, compatible_with_parent=True)
    wide = ModelSpec("mlp", (6,), 3, {"width": 8, "depth": 1, "embedding_dim": 5})
    with pytest.raises(RegistryError, match="embedding dim 5 vs 4"):
        reg.publish("toy", tiny(0, wide), spec=wide, classes=CLASSES, parent="toy@1",
                    compatible_with_parent=True)
    with pytest.raises(VersionNotFoundError):
        reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES, parent="toy@v9")


# ---------------------------------------------------------------- bad inputs
def test_bad_refs_are_helpful(tmp_path):
    reg = Registry(str(tmp_path))
    reg.publish("toy", tiny(), spec=SPEC, classes=CLASSES)
    reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES)
    reg.set_alias("toy", "production", 1)
    cases = {
        "nope": "models there: ['toy']",
        "nope@v1": "no model 'nope'",
        "toy@v9": "v1, v2; aliases: production -> v1",
        "toy@9": "no version v9",
        "toy@staging": "no alias 'staging'",
        "toy@": "nothing after '@'",
        "bad name": "invalid model reference",
        "../etc@v1": "invalid model reference",
        "toy@a/b": "after '@'",
    }
    for ref, text in cases.items():
        with pytest.raises(VersionNotFoundError) as err:
            reg.get(ref)
        assert text in str(err.value), (ref, str(err.value))
        assert isinstance(err.value, LookupError)
    assert Registry(str(tmp_path / "empty")).list_models() == []


def test_publish_validation(tmp_path):
    reg = Registry(str(tmp_path))
    model = tiny()
    with pytest.raises(RegistryError, match="invalid model name"):
        reg.publish("../evil", model, spec=SPEC, classes=CLASSES)
    with pytest.raises(RegistryError, match="one global class id per head output"):
        reg.publish("toy", model, spec=SPEC, classes=[0, 1])
    with pytest.raises(RegistryError, match="unique"):
        reg.publish("toy", model, spec=SPEC, classes=[0, 1, 1])
    other = ModelSpec("mlp", (6,), 3, {"width": 16, "depth": 1, "embedding_dim": 4})
    with pytest.raises(ModelError, match="shape mismatch"):
        reg.publish("toy", model, spec=other, classes=CLASSES)
    with pytest.raises(ModelError, match="missing"):
        sd = model.state_dict()
        sd.pop("head.bias")
        reg.publish("toy", sd, spec=SPEC, classes=CLASSES)
    for bad in ("manifest.json", ".claim", "model.safetensors", "../x", "/abs", "a/.hidden"):
        with pytest.raises(RegistryError, match="not allowed"):
            reg.publish("toy", model, spec=SPEC, classes=CLASSES, extra_files={bad: b"x"})
    with pytest.raises(RegistryError, match="not a tensor"):
        reg.publish("toy", {**model.state_dict(), "step": 3}, spec=SPEC, classes=CLASSES)
    with pytest.raises(RegistryError, match="JSON-serialisable"):
        reg.publish("toy", model, spec=SPEC, classes=CLASSES, metrics={"f": object()})
    with pytest.raises(RegistryError, match="format"):
        reg.publish("toy", model, spec=SPEC, classes=CLASSES, format="onnx")
    assert reg.list_models() == []  # nothing was written by any failed attempt
    assert not (tmp_path / "toy").exists()


def test_shared_and_noncontiguous_tensors(tmp_path):
    reg = Registry(str(tmp_path))
    base = torch.arange(12.0).reshape(3, 4)
    state = {"w": base, "w_tied": base, "w_t": base.t(), "row": base[1], "step": torch.tensor(7)}
    m = reg.publish("lin", state, spec=SPEC, classes=CLASSES, format="linearized")
    _, loaded = reg.load_state_dict(m.ref)
    assert same_weights(loaded, {k: v.contiguous() for k, v in state.items()})
    with pytest.raises(RegistryError, match="linearized"):
        load_model(reg, "lin")
    # tied weights inside a real network
    model = tiny()
    sd = model.state_dict()
    sd["backbone.3.weight"] = sd["backbone.3.weight"].t().contiguous().t()  # non-contiguous
    reg.publish("toy", sd, spec=SPEC, classes=CLASSES)
    assert same_weights(reg.load_state_dict("toy")[1], model.state_dict())


def test_manifest_validation():
    good = Manifest(name="toy", version=2, architecture=SPEC.to_dict(), embedding_dim=4,
                    classes=CLASSES, method="plain", hyperparameters={"lr": 0.1},
                    dataset_checksum=None, metrics={}, parent="toy@v1", embedding_space="toy@v1",
                    files={"model.safetensors": "0" * 64})
    assert Manifest.from_json(good.to_json()) == good
    assert good.spec == SPEC and good.ref == "toy@v2"
    d = json.loads(good.to_json())
    bad_cases = {
        "version": (0, "version"),
        "classes": ([0, 1, "x"], "classes"),
        "parent": ("toy-v1", "parent"),
        "files": ({"model.safetensors": "nothex"}, "sha256"),
        "format": ("onnx", "format"),
        "created_at": ("yesterday", "created_at"),
        "architecture": ({"factory": "mlp"}, "architecture"),
        "schema": (99, "newer"),
    }
    for key, (value, text) in bad_cases.items():
        with pytest.raises(RegistryError, match=text):
            Manifest.from_json(json.dumps({**d, key: value}))
    with pytest.raises(RegistryError, match="missing field"):
        Manifest.from_json(json.dumps({k: v for k, v in d.items() if k != "embedding_space"}))
    with pytest.raises(RegistryError, match="not valid JSON"):
        Manifest.from_json("{")
    with pytest.raises(RegistryError, match="JSON object"):
        Manifest.from_json("[]")


# ------------------------------------------------------------------------ CLI
def test_cli_list_show_alias(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "registry")  # $GRACEFUL_RAY_ROOT/registry, as train and tune use
    reg = Registry(root)
    reg.publish("toy", tiny(0), spec=SPEC, classes=CLASSES)
    reg.publish("toy", tiny(1), spec=SPEC, classes=CLASSES, method="bct")

    assert cli_main(["registry", "list", "--registry", root]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "v1, v2" in out

    monkeypatch.setenv("GRACEFUL_RAY_ROOT", str(tmp_path))  # default root from the environment
    assert cli_main(["registry", "show", "toy@v2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["method"] == "bct"

    assert cli_main(["registry", "alias", "toy", "production", "1"]) == 0
    assert "toy@production -> v1 (new alias)" in capsys.readouterr().out
    assert cli_main(["registry", "alias", "toy", "production", "latest", "--registry", root]) == 0
    assert "-> v2 (was v1)" in capsys.readouterr().out
    assert Registry(root).get("toy@production").version == 2

    assert cli_main(["registry", "show", "toy@v7"]) == 2
    assert "no version v7" in capsys.readouterr().err


def test_cli_on_s3(s3_root, capsys):
    root = f"{s3_root}/reg"
    Registry(root).publish("toy", tiny(), spec=SPEC, classes=CLASSES)
    assert cli_main(["registry", "alias", "toy", "production", "v1", "--registry", root]) == 0
    assert cli_main(["registry", "list", "--registry", root]) == 0
    assert "production->v1" in capsys.readouterr().out


def test_unreachable_root_is_a_storage_error():
    with pytest.raises(StorageError):
        Registry("")


def test_publish_leaves_the_callers_rng_alone(tmp_path):
    model = tiny()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Registry(str(tmp_path)).publish("toy", model, spec=SPEC, classes=CLASSES)
    assert torch.equal(torch.rand(3), expected)
