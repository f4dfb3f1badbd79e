"""Shared set-up for the checkpoint tests: one pinned tiny config, a compile cache, and two
checkpoint_worker.py processes joined by jax.distributed.

The optimizer schedule is pinned to `decay_steps=12` so a run's numerics do not depend on
`train.steps` (a run stopped at 8 and one stopped at 12 follow the same schedule). JAX's
persistent compilation cache lets the many short runs of the same config (in this process and in
subprocesses) compile the train step once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from compile_flags import xla_flags

OVERRIDES = [
    "model.vocab_size=256", "data.source=synthetic", "data.seq_len=32",
    "train.global_batch_size=8", "train.eval_every=0", "train.log_every=1",
    "optimizer.schedule=cosine", "optimizer.decay_steps=12", "optimizer.warmup_steps=2",
    "checkpoint.every_steps=4", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1",
]

CACHE_KEYS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def cli_overrides(run_dir: Path | str, *extra: str) -> list[str]:
    """OVERRIDES, the run dir and `extra` for a command line: a key of `extra` replaces the
    same key of OVERRIDES (the CLI refuses a key given twice)."""
    replaced = {item.partition("=")[0] for item in extra}
    return [*(o for o in OVERRIDES if o.partition("=")[0] not in replaced),
            f"run.dir={run_dir}", *extra]


def config(run_dir: Path | str, *extra: str):
    from bignlp_jax.config import load_config

    return load_config("tiny", [*OVERRIDES, f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def cache_env():
    """The env vars of the session's persistent compile cache (conftest.py turns it on for this
    process and every subprocess), for tests that build a subprocess's environment."""
    return {k: os.environ[k] for k in CACHE_KEYS if k in os.environ}


def losses(run_dir: Path | str) -> dict[int, float]:
    from bignlp_jax.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def logged_steps(run_dir: Path | str) -> int:
    """How many steps a (possibly still running) run has logged."""
    try:
        return len(losses(run_dir))
    except ValueError:  # a line being written right now
        return 0


def host_params(run_dir: Path | str, model_cfg, step: int | None = None) -> dict:
    from bignlp_jax.checkpoint import load_params

    return jax.tree.map(np.asarray, load_params(run_dir, model_cfg, step=step))


def assert_trees_equal(a, b) -> None:
    """Bitwise equality of two trees of arrays, naming the first leaf that differs."""
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def subprocess_env(cache_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **cache_env)
    return env


WORKER = Path(__file__).with_name("checkpoint_worker.py")
MESH = ["mesh.data=1", "mesh.fsdp=-1"]  # every parameter split over both processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(run_dir: Path, dump: Path, cache_env, *overrides: str,
                   name: str = "worker") -> list[subprocess.Popen]:
    """checkpoint_worker.py as two processes of 2 CPU devices each, training `run_dir` with MESH
    and `overrides` (process 0 dumps its params to `dump`); output in RUN_DIR/../<name><i>.log."""
    env = subprocess_env(cache_env)
    env["XLA_FLAGS"] = xla_flags(2)
    env["JAX_PLATFORMS"] = "cpu"
    port, procs = str(free_port()), []
    for i in range(2):
        log = open(run_dir.parent / f"{name}{i}.log", "w")  # noqa: SIM115 - closed by the OS
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), port, "2", str(i), str(run_dir), str(dump),
             *MESH, *overrides], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def worker_log(run_dir: Path, i: int, name: str = "worker") -> str:
    return (run_dir.parent / f"{name}{i}.log").read_text()


def finish_workers(procs: list[subprocess.Popen], timeout: float = 300.0) -> list[int]:
    """The workers' exit codes; any still running after `timeout` is killed."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
