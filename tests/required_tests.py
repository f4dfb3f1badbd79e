"""Tests that CI must run: a skip of one of them fails the run instead of passing quietly.

A test marked `@pytest.mark.required` (or using one of REQUIRED_FIXTURES: the storage
emulators, the local SLURM cluster, tmpfs mounts as root) may skip on a developer's machine that
lacks the thing it needs, but under `--require-all` (set by .ci/run, and implied by `CI=true`
as CI services set it) its skip is reported as a failure naming the test and the skip reason.
Golden modules that need an optional package at import time use `required_import`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# fixtures whose skip means "the environment CI promises is missing"
REQUIRED_FIXTURES = frozenset({
    "gcs_emulator", "s3_emulator", "s3_auth_emulator", "gcs_bucket", "s3_bucket",
    "slurm_cluster", "mounted",
})
OPTION = "--require-all"

# set from the command line / environment by conftest.pytest_configure
strict = os.environ.get("CI", "").lower() == "true"


def configure(config: pytest.Config) -> None:
    global strict
    strict = bool(config.getoption("require_all")) or strict


def is_required(item: pytest.Item) -> bool:
    return (item.get_closest_marker("required") is not None
            or not REQUIRED_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())))


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def failed_skip_message(nodeid: str, reason: str) -> str:
    return (f"REQUIRED TEST SKIPPED ({OPTION}): {nodeid}: {reason}. CI must run it: install "
            "the test extra (pip install -e '.[test]') and run as root where it needs root")


def required_import(name: str) -> ModuleType:
    """`pytest.importorskip(name)`, except that under --require-all / CI=true a missing module
    fails the collection with one line instead of skipping the module's golden tests."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = f"cannot import {name}: {e}"
        if strict:
            pytest.fail(failed_skip_message(f"module needing {name}", reason), pytrace=False)
        pytest.skip(reason, allow_module_level=True)
        raise  # unreachable: pytest.skip raises
