"""Test set-up: 8 simulated CPU devices, configured before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Embedded corpora and default tokenizers are built once per test session into a fresh dir
# (subprocesses inherit it), so tests neither depend on nor write to the user's ~/.cache.
if "BIGNLP_DATA_DIR" not in os.environ:
    os.environ["BIGNLP_DATA_DIR"] = tempfile.mkdtemp(prefix="bignlp_data_")
    atexit.register(shutil.rmtree, os.environ["BIGNLP_DATA_DIR"], True)

# One persistent XLA compilation cache per test session (subprocesses inherit it): many tests
# compile the same tiny programs, and on 2 CPU cores compiling dominates the suite's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bignlp_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that make any config a few-second CPU run in a fresh directory."""
    return [f"run.dir={tmp_path / 'run'}", "train.steps=4", "train.log_every=1"]


@pytest.fixture
def cli_env():
    """Environment for running `bignlp-jax` in a subprocess with 8 simulated devices."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def bignlp_cmd(*args: str) -> list[str]:
    """argv that runs the CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "bignlp_jax.cli", *args]


@pytest.fixture(scope="session")
def embedded_data_dir() -> Path:
    """$BIGNLP_DATA_DIR with the embedded corpora and the default 1024-piece tokenizer built."""
    from bignlp_jax.data.embedded import embedded_tokenizer

    data_dir = Path(os.environ["BIGNLP_DATA_DIR"])
    embedded_tokenizer(data_dir, 1024)
    return data_dir
