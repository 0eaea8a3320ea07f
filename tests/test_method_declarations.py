"""Every method declares itself in its own file (``METHOD_INFO``, read without torch).

The README's method table, the classes and the CLI agree with the declarations,
and a method from outside the package, one file (tests/example_method.py) named
in ``$GRACEFUL_RAY_METHOD_MODULES``, is listed by ``train --help``, searched by
``tune``'s default space and trained by ``train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from graceful_ray import raycluster
from graceful_ray.cli import main
from graceful_ray.errors import ConfigError
from graceful_ray.methods import METHODS, UpgradeMethod, catalog, load_methods
from graceful_ray.methods.registry import check_declaration, declared_defaults
from graceful_ray.registry import Registry
from graceful_ray.tune import search_space as sp

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "tests.example_method"
NAME = "test-logit-decay"


@pytest.fixture
def builtin_only(monkeypatch):
    monkeypatch.delenv(catalog.MODULES_ENV, raising=False)


@pytest.fixture
def example(monkeypatch):
    """The example method declared through the environment, unregistered afterwards."""
    monkeypatch.setenv(catalog.MODULES_ENV, EXAMPLE)
    yield
    METHODS.pop(NAME, None)
    sys.modules.pop(EXAMPLE, None)


def _readme_rows() -> list[tuple[list[str], list[str]]]:
    """(method names, hyperparameter names) of each row of the README's method table."""
    text = (REPO / "README.md").read_text()
    lines = text[text.index("| method | what it does | hyperparameters |"):].splitlines()
    rows = []
    for line in lines[2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = line.strip().strip("|").split("|")
        assert len(cells) == 3, f"a README method row needs 3 cells: {line}"
        rows.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def test_the_readme_method_table_is_the_declared_methods(builtin_only):
    declared = catalog.declared()
    rows = _readme_rows()
    assert sorted(n for names, _ in rows for n in names) == sorted(declared)
    for names, hparams in rows:
        assert sorted(hparams) == sorted({h for n in names for h in declared[n].hyperparameters}), names


def test_every_declaration_is_its_class(builtin_only):
    load_methods()
    for name, info in catalog.declared().items():
        cls = METHODS[name]
        assert cls.__module__ == info.module
        assert declared_defaults(cls) == info.hyperparameters, name
        assert info.help and "\n" not in info.help
        for pname, text in info.search_ranges().items():  # every range is one Tune can sample
            assert sp.Param.parse(pname, text).name == pname


def test_a_class_that_disagrees_with_its_declaration_is_refused(builtin_only):
    class Heavier(UpgradeMethod):
        name, prefix = "l2", "l2"

        def __init__(self, *, lam: float = 2.0) -> None:
            super().__init__()

        def extra_loss(self, batch):
            return {}

    l2 = catalog.info("l2")
    with pytest.raises(ConfigError, match="is declared by graceful_ray.methods.l2"):
        check_declaration(Heavier, l2)
    with pytest.raises(ConfigError, match="declares hyperparameters"):
        check_declaration(Heavier, dataclasses.replace(l2, module=__name__))


def test_a_declaration_must_be_a_readable_literal():
    with pytest.raises(ConfigError, match="plain literal"):
        catalog.read_declarations("HELP = 'x'\nMETHOD_INFO = {'m': {'help': HELP}}\n", "pkg.m")
    with pytest.raises(ConfigError, match="unknown keys"):
        catalog.read_declarations("METHOD_INFO = {'m': {'help': 'x', 'defaults': {}}}\n", "pkg.m")
    with pytest.raises(ConfigError, match="not among its hyperparameters"):
        catalog.read_declarations("METHOD_INFO = {'m': {'help': 'x', 'space': {'m_lambda': 'uniform:0:1'}}}\n",
                                  "pkg.m")
    assert catalog.read_declarations("X = 1\n", "pkg.m") == []


def test_a_missing_method_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv(catalog.MODULES_ENV, "tests.no_such_method")
    assert main(["train", "--help"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tests.no_such_method" in line and catalog.MODULES_ENV in line


_HELP = """
import json, sys
from graceful_ray.cli import main
try:
    main(["train", "--help"])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in ("torch", "ray", "pandas") if m in sys.modules)}))
"""


def test_an_outside_method_is_listed_by_train_help_without_torch():
    """One file named in the environment; its declaration is read, not imported, so
    ``train --help`` still imports neither torch nor Ray."""
    env = {**os.environ, catalog.MODULES_ENV: EXAMPLE,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-c", _HELP], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    *help_lines, last = done.stdout.strip().splitlines()
    assert json.loads(last) == {"rc": 0, "loaded": []}, done.stderr
    (line,) = [h for h in help_lines if h.strip().startswith(NAME)]
    assert "penalty on the squared logits" in line and "decay_lambda=0.01" in line


def test_an_outside_method_is_in_tunes_default_space(example, tmp_path):
    import argparse

    from graceful_ray.train.config import UpgradeConfig
    from graceful_ray.tune.cli import add_tune_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_tune_arguments(p)
    settings = settings_from_args(p.parse_args(["--data", str(tmp_path / "d"), "--old", "m@v1",
                                                "--storage", str(tmp_path), "--run-name", "r"]))
    space = settings.search_space()
    assert space.methods == ("plain", "fd", "new-error", "elodi", NAME)
    assert space.params["decay_lambda"] == sp.Param("decay_lambda", "loguniform", 1e-4, 1.0)
    sample = {name: param.middle() for name, param in space.params.items()}
    cfg = space.apply(UpgradeConfig(data="/d"), {**sample, "method": NAME})
    assert cfg.method == NAME and cfg.hparams == {"decay_lambda": pytest.approx(0.01)}
    assert set(sp.for_method(NAME).params) == {"decay_lambda"}  # and a search of it alone


def test_an_outside_method_trains(example, ray_session, mnist1d_small, tmp_path):
    """``train --method test-logit-decay`` (Ray Train's local mode: the loop runs in this process)."""
    root = str(tmp_path / "root")
    assert main(["--root", root, "train", "--data", mnist1d_small, "--method", NAME, "--hp", "decay_lambda=0.05",
                 "--model-arg", "channels=4", "--epochs", "1", "--workers", "0", "--name", "decay",
                 "--run-name", "decay"]) == 0
    manifest = Registry(os.path.join(root, "registry")).get("decay@v1")
    assert manifest.method == NAME and manifest.hyperparameters["decay_lambda"] == 0.05
    assert manifest.metrics["loss_decay"] > 0  # the method's own loss term was trained with


def test_the_method_modules_go_to_rays_workers_with_the_job(monkeypatch):
    """Train workers, Tune trials and Serve replicas on a cluster import the same
    method modules as the driver: ``ray.init`` gets them in the job's env_vars,
    beside (never instead of) a runtime_env of the user's or of ``ray job submit``."""
    assert catalog.MODULES_ENV in raycluster.FORWARDED_ENV
    monkeypatch.delenv(raycluster.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv(catalog.MODULES_ENV, raising=False)
    assert raycluster.runtime_env() is None  # nothing to pass
    user = {"working_dir": ".", "env_vars": {"A": "1"}}
    assert raycluster.runtime_env(user) == user

    monkeypatch.setenv(catalog.MODULES_ENV, EXAMPLE)
    assert raycluster.runtime_env() == {"env_vars": {catalog.MODULES_ENV: EXAMPLE}}
    assert raycluster.runtime_env(user) == {"working_dir": ".", "env_vars": {"A": "1", catalog.MODULES_ENV: EXAMPLE}}
    assert user == {"working_dir": ".", "env_vars": {"A": "1"}}  # the caller's dict is not modified
    assert raycluster.runtime_env({"env_vars": {catalog.MODULES_ENV: "mine"}}) == {
        "env_vars": {catalog.MODULES_ENV: "mine"}}  # the user's own value stands
    # a submitted job that sets it already: Ray refuses a driver runtime_env repeating the job's variable
    monkeypatch.setenv(raycluster.JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"env_vars": {catalog.MODULES_ENV: EXAMPLE}, "working_dir": "gcs://x.zip"}}))
    assert raycluster.runtime_env() is None
    monkeypatch.setenv(raycluster.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert raycluster.runtime_env() == {"env_vars": {catalog.MODULES_ENV: EXAMPLE}}


@pytest.mark.parametrize("address", ["ray://head:10001", None])
def test_ensure_ray_passes_the_method_modules_to_ray_init(monkeypatch, address):
    """Joining a cluster (the case that needs it) and starting a local Ray alike."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(raycluster.JOB_CONFIG_ENV, raising=False)
    monkeypatch.delenv(raycluster.AGENT_PORT_ENV, raising=False)
    monkeypatch.setenv(catalog.MODULES_ENV, EXAMPLE)
    assert raycluster.ensure_ray(address) is (address is None)
    (kw,) = calls
    assert kw["runtime_env"] == {"env_vars": {catalog.MODULES_ENV: EXAMPLE}}
    assert kw["address"] == (address or "local")
