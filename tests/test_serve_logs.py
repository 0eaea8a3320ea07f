"""The project's warnings reach Serve's replica log as WARNING records.

A subprocess configures its logging exactly as Serve does in a replica
(``configure_component_logger`` for a REPLICA, writing ``replica_*.log``), with
Serve's stderr redirect off (its default) and on (``RAY_SERVE_LOG_TO_STDERR=0``),
then logs through our loggers as a deployment does. Before ``to_serve_logs`` a
warning went to Python's last-resort handler: a bare stderr line that the
replica log never had, or, with the redirect on, an INFO record.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_REPLICA = r"""
import logging, sys
from ray.serve._private.common import ServeComponentType
from ray.serve._private.logging_utils import configure_component_logger
from ray.serve.schema import LoggingConfig

configure_component_logger(component_name="router", component_id="r1", component_type=ServeComponentType.REPLICA,
                           logging_config=LoggingConfig(logs_dir=sys.argv[1]), max_bytes=10**6, backup_count=1)
from graceful_ray.serve.logs import to_serve_logs

to_serve_logs(only_in_replica=False)  # what each deployment's constructor does in a replica
logging.getLogger("graceful_ray.serve.shadow").warning("the candidate shadow failed 3 calls in a row")
logging.getLogger("graceful_ray.serve.router").info("router ready")
for h in logging.getLogger("ray.serve").handlers:
    h.flush()
"""


@pytest.mark.parametrize("log_to_stderr", ["1", "0"])
def test_project_warnings_are_warnings_in_the_replica_log(tmp_path, log_to_stderr):
    env = {**os.environ, "RAY_SERVE_LOG_TO_STDERR": log_to_stderr,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _REPLICA, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (log,) = tmp_path.glob("replica_router_r1.log")
    lines = log.read_text().splitlines()
    shadow = [ln for ln in lines if "shadow failed 3 calls" in ln]
    assert len(shadow) == 1 and shadow[0].startswith("WARNING "), lines
    assert [ln for ln in lines if "router ready" in ln][0].startswith("INFO "), lines
