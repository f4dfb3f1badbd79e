"""A test CI must run (marked `required`, or using an emulator / SLURM / tmpfs fixture) that skips
fails the run under --require-all or CI=true, naming the test and the reason; elsewhere it
skips. Checked by running pytest with this suite's conftest on a two-test probe file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

PROBE = '''
import pytest

@pytest.mark.required
def test_needs_the_emulator():
    pytest.skip("the GCS emulator did not start")

def test_optional():
    pytest.skip("nice to have")

@pytest.fixture
def slurm_cluster():
    pytest.skip("no root")

def test_on_slurm(slurm_cluster):
    pass
'''


def _run(tmp_path, *args: str, ci: str | None = None) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "compile_flags.py", "required_tests.py"):
        shutil.copy(REPO / "tests" / name, tmp_path / name)
    (tmp_path / "test_probe.py").write_text(PROBE, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    required: CI must run it\n    slow: slow\n"
        "    multiprocess: mp\n    slurm: slurm\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfs", "-q", *args,
         str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_required_skip_fails_under_require_all(tmp_path):
    done = _run(tmp_path, "--require-all")
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 skipped, 1 error" in done.stdout, done.stdout  # the error: in set-up
    assert ("REQUIRED TEST SKIPPED (--require-all): test_probe.py::test_needs_the_emulator: "
            "the GCS emulator did not start") in done.stdout
    assert "test_probe.py::test_on_slurm: no root" in done.stdout


def test_ci_true_implies_it_and_elsewhere_it_skips(tmp_path):
    assert _run(tmp_path, ci="true").returncode == 1
    done = _run(tmp_path)
    assert done.returncode == 0 and "3 skipped" in done.stdout, done.stdout
