"""README "Upgrade your own model", run as written, on a local Ray.

The commands are read from the README section itself (every line of its
``bash`` blocks, continuation lines joined), so the guide cannot drift from what
is tested. They run one by one in ``bash`` in a fresh directory in which
``tests/`` is the repository's, with ``graceful-ray`` and ``python`` meaning
this interpreter, and ``RAY_ADDRESS`` naming one local Ray started for the
guide with its ``PYTHONPATH`` (what each command's own local Ray would
inherit in a user's terminal: that is how the workers import the team's model
package), so no command pays for a cluster of its own. The team's side is ``tests/userpkg``: a model
package whose head is the module ``fc`` and a plain PyTorch training script that
does not import graceful-ray, writing the data as CSV and the weights as a
``.pt`` state dict.

Three things differ from a user's terminal, and only these: ``graceful-ray
serve`` gets ``--port`` appended (a free one, also put into the guide's ``URL=``
line); the service runs in the
background while the test sends what the guide's comment describes (the
dataset's val and test rows as traffic to ``/v1/predict`` and their labels to
``/v1/feedback``); and Ctrl-C ends it at the end. After the guide: the cutover
moved ``shop@production`` to the tuned candidate, and the export loads into the
team's own factory with ``strict=True`` and as TorchScript, giving the registry
model's outputs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import free_port, wait_for_line, wait_report
from tests.local_ray import start_local_ray

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
USERPKG = REPO / "tests" / "userpkg"
SECTION = "### Upgrade your own model"


def guide_commands() -> list[str]:
    """Every command of the README section, in order, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n### ", start + len(SECTION))
    section = text[start:end if end != -1 else len(text)]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return commands


def _shims(bin_dir: Path) -> None:
    """``graceful-ray`` and ``python`` as this interpreter runs them (the worktree's code)."""
    bin_dir.mkdir()
    for name, target in (("graceful-ray", f'"{sys.executable}" -m graceful_ray.cli'),
                         ("python", f'"{sys.executable}"')):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {target} \"$@\"\n")
        path.chmod(0o755)


class Shell:
    """Runs guide lines in ``bash`` in ``cwd``, keeping the variables they assign."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.transcript: list[str] = []

    def assign(self, line: str) -> str:
        name = line.removeprefix("export ").split("=", 1)[0]
        out = subprocess.run(["bash", "-c", f'{line}\nprintf %s "${name}"'], cwd=self.cwd, env=self.env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        self.env[name] = out
        return name

    def run(self, line: str, timeout: float = 600) -> str:
        start = time.monotonic()
        proc = subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        self.transcript.append(f"$ {line}\n{out[-4000:]}")
        print(f"{time.monotonic() - start:6.1f}s  {line[:100]}")  # where the test's time goes (-s)
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{out[-6000:]}"
        return proc.stdout


@pytest.fixture
def guide_ray(monkeypatch):
    """One local Ray for every command of the guide (each would otherwise start its own,
    which costs half a minute apiece on a busy machine). It is started with the guide's
    PYTHONPATH, so its workers import the team's package as a user's local Ray would;
    the session's Ray is stopped for it and comes back for the next test that asks."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(USERPKG), str(REPO), os.environ.get("PYTHONPATH")) if p))
    start_local_ray()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_upgrade_your_own_model_guide_runs_as_written(tmp_path, guide_ray):
    from graceful_ray.data import read_info, read_split
    from graceful_ray.data import load_split
    from graceful_ray.registry import Registry, load_model

    # The team's script is plain PyTorch: graceful-ray is nowhere in it.
    assert "graceful_ray" not in (USERPKG / "train_v1.py").read_text()
    assert "graceful_ray" not in (USERPKG / "shopnet" / "model.py").read_text()
    commands = guide_commands()
    kinds = [c.split()[0] + (" " + c.split()[1] if c.startswith("graceful-ray") else "") for c in commands]
    for needed in ("graceful-ray data", "graceful-ray registry", "graceful-ray train", "graceful-ray tune",
                   "graceful-ray evaluate", "graceful-ray serve", "curl"):
        assert needed in kinds, f"the guide lost its {needed!r} step: {commands}"

    work = tmp_path / "work"
    work.mkdir()
    (work / "tests").symlink_to(REPO / "tests")
    _shims(tmp_path / "bin")
    port = free_port()
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "RAY_ADDRESS": guide_ray, "RAY_SERVE_LOG_TO_STDERR": "0",
           "GRACEFUL_RAY_ROOT": str(work / ".graceful-ray")}
    env.pop("GRACEFUL_RAY_ADMIN_TOKEN", None)  # the guide sets its own
    sh = Shell(work, env)
    server: subprocess.Popen | None = None
    lines: list[str] = []
    try:
        for line in commands:
            if re.match(r"^(export )?[A-Za-z_][A-Za-z0-9_]*=", line):
                name = sh.assign(line)
                if name == "URL":  # the guide's port is 8000; the test's is a free one
                    sh.env["URL"] = re.sub(r":\d+$", f":{port}", sh.env["URL"])
            elif line.startswith("graceful-ray serve"):
                server = subprocess.Popen(
                    ["bash", "-c", f"exec {line} --port {port}"], cwd=work,
                    env=sh.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                wait_for_line(server, lines, "shadow service up", timeout_s=600)  # slow replicas on 2 cores
                _send_traffic(port, work / "data" / "shop", load_split)
            else:
                out = sh.run(line)
                if line.startswith("curl") and "/cutover" in line:
                    assert json.loads(out).get("primary") == "candidate", out
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    transcript = "\n".join(sh.transcript)
    data, root = work / "data" / "shop", work / ".graceful-ray"
    # The data: the CSV's string labels became classes, v1's ids became old_train.
    info = read_info(str(data))
    assert info.class_names == ["boots", "heels", "sandals", "slippers", "sneakers"]
    assert {"train", "val", "test", "old_train"} <= set(info.splits)
    old_ids = {int(i) for i in (work / "team" / "v1_ids.txt").read_text().split()}
    assert set(read_split(str(data), "old_train").column("id").to_pylist()) == old_ids
    # v1: imported, evaluated, production until the cutover.
    assert re.search(r"imported shop@v1: 5 classes, embedding dim 16, new embedding space shop@v1", transcript)
    assert re.search(r"test accuracy on data/shop: 0\.\d{4}", transcript)
    reg = Registry(str(root / "registry"))
    v1 = reg.get("shop@v1")
    assert v1.method == "imported" and v1.architecture["kwargs"]["head_module"] == "fc"
    # v2 trained against it in its embedding space; tune published the candidate.
    v2 = reg.get("shop@v2")
    assert v2.parent == "shop@v1" and v2.embedding_space == "shop@v1" and v2.method == "bct"
    candidate = reg.get("shop@candidate")
    assert candidate.version > 2 and candidate.parent == "shop@v1"
    assert (work / "reports" / "shop" / "report.json").exists()
    # The cutover moved production to the candidate, in the registry.
    assert reg.get("shop@production").version == candidate.version
    assert reg.alias_record("shop", "production")["previous"] == 1

    # The export is the candidate in the team's own format, loaded by plain PyTorch.
    sys.path.insert(0, str(USERPKG))
    try:
        import safetensors.torch
        from shopnet.model import build
    finally:
        sys.path.remove(str(USERPKG))
    export = work / "export" / "shop"
    meta = json.loads((export / "export.json").read_text())
    assert meta["source"] == candidate.ref and meta["factory"] == "shopnet.model:build"
    net = build(**meta["model_args"])
    net.load_state_dict(safetensors.torch.load_file(str(export / "model.safetensors")), strict=True)
    net.eval()
    scripted = torch.jit.load(str(export / meta["torchscript"]["file"]))
    assert meta["torchscript"]["mode"] == "scripted"
    _, model = load_model(reg, candidate.ref)
    x, _, _ = load_split(str(data), "test")
    x = torch.as_tensor(x)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(net(x), expected)
        assert torch.allclose(scripted(x), expected, atol=1e-6)
    assert server is not None and server.returncode == 0, "".join(lines)[-3000:]


def _send_traffic(port: int, data: Path, load_split) -> None:
    """What the guide leaves to the team: live requests, then their labels, until the
    report has them all (the shadow answers arrive off the request path)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as http:
        ids, labels = [], []
        for split in ("val", "test"):
            x, y, _ = load_split(str(data), split)
            for start in range(0, len(y), 64):
                r = http.post("/v1/predict", json={"inputs": np.round(x[start:start + 64], 5).tolist()})
                assert r.status_code == 200, r.text
                ids += [p["request_id"] for p in r.json()["predictions"]]
            labels += [int(v) for v in y]
        n = len(ids)
        report = wait_report(http, lambda rep: rep["requests"] >= n and rep["in_flight"] == 0, 300)
        assert report["compared"] == n, report
        fb = http.post("/v1/feedback", json={"labels": [
            {"request_id": i, "label": label} for i, label in zip(ids, labels)]})
        assert fb.status_code == 200, fb.text
        report = wait_report(http, lambda rep: rep["labelled"] >= n, 300)
        assert report["labelled"] == n and report["gates"]["passed"], report["gates"]
