"""Ray-built token stores on a real local cluster: a head and a worker node started as separate
processes; the worker is killed mid-build and the build still finishes, byte-identical to the
in-process build; the same build into a bucket on the GCS emulator; a rerun builds only what is
missing, and `--shard I/N` slices write the same store."""

import gzip
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import storage_emulators

from bignlp_jax.cli import main
from bignlp_jax.data.store import raw_build, ray_build
from bignlp_jax.data.store.manifest import MANIFEST
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.shards import ShardedStore

pytestmark = pytest.mark.slow
gcs_emulator = storage_emulators.gcs_emulator
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
WORDS = ("the quick brown fox jumps over a lazy dog while seven green parrots sing about "
         "tokenizers shards and stores").split()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start ... --block` in its own session: killing its group ends all its processes."""
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """End a node: its session's processes (its workers end with their raylet)."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _running_task(node_pid: int) -> bool:
    """Whether a process below the node's `ray start` is running a build task (Ray titles a
    worker process `ray::build_input` while it runs one)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    stack = list(children.get(node_pid, []))
    while stack:
        pid = stack.pop()
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::build_input"):
                return True
        except OSError:
            pass
        stack += children.get(pid, [])
    return False


def _env() -> dict:
    """The nodes' environment: ours (with the cluster's token) and this checkout first."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _worker_node(address: str) -> subprocess.Popen:
    return _node([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2"], _env())


def _wait_nodes(address: str, n: int, timeout: float = 120.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            alive = sum(x["Alive"] for x in ray.nodes())
        except ConnectionError:
            alive = 0
        finally:
            ray.shutdown()
        if alive == n:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {n} nodes")


@pytest.fixture(scope="module")
def cluster(gcs_emulator):
    """(address, nodes) of a head node with no CPUs and a worker node with 2, on 127.0.0.1:
    every task runs on a worker node. `nodes` lists the worker nodes started (a test may add a
    replacement); all are stopped at the end. Its processes see the GCS emulator and this
    checkout."""
    # The cluster authenticates its clients with a token of its own (not the user's
    # ~/.ray/auth_token); the driver (this process) gets it too.
    loopback = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in loopback}
    os.environ.update(loopback)
    temp = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay < 108 bytes
    port = _port()
    address = f"127.0.0.1:{port}"
    head = _node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
                  "--include-dashboard=false", f"--temp-dir={temp}"], _env())
    nodes: list[subprocess.Popen] = []
    try:
        _wait_nodes(address, 1)
        nodes.append(_worker_node(address))
        _wait_nodes(address, 2)
        yield address, nodes
    finally:
        for node in nodes:
            _stop(node)
        _stop(head)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, embedded_data_dir):
    """Six gzipped JSON-lines files (~0.5M tokens each) and the 1024-piece tokenizer."""
    folder = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    for f in range(6):
        with gzip.open(folder / f"part{f}.jsonl.gz", "wt") as out:
            for _ in range(2500):
                n = int(rng.integers(5, 200))
                out.write(json.dumps({"text": " ".join(rng.choice(WORDS, n))}) + "\n")
    return str(folder / "part*.jsonl.gz"), str(embedded_data_dir / "tokenizers" /
                                               "stdlib_docs_bpe_1024")


def _plan(inputs, out):
    pattern, tokenizer = inputs
    return raw_build.plan([pattern], str(out), tokenizer, name="corpus", split="train",
                          text_key="text", fmt=None, text_unit="file", shard_tokens=100_000)


def _files(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


@pytest.fixture(scope="module")
def in_process(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "in_process"
    tasks, info = _plan(inputs, out)
    raw_build.tokenize_files(tasks, info)
    return out


def test_worker_killed_mid_build_the_store_is_byte_identical(cluster, inputs, in_process,
                                                            tmp_path):
    address, nodes = cluster
    worker = nodes[0]
    out = tmp_path / "ray"
    tasks, info = _plan(inputs, out)

    killed = []

    def kill_while_it_runs_a_task():
        """The only node with CPUs dies running a task; a replacement node joins (as a
        cluster's autoscaler or a requeued node would) and the lost tasks are retried there."""
        deadline = time.monotonic() + 120
        while not _running_task(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.append(_running_task(worker.pid))
        _stop(worker, signal.SIGKILL)
        nodes.append(_worker_node(address))

    killer = threading.Thread(target=kill_while_it_runs_a_task, daemon=True)
    killer.start()
    summary = raw_build.tokenize_files(tasks, info, runner=ray_build.runner(address))
    killer.join(timeout=60)
    assert killed == [True] and worker.poll() is not None  # died running a task
    assert summary["built_inputs"] == 6 and summary["shards"] > 6
    assert _files(out) == _files(in_process)
    # a rerun builds nothing; a lost record rebuilds only its input
    (out / raw_build.PARTS / f"{tasks[2].key}.json").unlink()
    assert raw_build.tokenize_files(tasks, info)["built_inputs"] == 1
    assert _files(out) == _files(in_process)


def test_ray_build_into_a_gcs_bucket_reads_like_the_local_one(cluster, inputs, in_process,
                                                             tmp_path, capsys):
    from bignlp_jax import storage

    bucket = storage_emulators.new_bucket("gs")
    pattern, tokenizer = inputs
    for f in sorted(Path(pattern).parent.glob("part*.jsonl.gz")):  # inputs in the bucket too
        storage.copy_file(f, f"{bucket}/raw/{f.name}")
    pattern = f"{bucket}/raw/part*.jsonl.gz"
    out = f"{bucket}/stores/corpus"
    # the replacement worker node runs it (the first one was killed above)
    assert main(["data", "tokenize", "--name", "corpus", "--input", pattern, "--out", out,
                 "--tokenizer", tokenizer, "--shard-tokens", "100000", "--ray",
                 cluster[0]]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"]
    local = ShardedStore(in_process)
    assert summary["built_inputs"] == 6 and summary["shards"] == len(local.shards)
    remote = ShardedStore(out)  # the same shards (named by input), identity and rows
    assert remote.identity == local.identity
    samples = np.arange(0, 400, 7)
    for key, value in SampleIndex(local, 32, seed=1).rows(samples).items():
        np.testing.assert_array_equal(SampleIndex(remote, 32, seed=1).rows(samples)[key], value)


def test_array_job_slices_write_the_same_store(inputs, in_process, tmp_path, capsys):
    pattern, tokenizer = inputs
    out = tmp_path / "sliced"
    args = ["data", "tokenize", "--name", "corpus", "--input", pattern, "--out", str(out),
            "--tokenizer", tokenizer, "--shard-tokens", "100000"]
    for i in (2, 0):
        assert main([*args, "--shard", f"{i}/3"]) == 0
    assert not (out / MANIFEST).exists()  # slice 1 is missing: no manifest yet
    assert main([*args, "--shard", "1/3"]) == 0
    assert "manifest written" in capsys.readouterr().out
    assert _files(out) == _files(in_process)
