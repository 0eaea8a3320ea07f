"""The cluster configs are valid: launcher YAML, the image's Dockerfile, runtime
envs and KubeRay manifests carry the fields their tools require, agree on one
Ray, use the graceful-ray image, and point at code that exists.

The KubeRay manifests are validated against KubeRay's own CRD schemas
(``tests/data/kuberay/``, vendored at the version the manifests target), read
the way the API server reads them; the Serve configs against Ray's
``ServeDeploySchema``; runtime envs with Ray's ``RuntimeEnv``; the launcher
YAML with Ray's ``ray-schema.json``. Nothing here needs a cluster or a docker
daemon: what those would do beyond this is not checked (see README, "On
Kubernetes").
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.kube_schema import (CRD_FILES, KUBERAY_VERSION, KubeValidator, crd, kube_errors,
                               prune_nulls, to_jsonschema, validator)

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
RAY_IMAGE = re.compile(r"^rayproject/ray:2\.(\d+)\.\d+-py3\d+-(gpu|cpu|cu\d+)$")
# The graceful-ray image: <registry>/graceful-ray:<package version>-ray<Ray>-<cpu|gpu>
# (ghcr.io/YOUR-ORG until the README's sed names your registry)
OUR_IMAGE = re.compile(r"^(?P<repo>[^\s:]+/graceful-ray):(?P<version>[^-]+)-ray(?P<ray>[\d.]+)"
                       r"-(?P<variant>cpu|gpu)$")
IMAGE_WORKDIR = "/home/ray/graceful-ray"  # where the Dockerfile puts jobs/


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


PINS = _pins()
RAY_PIN, TORCH_PIN = PINS["ray"], PINS["torch"]
PACKAGE_VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                            re.M).group(1)
TAG = {v: f"{PACKAGE_VERSION}-ray{RAY_PIN}-{v}" for v in ("cpu", "gpu")}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _manifests() -> list[Path]:
    return sorted(p for p in KUBERAY.glob("*.yaml") if _load(p)["kind"] in CRD_FILES)


# ------------------------------------------------------------------ images
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
    """Launcher YAML: current rayproject/ray images at the pinned Ray."""
    images = list(_images(doc))
    assert images, "no container image"
    for image in images:
        assert "ray-ml" not in image, f"{image}: the ray-ml images are deprecated"
        m = RAY_IMAGE.match(image)
        assert m, f"{image} is not a current rayproject/ray image"
        assert int(m.group(1)) >= 51, f"{image}: Ray Train V2 needs Ray >= 2.51"
        assert image.startswith(f"rayproject/ray:{RAY_PIN}-"), f"{image}: not the pinned Ray {RAY_PIN}"


# ---------------------------------------------------- launcher (ray up)
@pytest.mark.parametrize("name,provider", [("aws-gpu.yaml", "aws"), ("gcp-gpu.yaml", "gcp")])
def test_cluster_launcher_yaml(name, provider):
    cfg = _load(ROOT / "cluster" / name)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker",
                "head_start_ray_commands", "worker_start_ray_commands", "head_setup_commands",
                "worker_setup_commands", "file_mounts"):
        assert key in cfg, f"{name} misses {key}"
    assert cfg["provider"]["type"] == provider
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("GPU" in str(t["node_config"]) or "g5" in str(t["node_config"]) or "guestAccelerators" in t["node_config"]
               for t in cfg["available_node_types"].values())
    _check_images(cfg)
    # what `ray up` checks first: Ray's own schema for this file (no unknown keys)
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    broken = {**cfg, "head_setup_comands": cfg["head_setup_commands"]}
    with pytest.raises(jsonschema.ValidationError, match="head_setup_comands"):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cluster_launcher_installs_the_pinned_wheel_and_the_right_torch(name):
    cfg = _load(ROOT / "cluster" / name)
    wheel = f"graceful_ray-{PACKAGE_VERSION}-py3-none-any.whl"
    # the wheel built from the checkout reaches every node
    (remote, local), = cfg["file_mounts"].items()
    assert local == "dist", "file_mounts must copy the dist/ of `pip wheel --no-deps -w dist .`"
    assert not cfg.get("setup_commands"), "node-specific installs only (head CPU, workers CUDA)"
    cuda = re.search(r"-(cu\d+)$", cfg["docker"]["image"]).group(1)
    assert cfg["docker"]["head_image"].endswith("-cpu")
    for key, index in (("head_setup_commands", "cpu"), ("worker_setup_commands", cuda)):
        cmd = " ".join(cfg[key])
        assert "git+" not in cmd and "archive/refs/heads" not in cmd and "@main" not in cmd
        assert f"--index-url https://download.pytorch.org/whl/{index} torch=={TORCH_PIN}" in cmd, \
            f"{key}: torch {TORCH_PIN} must come from the {index} index"
        assert f"{remote}/{wheel}" in cmd, f"{key} does not install {wheel}"
        assert f'"ray[train,serve,tune]=={RAY_PIN}"' in cmd and f"torch=={TORCH_PIN}" in cmd
    if name == "gcp-gpu.yaml":
        assert f"{wheel}[gcs]" in " ".join(cfg["head_setup_commands"]), "gs:// needs the gcs extra"


# ------------------------------------------------------------- runtime envs
RUNTIME_ENVS = {"cluster/runtime_env.yaml": "cpu", "cluster/runtime_env-gpu.yaml": "cu128"}


def _check_runtime_env(env: dict) -> None:
    """Ray's own validation, plus the unknown keys Ray only warns about."""
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"unknown runtime_env field(s) {sorted(unknown)}"
    unknown = set(env.get("config") or {}) - RuntimeEnvConfig.known_fields
    assert not unknown, f"unknown runtime_env config field(s) {sorted(unknown)}"
    RuntimeEnv(**env)


@pytest.mark.parametrize("path,index", RUNTIME_ENVS.items())
def test_runtime_env_is_pinned_and_takes_the_right_torch(path, index):
    env = _load(ROOT / path)
    _check_runtime_env(env)
    assert env["working_dir"] == "."  # jobs/ travels with the job
    pip = env["pip"]
    packages = pip["packages"]
    ours = [p for p in packages if p.replace("_", "-").startswith("graceful-ray")]
    assert ours == [f"graceful-ray=={PACKAGE_VERSION}"] or (
        len(ours) == 1 and ours[0].endswith(f"/graceful_ray-{PACKAGE_VERSION}-py3-none-any.whl")), \
        f"graceful-ray must be pinned to {PACKAGE_VERSION} or its wheel, got {ours}"
    assert not any("github.com" in p or "refs/heads" in p for p in packages), "never a branch"
    assert f"torch=={TORCH_PIN}+{index}" in packages, f"torch must be pinned to its {index} build"
    assert pip["pip_install_options"] == ["--extra-index-url",
                                          f"https://download.pytorch.org/whl/{index}"]
    assert env["config"]["setup_timeout_seconds"] > 600  # Ray's default is too short for torch


def test_runtime_env_check_fails_on_a_broken_field():
    env = _load(ROOT / "cluster/runtime_env.yaml")
    with pytest.raises(ValueError, match="pip_instal_options"):
        _check_runtime_env({**env, "pip": {**{k: v for k, v in env["pip"].items()
                                              if k != "pip_install_options"},
                                           "pip_instal_options": ["-q"]}})
    with pytest.raises(AssertionError, match="setup_timeout_second"):
        _check_runtime_env({**env, "config": {"setup_timeout_second": 1800}})
    with pytest.raises(TypeError):
        _check_runtime_env({**env, "pip": {**env["pip"], "pip_check": "no"}})


def test_runtime_env_is_what_the_docs_submit_with():
    # the RayCluster (graceful-ray image) needs none; the docs say when to use it
    readme = (ROOT / "README.md").read_text()
    assert "--runtime-env cluster/runtime_env.yaml" in readme
    assert "--runtime-env cluster/runtime_env-gpu.yaml" in readme


# ---------------------------------------------------------------- Dockerfile
DOCKERFILE = ROOT / "cluster" / "docker" / "Dockerfile"


def _dockerfile(path: Path = DOCKERFILE):
    import dockerfile  # the dev extra: buildkit's own parser, no daemon needed

    return dockerfile.parse_file(str(path))


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
                  text)


def _stages(variant: str, path: Path = DOCKERFILE):
    """The build stages as Docker would run them for ``--build-arg VARIANT=variant``:
    ``{stage: {"from": image, "env": {...}, "commands": [...]}}`` with args expanded."""
    global_args: dict[str, str] = {}
    stages: dict[str, dict] = {}
    current = None
    for cmd in _dockerfile(path):
        if cmd.cmd == "ARG" and current is None:
            name, _, default = cmd.value[0].partition("=")
            global_args[name] = default
            continue
        if cmd.cmd == "FROM":
            env = {**global_args, "VARIANT": variant}
            image = _expand(cmd.value[0], env)
            name = cmd.value[2] if len(cmd.value) == 3 and cmd.value[1].upper() == "AS" else image
            parent = stages.get(image)
            current = {"from": parent["from"] if parent else image,
                       "env": dict(parent["env"]) if parent else {},
                       "args": env, "commands": []}
            stages[name] = current
            continue
        if cmd.cmd == "ARG":
            arg = cmd.value[0].partition("=")[0]
            current["env"][arg] = current["args"][arg]
        elif cmd.cmd == "ENV":
            current["env"][cmd.value[0]] = _expand(cmd.value[1], current["env"])
        else:
            current["commands"].append((cmd.cmd, cmd.flags,
                                        [_expand(v, current["env"]) for v in cmd.value]))
    return stages


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last matching .dockerignore pattern wins (``!`` re-includes)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pat = line.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        pats = [pat, pat.replace("**/", "")] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in pats):
            ignored = not negate
    return ignored


def _check_dockerfile(variant: str, path: Path = DOCKERFILE) -> None:
    stages = _stages(variant, path)
    runtime = list(stages.values())[-1]  # the last stage is the image
    base = runtime["from"]
    assert base.startswith(f"rayproject/ray:{RAY_PIN}-py311-"), \
        f"{variant} image on {base}, not the pinned Ray {RAY_PIN}"
    assert RAY_IMAGE.match(base)
    suffix = base.rsplit("-", 1)[1]
    index = runtime["env"]["GRACEFUL_RAY_TORCH_INDEX"]
    if variant == "cpu":
        assert suffix == "cpu" and index == "https://download.pytorch.org/whl/cpu"
    else:
        assert re.fullmatch(r"cu\d+", suffix), f"GPU image on {base}"
        assert index == f"https://download.pytorch.org/whl/{suffix}", "torch's CUDA must be the image's"
    runs = [" ".join(v) for c, _, v in runtime["commands"] if c == "RUN"]
    torch_at = next((i for i, r in enumerate(runs) if "--index-url" in r), None)
    assert torch_at is not None, "torch must come from the variant's index (--index-url)"
    assert f'--index-url "{index}" "torch=={TORCH_PIN}"' in runs[torch_at]
    # the wheel: built from the checkout in its own stage, installed in the image
    wheel_stage = next(s for s in stages.values() if any(
        c == "RUN" and "pip wheel --no-deps" in " ".join(v) for c, _, v in s["commands"]))
    assert wheel_stage["from"] == base
    wheel_dir = re.search(r"--wheel-dir (\S+)", " ".join(
        " ".join(v) for c, _, v in wheel_stage["commands"] if c == "RUN")).group(1)
    copied = [p for c, f, v in wheel_stage["commands"] if c == "COPY" for p in v[:-1]]
    assert {"pyproject.toml", "README.md", "graceful_ray"} <= set(copied)
    install_at, install = next((i, (f, " ".join(v))) for i, (c, f, v) in enumerate(
        cmd for cmd in runtime["commands"] if cmd[0] == "RUN") if "graceful_ray-" in " ".join(v))
    flags, line = install
    assert any("from=wheel" in f and f"source={wheel_dir}," in f for f in flags), \
        "the image must install the wheel stage's wheel"
    assert "pip install" in line and ".whl" in line
    assert f'"ray[train,serve,tune]=={RAY_PIN}"' in line and f'"torch=={TORCH_PIN}"' in line
    assert torch_at < install_at, "torch of the variant first, or the wheel pulls PyPI's torch"
    # the job scripts, where the RayJob's entrypoint names them
    assert ("WORKDIR", (), [IMAGE_WORKDIR]) in runtime["commands"]
    assert ("COPY", ("--chown=ray:users",), ["jobs", "./jobs"]) in runtime["commands"]
    # a build check that the image is what its tag says
    assert any(f"ray.__version__ == '{RAY_PIN}'" in r
               and f"(torch.version.cuda is None) == ('{variant}' == 'cpu')" in r for r in runs)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfile_builds_graceful_ray_on_the_pinned_ray_with_the_right_torch(variant):
    _check_dockerfile(variant)


@pytest.mark.parametrize("variant,old,new,words", [
    ("cpu", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "not the pinned Ray"),
    ("gpu", "whl/${CUDA_TAG}", "whl/cu126", "torch's CUDA must be the image's"),
    ("cpu", '--index-url "${GRACEFUL_RAY_TORCH_INDEX}" ', "", "the variant's index"),
    ("cpu", "--mount=type=bind,from=wheel,", "--mount=type=bind,from=base-cpu,",
     "the wheel stage's wheel"),
])
def test_dockerfile_check_fails_on_a_broken_line(tmp_path, variant, old, new, words):
    text = DOCKERFILE.read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new))
    with pytest.raises(AssertionError, match=re.escape(words)):
        _check_dockerfile(variant, broken)


def _readme_commands() -> list[str]:
    """The README's shell commands, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [c.strip() for b in blocks for c in re.sub(r"\\\n\s*", "", b).splitlines()
            if c.strip()]


def test_readme_builds_the_images_the_manifests_run():
    commands = _readme_commands()
    header = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    for variant, tag in TAG.items():
        build = (f"docker build -f cluster/docker/Dockerfile --build-arg VARIANT={variant} "
                 f"-t $REGISTRY/graceful-ray:{tag} .")
        assert build in commands, f"README does not build the {variant} image as {tag}"
        assert f"docker push $REGISTRY/graceful-ray:{tag}" in commands
        assert f"--build-arg VARIANT={variant} \\\n#       -t ghcr.io/YOUR-ORG/graceful-ray:{tag} ." in header
    # the registry placeholder the README's sed replaces is the manifests' own
    repos = {OUR_IMAGE.match(i)["repo"] for p in _manifests() for i in _images(_load(p))}
    assert len(repos) == 1, f"one image repository everywhere, got {sorted(repos)}"
    # the operator the README installs is the one whose CRDs the manifests pass
    assert (f"helm install kuberay-operator kuberay/kuberay-operator --version "
            f"{KUBERAY_VERSION.lstrip('v')}") in commands
    for c in commands:
        if c.startswith("kubectl apply -f "):
            assert (ROOT / c.split()[3]).is_file(), c


def test_readme_job_on_the_raycluster_parses_with_the_jobs_parser():
    import argparse

    from graceful_ray.cli import add_root_argument
    from graceful_ray.train.cli import add_train_arguments

    (cmd,) = [c for c in _readme_commands()
              if c.startswith("ray job submit --address http://127.0.0.1:8265 -- python /home/ray/")]
    argv = _entrypoint_script(cmd.split(" -- ", 1)[1].split("#")[0])
    parser = argparse.ArgumentParser()  # the job's parser (jobs/train_upgrade.py, run_job)
    add_train_arguments(parser)
    parser.add_argument("--alias")
    add_root_argument(parser)
    args = parser.parse_args(argv[2:])
    assert args.gpu and args.run_name == "v2-bct"


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_else():
    for stage in _stages("cpu").values():
        for c, flags, v in stage["commands"]:
            if c == "COPY" and not any(f.startswith("--from") for f in flags):
                for src in v[:-1]:
                    assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    for path in (".git", "runs", "benchmarks/results", "tests", "graceful_ray/__pycache__",
                 "shared", ".venv", "dist"):
        assert _dockerignored(path), f"{path} would be sent to the builder"


def test_vendored_crds_are_the_targeted_kuberay_version():
    for kind in CRD_FILES:
        vendored = crd(kind)
        assert vendored["kind"] == kind and vendored["apiVersion"] == "ray.io/v1"
        assert vendored["kuberay"] == KUBERAY_VERSION, "manifests target the vendored version"
        assert vendored["source"].startswith(f"ray-project/kuberay@{KUBERAY_VERSION}:")
    # what the reading produces is JSON Schema (one kind: the meta-check costs seconds;
    # the three CRDs are generated alike)
    KubeValidator.check_schema(validator("RayJob").schema)


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_kuberay_manifest_passes_the_crd_schema(path):
    doc = _load(path)
    errors = kube_errors(doc)
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def _break(doc, path: str, value=None, rename: str | None = None):
    """A copy of ``doc`` with the field at dotted ``path`` set to ``value`` or renamed."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if rename:
        node[rename] = node.pop(last)
    else:
        node[last] = value
    return doc


RAYCLUSTER = KUBERAY / "raycluster.yaml"
HEAD_CONTAINER = "spec.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize("path,value,rename,words", [
    ("spec.workerGroupSpecs.0.maxReplicas", None, "maxReplica", "'maxReplica' was unexpected"),
    ("spec.enableInTreeAutoscaling", None, "enableInTreeAutoScaling",
     "'enableInTreeAutoScaling' was unexpected"),
    (f"{HEAD_CONTAINER}.imagePullPolicy", None, "imagePullPolicyy", "imagePullPolicyy"),
    ("spec.headGroupSpec.rayStartParams.num-cpus", 0, None, "0 is not of type 'string'"),
    ("spec.rayVersion", 2.6, None, "2.6 is not of type 'string'"),
    (f"{HEAD_CONTAINER}.env.0.value", 1, None, "1 is not of type 'string'"),
    ("spec.workerGroupSpecs.0.maxReplicas", "8", None, "'8' is not of type 'integer'"),
    ("spec.workerGroupSpecs.0.maxReplicas", 2 ** 31, None, "is greater than the maximum"),
    (f"{HEAD_CONTAINER}.resources.limits.memory", "16 GB", None, "does not match"),
    (f"{HEAD_CONTAINER}.ports.1.containerPort", 6379, None, "duplicate entry"),
    ("metadata.name", "Graceful_Ray", None, "does not match"),
    # null where no null is allowed: dropped, so a required field is missing
    ("spec.headGroupSpec.template.spec.containers.0.name", None, None, "'name' is a required"),
])
def test_crd_check_fails_on_a_broken_field(path, value, rename, words):
    doc = _load(RAYCLUSTER)
    assert not kube_errors(doc)
    errors = kube_errors(_break(doc, path, value, rename))
    assert any(words in e for e in errors), errors


def test_crd_check_takes_what_the_api_server_takes():
    doc = _load(RAYCLUSTER)
    # int-or-string: a quantity may be a bare number or a string
    ok = _break(_break(doc, f"{HEAD_CONTAINER}.resources.limits.cpu", 4),
                f"{HEAD_CONTAINER}.resources.requests.cpu", "4000m")
    assert not kube_errors(ok)
    # the RayService and RayJob embed the same cluster spec, checked as strictly
    svc = _load(KUBERAY / "rayservice-shadow.yaml")
    broken = _break(svc, "spec.rayClusterConfig.workerGroupSpecs.0.minReplicas", None,
                    "minReplica")
    assert any("minReplica" in e for e in kube_errors(broken))
    job = _load(KUBERAY / "rayjob-train.yaml")
    assert any("shutdownAfterJobFinishes" in e for e in kube_errors(
        _break(job, "spec.shutdownAfterJobFinishes", "true")))


def test_schema_reading_of_nullable_and_preserved_fields():
    # the vendored CRDs (v1.7.0) use preserve-unknown-fields nowhere and nullable
    # once or twice each; the reading is still the API server's
    crd = {"type": "object", "required": ["r"], "properties": {
        "r": {"type": "string"},
        "a": {"type": "string", "nullable": True},
        "b": {"type": "string"},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object"},
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}],
              "x-kubernetes-int-or-string": True},
    }}
    v = KubeValidator(to_jsonschema(crd))

    def ok(doc):
        return v.is_valid(prune_nulls(doc, crd))

    assert ok({"r": "x", "a": None, "free": {"anything": {"at": 1}}, "q": 3})
    assert prune_nulls({"r": "x", "a": None, "b": None}, crd) == {"r": "x", "a": None}
    assert ok({"r": "x", "q": "3Gi"}) and ok({"r": "x", "b": None})  # b's null is dropped
    assert not ok({"r": None})  # ...so a required field is missing
    assert not ok({"r": "x", "closed": {"x": 1}})
    assert not ok({"r": "x", "q": 1.5}) and not ok({"r": "x", "q": [1]})
    assert not ok({"r": "x", "unknown": 1}) and not ok({"r": "x", "unknown": None})


# ------------------------------------------------------------ KubeRay: pods
def _cluster_specs(doc):
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    spec = doc["spec"]
    return [spec if key[doc["kind"]] is None else spec[key[doc["kind"]]]]


def _groups(cluster_spec):
    yield "head", cluster_spec["headGroupSpec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _pod_spec_ok(template):
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)


def _cluster_spec_ok(spec):
    assert "rayStartParams" in spec["headGroupSpec"]
    _pod_spec_ok(spec["headGroupSpec"]["template"])
    for group in spec.get("workerGroupSpecs", []):
        assert group["groupName"] and "rayStartParams" in group
        _pod_spec_ok(group["template"])


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_kuberay_pods_are_fit_for_ray(path):
    doc = _load(path)
    sa = _load(KUBERAY / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount" and sa["apiVersion"] == "v1"
    for cluster in _cluster_specs(doc):
        _cluster_spec_ok(cluster)
        # the manifests target the pinned Ray, the image's
        assert cluster["rayVersion"] == RAY_PIN
        ranged = [g["groupName"] for g in cluster.get("workerGroupSpecs", [])
                  if g["minReplicas"] < g["maxReplicas"]]
        assert bool(cluster.get("enableInTreeAutoscaling")) == bool(ranged), \
            f"{path.name}: groups {ranged} have a range; in-tree autoscaling must be on exactly then"
        if cluster.get("enableInTreeAutoscaling"):
            res = cluster["autoscalerOptions"]["resources"]
            assert res["requests"] == res["limits"]
        for name, group in _groups(cluster):
            pod = group["template"]["spec"]
            where = f"{path.name} {name}"
            assert pod["serviceAccountName"] == sa["metadata"]["name"], where
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert shm, f"{where}: no memory-backed volume for /dev/shm"
            ray_container = pod["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
            assert mounts.get("/dev/shm") == shm[0]["name"], f"{where}: /dev/shm is not in memory"
            res = ray_container["resources"]
            assert res["requests"] == res["limits"], f"{where}: Ray sizes itself from the limits"
            assert {"cpu", "memory"} <= set(res["limits"]), where
            assert {"name": "graceful-ray-storage", "optional": True} in [
                e.get("secretRef") for e in ray_container.get("envFrom", [])], \
                f"{where}: no storage credentials from the secret"
            # the image: ours, at the package's version and the pinned Ray, of the pod's kind
            m = OUR_IMAGE.match(ray_container["image"])
            assert m, f"{where}: {ray_container['image']} is not the graceful-ray image"
            assert m["version"] == PACKAGE_VERSION and m["ray"] == RAY_PIN, where
            gpu = "nvidia.com/gpu" in res["limits"]
            assert m["variant"] == ("gpu" if gpu else "cpu"), f"{where}: {m['variant']} image"
            if name == "head":
                assert group["rayStartParams"].get("num-cpus") == "0", \
                    f"{where}: no work on the head"


def _commented_block(text: str, first: str) -> dict:
    """The commented-out YAML block that starts with ``# first``, uncommented."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"# {first}")
    block = []
    for line in lines[start:]:
        m = re.match(r"^\s*# ?(.*)$", line)
        if not m:
            break
        block.append(m.group(1))
    return yaml.safe_load("\n".join(block))


@pytest.mark.parametrize("path", [RAYCLUSTER, KUBERAY / "rayjob-train.yaml"], ids=lambda p: p.name)
def test_gpu_scheduling_examples_are_valid_once_uncommented(path):
    doc = _load(path)
    gpu_groups = 0
    for cluster in _cluster_specs(doc):
        for name, group in _groups(cluster):
            pod = group["template"]["spec"]
            if "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]:
                continue
            example = _commented_block(path.read_text(), "nodeSelector:")
            assert set(example) == {"nodeSelector", "tolerations"}, f"{path.name} {name}"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
                example["tolerations"]
            pod.update(example)
            gpu_groups += 1
    assert gpu_groups, f"{path.name} has no GPU group"
    errors = kube_errors(doc)
    assert not errors, f"{path.name} with the GPU example:\n" + "\n".join(errors)


# ------------------------------------------------------- KubeRay: workloads
def _entrypoint_script(entrypoint: str) -> list[str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    assert argv[1].startswith(IMAGE_WORKDIR + "/"), f"{argv[1]}: not in the image's {IMAGE_WORKDIR}"
    script = ROOT / os.path.relpath(argv[1], IMAGE_WORKDIR)
    assert script.is_file(), f"entrypoint {argv[1]} does not exist"
    return argv


def test_kuberay_raycluster():
    doc = _load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _cluster_spec_ok(doc["spec"])
    assert {g["groupName"]: (g["minReplicas"], g["maxReplicas"])
            for g in doc["spec"]["workerGroupSpecs"]} == {"gpu": (0, 8)}


def test_kuberay_rayjob_runs_the_training_job():
    doc = _load(KUBERAY / "rayjob-train.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = _entrypoint_script(doc["spec"]["entrypoint"])
    assert argv[1] == f"{IMAGE_WORKDIR}/jobs/train_upgrade.py"
    # the job's arguments parse with the job's own parser
    from graceful_ray.train.cli import add_train_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    parser.add_argument("--alias")
    args = parser.parse_args(argv[2:])
    assert args.gpu and args.workers >= 1 and args.run_name
    # as many GPU workers as the job trains with
    (gpu,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] == gpu["maxReplicas"] == args.workers
    assert "runtimeEnvYAML" not in doc["spec"], "the image has the package; no install per job"


def _unknown_fields(data, model, where="") -> list[str]:
    """Keys Serve's pydantic models would silently drop (they ignore unknown fields)."""
    from pydantic import BaseModel

    errors = []
    if not isinstance(data, dict):
        return errors
    fields = type(model).model_fields
    names = {alias for n, f in fields.items() for alias in (n, f.alias) if alias}
    errors += [f"{where}{k}: unknown field" for k in data if k not in names]
    for name, f in fields.items():
        key = f.alias if f.alias in data else name
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            errors += _unknown_fields(data.get(key), value, f"{where}{key}.")
        elif isinstance(value, list) and isinstance(data.get(key), list):
            errors += [e for i, (d, m) in enumerate(zip(data[key], value)) if isinstance(m, BaseModel)
                       for e in _unknown_fields(d, m, f"{where}{key}.{i}.")]
    return errors


def check_serve_config(config: dict):
    """Ray's ServeDeploySchema, and no field it would ignore; returns the parsed schema."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    unknown = _unknown_fields(config, schema)
    if unknown:
        raise ValueError("; ".join(unknown))
    return schema


def _serve_configs():
    svc = _load(KUBERAY / "rayservice-shadow.yaml")
    return {"rayservice-shadow.yaml": yaml.safe_load(svc["spec"]["serveConfigV2"]),
            "deploy/serve_config.yaml": _load(ROOT / "deploy" / "serve_config.yaml")}


@pytest.mark.parametrize("name", list(_serve_configs()))
def test_serve_config_passes_serve_schema_and_the_shadow_config(name):
    from graceful_ray.serve.shadow_config import ShadowConfig

    serve = check_serve_config(_serve_configs()[name])
    (app,) = serve.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), app.import_path
    assert "admin_token" not in app.args, "the admin token must come from a secret"
    config = ShadowConfig.from_dict(app.args)
    assert config.baseline and config.candidate
    for env in [app.runtime_env] if app.runtime_env else []:
        _check_runtime_env(env)
    # the router and both models scale; the comparator stays one
    for role in ("router", "baseline_resources", "candidate_resources"):
        auto = getattr(config, role).autoscaling_config
        assert auto and auto["min_replicas"] < auto["max_replicas"], f"{name}: {role} does not scale"
        assert auto["target_ongoing_requests"] < getattr(config, role).max_ongoing_requests
    assert config.comparator.autoscaling_config is None


def test_serve_configs_scale_the_same():
    from graceful_ray.serve.shadow_config import ShadowConfig

    configs = [ShadowConfig.from_dict(c["applications"][0]["args"])
               for c in _serve_configs().values()]
    for role in ("router", "baseline_resources", "candidate_resources", "comparator"):
        assert len({json.dumps(ShadowConfig.to_dict(c)[role], sort_keys=True)
                    for c in configs}) == 1, f"{role} differs between the RayService and deploy/"


def _cpus(quantity) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayservice_workers_hold_what_serve_scales_to():
    from graceful_ray.serve.shadow_config import ShadowConfig

    doc = _load(KUBERAY / "rayservice-shadow.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    config = ShadowConfig.from_dict(yaml.safe_load(doc["spec"]["serveConfigV2"])
                                    ["applications"][0]["args"])

    def demand(bound: str) -> float:
        total = config.comparator.num_cpus
        for role in ("router", "baseline_resources", "candidate_resources"):
            res = getattr(config, role)
            n = res.autoscaling_config[bound] if res.autoscaling_config else res.num_replicas
            total += n * res.num_cpus
        return total

    def capacity(bound: str) -> float:
        head = cluster["headGroupSpec"]
        total = _cpus(head["rayStartParams"].get(
            "num-cpus", head["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]))
        for g in cluster["workerGroupSpecs"]:
            total += g[bound] * _cpus(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        return total

    assert demand("min_replicas") <= capacity("minReplicas"), "the minimum does not fit"
    assert demand("max_replicas") <= capacity("maxReplicas"), \
        "Serve would scale to replicas no worker can hold"
    # Serve's upper bound needs more than the minimum workers: the worker range is used
    assert demand("max_replicas") > capacity("minReplicas")
    assert cluster["enableInTreeAutoscaling"] is True


def test_serve_check_fails_on_a_broken_field():
    from graceful_ray.errors import ConfigError
    from graceful_ray.serve.shadow_config import ShadowConfig

    serve = _serve_configs()["rayservice-shadow.yaml"]
    bad = copy.deepcopy(serve)
    bad["http_options"]["port"] = "eighty"
    with pytest.raises(Exception, match="port"):
        check_serve_config(bad)
    bad = copy.deepcopy(serve)
    bad["applications"][0]["route_prefx"] = "/"  # Serve itself would drop it without a word
    with pytest.raises(ValueError, match="applications.0.route_prefx: unknown field"):
        check_serve_config(bad)
    bad = copy.deepcopy(serve)
    bad["http_options"]["hots"] = "0.0.0.0"
    with pytest.raises(ValueError, match="http_options.hots"):
        check_serve_config(bad)
    args = serve["applications"][0]["args"]
    for router, words in (
            ({**args["router"], "autoscaling_config": {"min_replicas": 1, "max_replica": 8}},
             "max_replica"),
            ({**args["router"], "autoscaling_config": {"min_replicas": 1, "max_replicas": "8x"}},
             "max_replicas"),
            ({**args["router"], "num_replicas": 2}, "not both")):
        with pytest.raises(ConfigError, match=words):
            ShadowConfig.from_dict({**args, "router": router})
    with pytest.raises(ConfigError, match="comparator"):
        ShadowConfig.from_dict({**args, "comparator": {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}})


def test_autoscaling_reaches_serve_deployment_options():
    from graceful_ray.serve.shadow_config import ShadowConfig
    from graceful_ray.serve.router import ShadowRouter

    args = _serve_configs()["deploy/serve_config.yaml"]["applications"][0]["args"]
    router = ShadowConfig.from_dict(args).router
    deployment = ShadowRouter.options(name="router", **router.replica_options())
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 8, 32)


def test_kuberay_rayservice_serves_the_shadow_app():
    doc = _load(KUBERAY / "rayservice-shadow.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["args"]["baseline"] and app["args"]["candidate"]
    assert "runtime_env" not in app, "the image has the package; no install per replica"
    # the head runs no replicas: callers go to the workers' proxies
    assert doc["spec"]["excludeHeadPodFromServeSvc"] is True
    _cluster_spec_ok(doc["spec"]["rayClusterConfig"])
    for _, group in _groups(doc["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["GRACEFUL_RAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
            "graceful-ray-admin"


def test_nothing_installs_from_a_moving_branch():
    for path in [*KUBERAY.glob("*.yaml"), *ROOT.glob("cluster/*.yaml"),
                 ROOT / "deploy" / "serve_config.yaml"]:
        text = path.read_text()
        for moving in ("refs/heads/", "@main", "archive/main", "git+https://"):
            assert moving not in text, f"{path.relative_to(ROOT)} installs from {moving}"


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
