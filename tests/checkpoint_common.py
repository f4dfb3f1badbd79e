"""Shared set-up for the checkpoint tests: one pinned tiny config and a compile cache.

The optimizer schedule is pinned to `decay_steps=12` so a run's numerics do not depend on
`train.steps` (a run stopped at 8 and one stopped at 12 follow the same schedule). JAX's
persistent compilation cache lets the many short runs of the same config (in this process and in
subprocesses) compile the train step once.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

OVERRIDES = [
    "model.vocab_size=256", "data.source=synthetic", "data.seq_len=32",
    "train.global_batch_size=8", "train.eval_every=0", "train.log_every=1",
    "optimizer.schedule=cosine", "optimizer.decay_steps=12", "optimizer.warmup_steps=2",
    "checkpoint.every_steps=4", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1",
]

CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": None,  # filled in by enable_compile_cache
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def config(run_dir: Path | str, *extra: str):
    from bignlp_jax.config import load_config

    return load_config("tiny", [*OVERRIDES, f"run.dir={run_dir}", *extra])


def enable_compile_cache(tmp_path_factory) -> dict[str, str]:
    """Turn on the persistent cache (one per test session, shared by the checkpoint test
    modules) here; returns the env vars that do the same for subprocesses."""
    cache_dir = tmp_path_factory.getbasetemp() / "checkpoint_jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return {**CACHE_ENV, "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}


def disable_compile_cache() -> None:
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """The compile cache on for one test module (import this fixture into the module); yields
    the env vars for its subprocesses."""
    env = enable_compile_cache(tmp_path_factory)
    yield env
    disable_compile_cache()


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
