"""Shared fixtures: one Ray instance per session, an S3 server on loopback.

Ray start-up costs seconds, so every test that needs Ray shares the session's
instance. The S3 server is moto in server mode: the S3 code paths run for real
over HTTP, not against a mock patched into boto.
"""

from __future__ import annotations

import os
import uuid

import pytest

from tests.helpers import free_port
from tests.local_ray import PROXY_CHECK_ENV, remove_haproxy_dirs, start_local_ray

# Before any test starts a Ray of its own (a cluster, a CLI's, a job's): see local_ray.
for _key, _value in PROXY_CHECK_ENV.items():
    os.environ.setdefault(_key, _value)

# Ray Data's Parquet reader is the product's own choice (graceful_ray.data.reader:
# V1 for the few files of a split, which on 2 cores costs 0.2-1 s where Ray
# 2.60's default V2 starts a pool of footer-reading actors). test_data.py (a
# split) and test_train.py (the cached old outputs) read through V2 as well
# (``ray_data_v2_reader``). So does the Train controller's poll interval
# (graceful_ray.train.trainer.CONTROLLER_POLL_S).


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on 127.0.0.1; sets AWS_* env for the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh bucket on the loopback S3 server, as an ``s3://`` URI."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """The same test against a local directory and against S3."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def _ray_for_session():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    yield
    ray.shutdown()
    remove_haproxy_dirs()


@pytest.fixture
def ray_session(_ray_for_session):
    """One local Ray instance shared by the whole test session.

    ``address="local"`` so a stale /tmp/ray/ray_current_cluster never makes us
    join a dead cluster; 4 logical CPUs on this 2-core machine so Train workers
    holding fractional CPUs still leave room for Ray Data's read tasks. A test
    that needs its own cluster (multi-node) shuts this one down; the next test
    that asks for it gets it back.
    """
    import ray

    if not ray.is_initialized():
        start_local_ray()
    return ray


@pytest.fixture(scope="module")
def ray_module(_ray_for_session):
    """The session's Ray, for module-scoped fixtures (e.g. a model trained once per module)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    return ray


@pytest.fixture
def ray_data_v2_reader():
    """Ray Data's V2 Parquet reader in this process for the test, as a user who
    sets RAY_DATA_USE_DATASOURCE_V2=1 has it (small reads otherwise take V1, see
    graceful_ray.data.reader)."""
    import ray.data

    from graceful_ray.data.reader import RAY_READER_ENV

    ctx = ray.data.DataContext.get_current()
    saved, saved_env = ctx.use_datasource_v2, os.environ.get(RAY_READER_ENV)
    ctx.use_datasource_v2 = True
    os.environ[RAY_READER_ENV] = "1"  # the user's explicit choice, which the product follows
    yield
    ctx.use_datasource_v2 = saved
    if saved_env is None:
        os.environ.pop(RAY_READER_ENV, None)
    else:
        os.environ[RAY_READER_ENV] = saved_env


@pytest.fixture(scope="module")
def mnist1d_small(tmp_path_factory):
    """A small MNIST-1D dataset (data-growth scenario), generated once per module."""
    from graceful_ray.data import make_mnist1d

    out = tmp_path_factory.mktemp("mnist1d") / "data"
    make_mnist1d(str(out), samples=3000, seed=0, scenario="data_growth", old_fraction=0.3)
    return str(out)
