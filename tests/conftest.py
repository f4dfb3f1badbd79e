"""Test set-up: 8 simulated CPU devices, configured before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

from compile_flags import xla_flags

# LLVM optimisations off, 8 simulated devices (compile_flags.py says why)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Embedded corpora and default tokenizers are built once per test session into a fresh cache
# dir (subprocesses inherit it), so tests neither depend on nor write to the user's ~/.cache.
# XDG_CACHE_HOME moves the default data.data_dir (the freedesktop cache convention, not a
# bignlp_jax setting); nothing in the product reads a test-only variable.
_cache = tempfile.mkdtemp(prefix="bignlp_cache_")
os.environ["XDG_CACHE_HOME"] = _cache
atexit.register(shutil.rmtree, _cache, True)

# One persistent XLA compilation cache (subprocesses inherit it), kept between runs in
# .pytest_cache/d/xla: many tests compile the same tiny programs, and on 2 CPU cores compiling
# dominates the suite's time; a second run of the fast tier takes about half as long as the
# first. `pytest --cache-clear` empties it; JAX_COMPILATION_CACHE_DIR, when set, is used instead.
# Entries are keyed by the program, the jax/jaxlib version and the XLA flags, so a stale one is
# never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".pytest_cache", "d", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import required_tests as required  # noqa: E402

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
    """The default data dir (in this session's cache) with the embedded corpora and the
    default 1024-piece tokenizer built."""
    from bignlp_jax.data.corpora.embedded import embedded_tokenizer
    from bignlp_jax.data.tfds.source import default_data_dir

    data_dir = default_data_dir()
    embedded_tokenizer(data_dir, 1024)
    return data_dir


def pytest_addoption(parser):
    parser.addoption(required.OPTION, action="store_true", dest="require_all",
                     help="a test marked `required` (emulators, SLURM, tmpfs as root, golden "
                          "transformers/peft) that skips fails the run (CI=true implies it)")


def pytest_configure(config):
    required.configure(config)


def pytest_collection_modifyitems(items):
    """Multi-process and SLURM tests start processes too: the fast tier (`-m "not slow"`)
    leaves them out with the other slow ones. Tests using a required fixture are marked
    `required` (tests/required_tests.py)."""
    for item in items:
        if item.get_closest_marker("multiprocess") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
        if required.is_required(item):
            item.add_marker(pytest.mark.required)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under --require-all a skip of a required test (in set-up or in the test) is a failure
    whose one line names the test and the reason it skipped."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and required.strict and required.is_required(item) \
            and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = required.failed_skip_message(item.nodeid, required.skip_reason(report))
