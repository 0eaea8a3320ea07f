"""Every command checks its arguments before Ray starts: bad methods, hyperparameters,
datasets, splits, model arguments and old-model references give one line and exit 2.

``ensure_ray`` is replaced by one that fails the test, so a check that happens only
after Ray is up (where it used to: 10-12 s in) shows up as a failure here.
"""

from __future__ import annotations

import pytest

import graceful_ray.raycluster
from graceful_ray.cli import main
from graceful_ray.data import make_mnist1d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "ds"
    make_mnist1d(out, samples=300, seed=0)
    return str(out)


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    def ensure_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started before the arguments were checked")

    monkeypatch.setattr(graceful_ray.raycluster, "ensure_ray", ensure_ray)
    return str(tmp_path / "root")


TRAIN_CASES = [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--data", "MISSING"], "dataset.json is missing"),
    (["--hp", "fd_lambda=1"], "unknown hyperparameter"),
    (["--method", "fd", "--hp", "fd_nope=1", "--old", "m@v1"], "unknown hyperparameter"),
    (["--old", "digits@v9"], "digits"),
    (["--method", "bct"], "needs an old model"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--model-arg", "nope=3"], "does not accept arguments"),
    (["--val-split", "nosuch"], "no split 'nosuch'"),
]


@pytest.mark.parametrize("extra,message", TRAIN_CASES)
def test_train_refuses_bad_arguments_before_ray(dataset, no_ray, tmp_path, capsys, extra, message):
    args = ["--root", no_ray, "train", "--data", dataset, *extra]
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("extra,message", [
    (["--method", "bogus", "--old", "m@v1"], "unknown method 'bogus'"),
    (["--old", "digits@v9"], "digits"),
    (["--old", "m@v1", "--data", "MISSING"], "dataset.json is missing"),
])
def test_tune_refuses_bad_arguments_before_ray(dataset, no_ray, tmp_path, capsys, extra, message):
    args = ["--root", no_ray, "tune", "--data", dataset, "--flip-budget", "0.02", *extra]
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


class _Reached(Exception):
    pass


def test_train_calls_whatever_ensure_ray_is_now(dataset, tmp_path, monkeypatch):
    """The commands look ``ensure_ray`` up when they call it. When they bound it at
    import, the stand-in above (patched while `train` was first imported) stayed
    theirs for the session, and every later test that trained through the CLI
    failed with its message."""
    main(["--root", str(tmp_path / "r0"), "train", "--data", dataset, "--method", "bogus"])
    real = graceful_ray.raycluster.ensure_ray  # the command module is imported by now

    def reached(*_args, **_kwargs):
        raise _Reached

    monkeypatch.setattr(graceful_ray.raycluster, "ensure_ray", reached)
    with pytest.raises(_Reached):
        main(["--root", str(tmp_path / "root"), "train", "--data", dataset])
    monkeypatch.undo()
    assert graceful_ray.raycluster.ensure_ray is real


def test_the_torch_free_method_names_are_the_registry_s(monkeypatch):
    """The CLI checks names against the methods' declarations (read without torch):
    every declared method registers a class, and every registered one is declared."""
    from graceful_ray.methods import METHODS, catalog, load_methods

    monkeypatch.delenv(catalog.MODULES_ENV, raising=False)
    load_methods()
    assert sorted(catalog.names()) == sorted(METHODS)


_VALIDATE_ONLY = """
import json, sys
from graceful_ray.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "loaded": sorted(m for m in ("torch", "ray", "pandas") if m in sys.modules)}))
"""


@pytest.mark.parametrize("extra, message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--method", "fd+bogus", "--data", "MISSING"], "unknown method 'bogus'"),
    (["--data", "MISSING"], "dataset.json is missing"),
])
def test_refusing_train_arguments_imports_neither_torch_nor_ray(dataset, tmp_path, extra, message):
    """The CLI answers a bad method or a missing dataset at once: it imports only the
    command's module and checks names and the dataset before torch and Ray (each takes
    seconds to import; `train --method bogus` took 10-12 s, then 6 s)."""
    _refused_without_torch_or_ray(["train", "--data", dataset, "--root", str(tmp_path / "root"), *extra],
                                  tmp_path, message)


@pytest.mark.parametrize("extra, message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--method", "fd+bogus", "--data", "MISSING"], "unknown method 'bogus'"),
    (["--methods", "fd,bogus"], "unknown method 'bogus'"),
    (["--data", "MISSING"], "dataset.json is missing"),
    (["--val-split", "nosuch"], "no split 'nosuch'"),
])
def test_refusing_tune_arguments_imports_neither_torch_nor_ray(dataset, tmp_path, extra, message):
    """`tune` as `train`: its method names, dataset and splits are checked before the
    search space and model factory import torch (`tune --method bogus` took 2.8 s)."""
    _refused_without_torch_or_ray(["tune", "--data", dataset, "--old", "m@v1", "--flip-budget", "0.02",
                                   "--root", str(tmp_path / "root"), *extra], tmp_path, message)


def _refused_without_torch_or_ray(args: list[str], tmp_path, message: str) -> None:
    """``graceful-ray ARGS`` in a fresh interpreter: exit 2, one error line naming
    ``message``, and neither torch, Ray nor pandas imported."""
    import json
    import os
    import subprocess
    import sys

    args = [str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _VALIDATE_ONLY, *args], capture_output=True, text=True,
                          timeout=120, env=env)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"rc": 2, "loaded": []}, (out, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("graceful-ray: error: ") and message in line
