"""`graceful-ray evaluate` (pair report and generations matrix), the shared
`--root`, and the jobs/evaluate.py entrypoint. No Ray: models are published
straight to the registry (seeded random weights: the numbers need not be good,
only the ones the library computes)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from graceful_ray.cli import main
from graceful_ray.data import load_split
from graceful_ray.evaluate import predict
from graceful_ray.metrics import compatibility_matrix, flip_report
from graceful_ray.models import ModelSpec, build_model
from graceful_ray.registry import Registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_root_env(monkeypatch):
    """`--root` sets $GRACEFUL_RAY_ROOT for the process; undo it after each test."""
    monkeypatch.setenv("GRACEFUL_RAY_ROOT", os.environ.get("GRACEFUL_RAY_ROOT", str(REPO / ".graceful-ray")))


@pytest.fixture(scope="module")
def published(mnist1d_small, tmp_path_factory):
    """``ROOT/registry`` with m@v1 -> m@v2 -> m@v3 (one space) and a model of another embedding dim."""
    root = tmp_path_factory.mktemp("eval-root")
    reg = Registry(str(root / "registry"))
    spec = ModelSpec("cnn1d", (1, 40), 10, {"channels": 8})
    parent = None
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        m = reg.publish("m", build_model(spec), spec=spec, classes=range(10), parent=parent,
                        method="plain" if parent is None else "bct", compatible_with_parent=parent is not None)
        parent = m.ref
    wide = ModelSpec("cnn1d", (1, 40), 10, {"channels": 8, "embedding_dim": 16})
    torch.manual_seed(3)
    reg.publish("wide", build_model(wide), spec=wide, classes=range(10))
    return {"root": str(root), "data": mnist1d_small}


def test_generations_matrix_is_the_librarys(published, capsys):
    root, data = published["root"], published["data"]
    assert main(["--root", root, "evaluate", "--data", data, "--generations", "m@v1", "m@v2", "m@v3",
                 "--run-name", "gen"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((Path(root) / "reports" / "gen" / "generations.json").read_text())

    x, y, _ = load_split(data, "test")
    embs = [predict(os.path.join(root, "registry"), f"m@v{i}", x).embeddings for i in (1, 2, 3)]
    for metric in ("top1", "map"):
        expected = compatibility_matrix(embs, y, metric=metric, full=True)
        np.testing.assert_allclose(np.array(saved[metric]["matrix"], dtype=float), expected.matrix, rtol=1e-6)
        assert saved[metric]["ac"] == pytest.approx(expected.ac)
        assert saved[metric]["am"] == pytest.approx(expected.am)
        assert f"{metric}: AC = {expected.ac:.3f}, AM = {expected.am:.4f}" in out
    # each printed row is the query model's row of the matrix
    row_v3 = next(line for line in out.splitlines() if line.startswith("m@v3"))
    assert [float(v) for v in row_v3.split()[1:]] == pytest.approx(
        np.round(compatibility_matrix(embs, y, metric="top1", full=True).matrix[2], 4), abs=1e-4)
    assert saved["spaces"] == {"m@v1": "m@v1", "m@v2": "m@v1", "m@v3": "m@v1"}


def test_pair_report_goes_under_the_shared_root(published, capsys):
    root, data = published["root"], published["data"]
    assert main(["--root", root, "evaluate", "--data", data, "--old", "m@v1", "--new", "m@v2",
                 "--run-name", "v2-report"]) == 0
    out = capsys.readouterr().out
    report = json.loads((Path(root) / "reports" / "v2-report" / "report.json").read_text())
    x, y, _ = load_split(data, "test")
    reg = os.path.join(root, "registry")
    expected = flip_report(y, predict(reg, "m@v1", x).pred, predict(reg, "m@v2", x).pred).to_dict()
    assert report["flips"]["metrics"]["nfr"]["count"] == expected["metrics"]["nfr"]["count"]
    assert "m@v2 against m@v1 on test" in out and (Path(root) / "reports" / "v2-report" / "flips.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--generations", "m@v1"], "at least two models"),
    (["--generations", "m@v1", "wide@v1"], "share an embedding dimension"),
    (["--old", "m@v1"], "needs --old and --new"),
    (["--old", "m@v1", "--new", "m@v2", "--generations", "m@v1", "m@v2"], "not both"),
])
def test_bad_evaluate_arguments_say_what_is_wrong(published, capsys, argv, message):
    assert main(["--root", published["root"], "evaluate", "--data", published["data"], *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evaluate_job_takes_the_shared_root(published, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    root = published["root"]
    assert job.main(["--data", published["data"], "--generations", "m@v1", "m@v2",
                     "--root", root, "--run-name", "job-gen"]) == 0
    assert (Path(root) / "reports" / "job-gen" / "generations.json").exists()
    with pytest.raises(SystemExit):  # the job's own parser refuses unknown options before running
        job.main(["--data", published["data"], "--bogus"])
    capsys.readouterr()


def test_root_after_the_sub_command_and_for_the_serve_defaults(published, tmp_path, monkeypatch, capsys):
    import argparse

    from graceful_ray.cli import add_root_argument, apply_root
    from graceful_ray.serve.cli import add_serve_arguments, config_from_args

    root = published["root"]
    assert main(["evaluate", "--data", published["data"], "--generations", "m@v1", "m@v2", "--root", root,
                 "--run-name", "after"]) == 0
    assert (Path(root) / "reports" / "after" / "generations.json").exists()
    assert main(["registry", "list", "--root", root]) == 0
    assert "m" in capsys.readouterr().out

    # jobs/deploy_shadow.py: --root puts the registry and the comparison log under it
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    add_root_argument(parser)
    args = parser.parse_args(["--old", "m@v1", "--new", "m@v2", "--root", str(tmp_path)])
    apply_root(args.shared_root)
    config = config_from_args(args)
    assert config.registry == str(tmp_path / "registry")
    assert config.storage.startswith(str(tmp_path / "shadow"))
