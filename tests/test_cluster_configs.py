"""The cluster configs are valid: launcher YAML and KubeRay manifests carry the
fields their tools require, use current Ray images, and point at code that exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_IMAGE = re.compile(r"^rayproject/ray:2\.(\d+)\.\d+-py3\d+-(gpu|cpu|cu\d+)$")


def _images(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("image", "head_image") and isinstance(v, str):
                yield v
            else:
                yield from _images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _images(v)


def _check_images(doc):
    images = list(_images(doc))
    assert images, "no container image"
    for image in images:
        assert "ray-ml" not in image, f"{image}: the ray-ml images are deprecated"
        m = RAY_IMAGE.match(image)
        assert m, f"{image} is not a current rayproject/ray image"
        assert int(m.group(1)) >= 51, f"{image}: Ray Train V2 needs Ray >= 2.51"


@pytest.mark.parametrize("name,provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_cluster_launcher_yaml(name, provider):
    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker",
                "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert key in cfg, f"{name} misses {key}"
    assert cfg["provider"]["type"] == provider
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("GPU" in str(t["node_config"]) or "g5" in str(t["node_config"]) or "guestAccelerators" in t["node_config"]
               for t in cfg["available_node_types"].values())
    assert any("graceful-ray" in c for c in cfg["setup_commands"]), "the package is never installed"
    _check_images(cfg)


def _pod_spec_ok(template):
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)


def _cluster_spec_ok(spec):
    assert "rayStartParams" in spec["headGroupSpec"]
    _pod_spec_ok(spec["headGroupSpec"]["template"])
    for group in spec.get("workerGroupSpecs", []):
        assert group["groupName"] and "rayStartParams" in group
        _pod_spec_ok(group["template"])


def _entrypoint_script_exists(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    script = ROOT / argv[1]
    assert script.is_file(), f"entrypoint {argv[1]} does not exist"
    return argv


def test_kuberay_raycluster():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _cluster_spec_ok(doc["spec"])
    _check_images(doc)


def test_runtime_env_installs_the_package_for_jobs_on_a_stock_image():
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and any(p.startswith("graceful-ray") for p in env["pip"])
    # the RayCluster (stock images) tells job submitters to bring it
    assert "--runtime-env cluster/runtime_env.yaml" in (ROOT / "cluster/kuberay/raycluster.yaml").read_text()


def test_kuberay_rayjob_runs_the_training_job():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayjob-train.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = _entrypoint_script_exists(doc["spec"]["entrypoint"])
    assert argv[1] == "jobs/train_upgrade.py"
    # the job's arguments parse with the job's own parser
    from graceful_ray.train.cli import add_train_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    parser.add_argument("--alias")
    args = parser.parse_args(argv[2:])
    assert args.gpu and args.workers >= 1 and args.run_name
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["pip"]
    _cluster_spec_ok(doc["spec"]["rayClusterSpec"])
    _check_images(doc)


def test_kuberay_rayservice_serves_the_shadow_app():
    doc = yaml.safe_load((ROOT / "cluster/kuberay/rayservice-shadow.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
    assert app["args"]["baseline"] and app["args"]["candidate"]
    assert "admin_token" not in app["args"], "the admin token must come from a secret"
    _cluster_spec_ok(doc["spec"]["rayClusterConfig"])
    _check_images(doc)


def test_a_local_ray_takes_the_dashboard_agent_port_from_the_environment(monkeypatch):
    """$RAY_DASHBOARD_AGENT_PORT (the variable cluster/local.sh reads) moves the agent
    of every local Ray the CLI starts off Ray's fixed 52365."""
    from ray._private.parameter import RayParams

    from graceful_ray import raycluster
    from graceful_ray.errors import ConfigError

    monkeypatch.delenv(raycluster.AGENT_PORT_ENV, raising=False)
    assert raycluster.agent_port() is None
    monkeypatch.setenv(raycluster.AGENT_PORT_ENV, "52999")
    assert raycluster.agent_port() == 52999
    with raycluster._dashboard_agent_port(raycluster.agent_port()):
        assert RayParams().dashboard_agent_listen_port == 52999  # what ray.init builds
    assert RayParams().dashboard_agent_listen_port == 52365  # restored after the start
    monkeypatch.setenv(raycluster.AGENT_PORT_ENV, "port")
    with pytest.raises(ConfigError, match="RAY_DASHBOARD_AGENT_PORT"):
        raycluster.agent_port()
