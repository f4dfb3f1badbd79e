"""launch/local.py: several local processes joined by jax.distributed train exactly like one
process with the same devices, and one failed process fails the whole job quickly."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from checkpoint_common import losses
from conftest import REPO

sys.path.insert(0, str(REPO))  # launch/ is not an installed package
from launch.children import GlooNotes  # noqa: E402

pytestmark = pytest.mark.multiprocess

LOCAL = str(REPO / "launch" / "local.py")


def test_two_processes_match_one_process(tmp_path, cli_env):
    from bignlp_jax.config import load_config

    overrides = ["train.steps=4", "train.log_every=1", "train.eval_every=0", "mesh.data=-1",
                 "data.source=synthetic"]
    proc = subprocess.run(
        [sys.executable, LOCAL, "--processes", "2", "--devices-per-process", "2", "--",
         "train", "tiny", f"run.dir={tmp_path / 'multi'}", *overrides],
        env=cli_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    # process 0's lines are labelled, and the processes really were joined (process 1 says
    # nothing: its only lines were Gloo's connection notes, now cut)
    assert "[p0] " in proc.stdout and "local.py: process 1 (pid" in proc.stdout
    assert "joined process 0 of 2" in proc.stdout and "4 devices in all" in proc.stdout
    assert "done: step 4 of 4" in proc.stdout
    assert "[Gloo]" not in proc.stdout  # Gloo's connection notes are cut
    assert not (tmp_path / "multi" / "metrics.jsonl.p1").exists()

    import jax

    from bignlp_jax.train.loop import train

    cfg = load_config("tiny", [f"run.dir={tmp_path / 'single'}", *overrides])
    train(cfg, devices=jax.devices()[:4])  # the same 4 devices, one process

    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                               [single[s] for s in sorted(single)], rtol=2e-5)


def test_gloo_connection_notes_are_cut_unless_a_peer_is_missing():
    note = (b"[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer "
            b"ranks is : 3")
    short = note.replace(b"connected to 3", b"connected to 2")
    bar = b"  0%|          | 0/2 [00:00<?, ?step/s]"
    cut = GlooNotes()
    assert cut(note + b"\n") is None
    assert cut(short + b"\n") == short + b"\n"
    assert cut(bar + note + b"\n") == bar + b"\n"
    assert cut(note + b" and more\n") == note + b" and more\n"
    # two threads' notes interleaved (as seen from a 2-process run): the second one's count
    # and newline come on the next line, which goes too; a later line of digits stays
    mixed = (b"[Gloo] Rank 1[Gloo] Rank  is connected to 03 is connected to  peer ranks. "
             b"3Expected number of connected peer ranks is :  peer ranks. 3Expected number "
             b"of connected peer ranks is : \n")
    cut = GlooNotes()
    assert [cut(line) for line in (bar + mixed, b"3\n", b"done\n", b"3\n")] == [
        bar + b"\n", None, b"done\n", b"3\n"]


@pytest.mark.slow
def test_two_level_mesh_over_two_processes_matches_one_process(tmp_path, cli_env):
    """mesh.dcn_data=2: each process is one DCN granule holding half of the data axis (the
    tensor axis stays inside a process); trains like one process with the same 4 devices."""
    from bignlp_jax.config import load_config

    overrides = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "mesh.data=2",
                 "mesh.tensor=2", "data.source=synthetic"]
    proc = subprocess.run(
        [sys.executable, LOCAL, "--processes", "2", "--devices-per-process", "2", "--",
         "train", "tiny", f"run.dir={tmp_path / 'multi'}", *overrides, "mesh.dcn_data=2"],
        env=cli_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "mesh data=2 (2 over DCN) x fsdp=1 x sequence=1 x tensor=2" in proc.stdout

    import jax

    from bignlp_jax.train.loop import train

    cfg = load_config("tiny", [f"run.dir={tmp_path / 'single'}", *overrides])
    train(cfg, devices=jax.devices()[:4])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                               [single[s] for s in sorted(single)], rtol=2e-5)


@pytest.mark.parametrize("lost", [1, 0])
def test_one_failed_process_stops_the_job(tmp_path, cli_env, lost):
    """Either worker, process 0 included (the launcher hosts the coordination service), is
    named by the launcher, the other is stopped, and nobody ends in JAX's C++ abort."""
    launcher = subprocess.Popen(
        [sys.executable, LOCAL, "--processes", "2", "--devices-per-process", "1", "--grace", "2",
         "--", "train", "tiny", f"run.dir={tmp_path / 'run'}", "train.steps=100000",
         "train.log_every=1", "train.eval_every=0", "data.source=synthetic"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(launcher.stdout), daemon=True)
    reader.start()
    try:
        # once the two processes have joined (the job is under way: state init, compilation),
        # kill one of them; waiting for training steps would only add compile time
        for _ in range(6000):  # up to ~10 min on a busy machine
            if "joined process 0 of 2" in "".join(output) or launcher.poll() is not None:
                break
            time.sleep(0.1)
        assert launcher.poll() is None, "".join(output)[-3000:]
        pids = dict(re.findall(r"local\.py: process (\d) \(pid (\d+)\)", "".join(output)))
        os.kill(int(pids[str(lost)]), signal.SIGKILL)
        code = launcher.wait(timeout=120)  # the survivor must not keep the job alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=10)
    text = "".join(output)
    assert code == 128 + signal.SIGKILL, text[-3000:]
    assert "local.py: coordination service (pid" in text, text[-3000:]
    assert "Check failure" not in text and "Terminating process" not in text, text[-3000:]
    assert re.search(rf"local\.py: process {lost} \(pid \d+\) was killed by signal 9 \(SIGKILL\); "
                     r"stopping the other 1 process\(es\); job exit code 137", text), text[-3000:]
