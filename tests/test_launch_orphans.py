"""launch/local.py never leaves workers behind: they die with the launcher even when it is
SIGKILLed (parent-death signal), and a SIGHUP (closed terminal) reaches them as SIGTERM.

The workers are a stand-in executable (a Python script passed as --bignlp-jax) that records its
pid and the signals it gets, so no JAX start-up is paid."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, bignlp_cmd

LOCAL = str(REPO / "launch" / "local.py")

WORKER = """#!{python}
import os, signal, sys, time
from pathlib import Path
out = Path({out!r})
(out / f"pid.{{os.environ['BIGNLP_PROCESS_ID']}}").write_text(str(os.getpid()))
def on_term(signum, frame):
    (out / f"sig.{{os.environ['BIGNLP_PROCESS_ID']}}").write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, on_term)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def start(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "fake-bignlp-jax"
    script.write_text(WORKER.format(python=sys.executable, out=str(tmp_path)))
    script.chmod(0o755)
    launcher = subprocess.Popen(
        [sys.executable, LOCAL, "--processes", "2", "--bignlp-jax", str(script),
         "--coordination-service", "process0", "--", "train"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"pid.{i}").is_file() for i in range(2)):
        assert launcher.poll() is None and time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    time.sleep(0.2)  # the pid file is written first thing; let the handler install too
    return launcher, [int((tmp_path / f"pid.{i}").read_text()) for i in range(2)]


@pytest.mark.slow
def test_sigkill_of_the_launcher_leaves_no_worker(tmp_path):
    launcher, pids = start(tmp_path)
    try:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "workers outlived a SIGKILLed launcher"
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
def test_sighup_reaches_the_workers_as_sigterm(tmp_path):
    launcher, pids = start(tmp_path)
    try:
        launcher.send_signal(signal.SIGHUP)
        assert launcher.wait(timeout=30) == 75  # the workers' requeue code, passed on
        assert [(tmp_path / f"sig.{i}").read_text() for i in range(2)] == ["SIGTERM"] * 2
        assert not [p for p in pids if alive(p)]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


PEER = """
import os, sys, time
from jax._src import distributed as jax_distributed
from bignlp_jax.parallel.distributed import Layout, initialize
initialize(Layout("flags/env", 2, int(sys.argv[2]), "127.0.0.1:" + sys.argv[1],
                  service=sys.argv[4]), 120, "train", heartbeat_timeout=10)
import numpy as np
from jax.experimental import multihost_utils
from bignlp_jax.parallel.peer_watch import wait_for_lost_peer
if sys.argv[3] == "collective":
    multihost_utils.process_allgather(np.ones(1))  # gloo connected
# process 0: the pid of the helper that hosts the coordination service (None: external). One
# write: Gloo's threads print to the same file, and print() would write the parts apart
service = getattr(jax_distributed.global_state.service, "pid", None) or ""
sys.stdout.flush()
os.write(sys.stdout.fileno(), f"joined {service}\\n".encode())
if sys.argv[3] == "sleep":
    time.sleep(300)
try:  # in a collective when the peer dies, as a training step is; handled as the CLI does
    while True:
        multihost_utils.process_allgather(np.ones(1))
except Exception as e:
    if not wait_for_lost_peer(e):
        raise
    sys.exit(3)  # the watchdog gave no verdict
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("lost, doing, service", [(1, "sleep", "process0"),
                                                  (0, "collective", "process0"),
                                                  (0, "collective", "external")])
def test_a_vanished_peer_gives_one_message_not_a_cxx_abort(tmp_path, cli_env, lost, doing,
                                                           service):
    """Two processes joined by jax.distributed; one is SIGKILLed (no launcher around). The
    other names it and exits 1 well inside the heartbeat timeout, without JAX's abort, also
    when the lost one is process 0 (the coordination service lives in a helper process, which
    then ends within the heartbeat timeout), and when the survivor was in a collective with
    it (gloo fails at once; the watchdog still names the lost process). `external`: the service
    runs as `bignlp-jax coordinator` (a JobSet's coordinator pod, the launcher's helper), and
    process 0 is killed with its whole process group, as when its host goes down."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**cli_env, "JAX_PLATFORMS": "cpu"}
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    coordinator = None
    if service == "external":
        coordinator = subprocess.Popen(
            [*bignlp_cmd(), "coordinator", "--bind", "127.0.0.1", "--port", port,
             "--processes", "2",
             "--heartbeat-timeout", "10"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        assert "listening on 127.0.0.1:" + port in coordinator.stdout.readline()
    procs = [subprocess.Popen([sys.executable, "-c", PEER, port, str(i), doing, service],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT,
                              start_new_session=True) for i in range(2)]
    survivor = 1 - lost
    helper = None
    try:
        deadline = time.monotonic() + 180
        # the marker is written whole, but a line of Gloo's may be cut around it
        joined = re.compile(r"joined (\d*)\n")
        while not all(joined.search((tmp_path / f"p{i}.log").read_text()) for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.1)
        pid = joined.search((tmp_path / "p0.log").read_text()).group(1)
        helper = int(pid) if pid else None
        assert (helper is None) == (service == "external")  # process 0 started no helper
        started = time.monotonic()
        os.killpg(procs[lost].pid, signal.SIGKILL)  # the process and all it started
        code = procs[survivor].wait(timeout=30)
        took = time.monotonic() - started
        out = (tmp_path / f"p{survivor}.log").read_text()
        assert code == 1, out
        # noticed within the 10 s heartbeat timeout; then leaving, which on a loaded machine
        # takes a few seconds more (a missed heartbeat check would hang past the 30 s wait)
        assert took < 20, f"{took:.1f} s"
        who = ("process 1 of 2" if lost == 1 else "process 0 of 2 (the coordinator)"
               if service == "process0" else "process 0 of 2")
        assert f"bignlp-jax train: error: lost {who}: no sign of life" in out, out
        assert "Check failure" not in out and "Terminating process" not in out
        assert "Traceback" not in out, out
        if doing == "collective":
            assert "a collective failed because a peer process went away" in out, out
        if helper is not None:  # the helper outlives process 0 by the heartbeat timeout, no more
            while alive(helper) and time.monotonic() - started < 20:
                time.sleep(0.1)
            assert not alive(helper), "the coordination service helper was left behind"
        if coordinator is not None:  # the pod's service outlived the loss; SIGTERM ends it
            assert coordinator.poll() is None
            coordinator.terminate()
            assert coordinator.wait(timeout=15) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if helper is not None and alive(helper):
            os.kill(helper, signal.SIGKILL)
        if coordinator is not None and coordinator.poll() is None:
            coordinator.kill()
        for f in logs:
            f.close()


FAILING = """#!{python}
import os, signal, sys, time
if os.environ["BIGNLP_PROCESS_ID"] == "1":
    time.sleep(0.5)
    {how}
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
time.sleep(600)
"""


@pytest.mark.parametrize("how, line, code", [
    ("os.kill(os.getpid(), signal.SIGKILL)", "was killed by signal 9 (SIGKILL)", 137),
    ("sys.exit(3)", "exited with code 3", 3),
])
def test_the_launcher_names_the_failed_process_and_how_it_ended(tmp_path, how, line, code):
    """One line names the process, its pid and its exit code or signal; the survivor is
    stopped and the launcher exits with the failed process's code (128 + signal)."""
    script = tmp_path / "fake-bignlp-jax"
    script.write_text(FAILING.format(python=sys.executable, how=how))
    script.chmod(0o755)
    done = subprocess.run(
        [sys.executable, LOCAL, "--processes", "2", "--bignlp-jax", str(script),
         "--coordination-service", "process0", "--", "train"],
        capture_output=True, text=True, timeout=60)
    pid = re.search(r"local\.py: process 1 \(pid (\d+)\): ", done.stdout).group(1)
    assert done.returncode == code, done.stdout
    assert (f"local.py: process 1 (pid {pid}) {line}; stopping the other 1 process(es); "
            f"job exit code {code}") in done.stdout.splitlines(), done.stdout
