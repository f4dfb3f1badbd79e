"""Raw-file store build throughput: in-process against Ray with 1 and 2 worker nodes.

    PYTHONPATH=. python benchmarks/ray_build.py --tokenizer TOK [--files 8 --docs 4000]

Writes FILES gzipped JSON-lines inputs (~DOCS documents of 5-400 words each), builds the store
in this process, then on a local Ray cluster (a head node with no CPUs for tasks, and 1 or 2
worker nodes of 1 CPU each, all on 127.0.0.1, started as separate processes and stopped after),
and checks every build is byte-identical to the in-process one. Prints one JSON line per build:
tokens, seconds and tokens/s of the build (cluster start-up excluded; the first task on each
worker imports bignlp_jax and loads the tokenizer, included).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bignlp_jax.data.store import raw_build, ray_build  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven green parrots sing about "
         "tokenizers shards stores and the sea").split()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


def node(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                             "--disable-usage-stats", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_cpus(address: str, cpus: int) -> None:
    import ray

    for _ in range(240):
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            have = ray.cluster_resources().get("CPU", 0)
        except ConnectionError:
            have = 0
        finally:
            ray.shutdown()
        if have >= cpus:
            return
        time.sleep(0.5)
    raise RuntimeError("the cluster did not come up")


def build(tasks, info, runner=raw_build.run_in_process) -> dict:
    return raw_build.tokenize_files(tasks, info, runner=runner, log=lambda *_: None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--docs", type=int, default=4000)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raybench"))
    rng = np.random.default_rng(0)
    for f in range(args.files):
        with gzip.open(work / f"in{f}.jsonl.gz", "wt") as out:
            for _ in range(args.docs):
                out.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(5, 400)))})
                          + "\n")

    def plan(name):
        return raw_build.plan([str(work / "in*.jsonl.gz")], str(work / name), args.tokenizer,
                              name="bench", split="train", text_key="text", fmt=None,
                              text_unit="file", shard_tokens=1_000_000)

    reference = build(*plan("in_process"))
    print(json.dumps({"build": "in-process", **{k: reference[k] for k in (
        "tokens", "seconds", "tokens_per_sec")}}), flush=True)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for workers in (1, 2):
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{port.getsockname()[1]}"
        port.close()
        temp = tempfile.mkdtemp(prefix="ray")
        nodes = [node(["--head", "--node-ip-address=127.0.0.1",
                       f"--port={address.split(':')[1]}", "--num-cpus=0",
                       "--include-dashboard=false", f"--temp-dir={temp}"], env)]
        try:
            for k in range(workers):  # one at a time: nodes starting together can collide
                nodes.append(node([f"--address={address}", "--node-ip-address=127.0.0.1",
                                   "--num-cpus=1"], env))
                wait_cpus(address, k + 1)
            result = build(*plan(f"ray{workers}"), runner=ray_build.runner(address))
        finally:
            for n in reversed(nodes):
                stop(n)
        assert files_of(work / f"ray{workers}") == files_of(work / "in_process")
        print(json.dumps({"build": f"ray, {workers} worker node(s)", **{k: result[k] for k in (
            "tokens", "seconds", "tokens_per_sec")}}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
