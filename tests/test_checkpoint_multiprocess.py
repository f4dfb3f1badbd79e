"""Checkpoints across processes: two processes (loopback jax.distributed, gloo collectives,
2 CPU devices each, parameters sharded over all 4 devices) save one checkpoint together when
only one of them is told to stop, restore it together, and then one process restores it alone
onto another mesh. Restores compile no train step: only the two-process training compiles.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_common
import jax
import numpy as np
import pytest
from checkpoint_common import (
    MESH,
    assert_trees_equal,
    config,
    finish_workers,
    free_port,
    launch_workers,
    logged_steps,
    subprocess_env,
    worker_log,
)
from compile_flags import xla_flags

from bignlp_jax.checkpoint import integrity, latest_step, load_params
from bignlp_jax.data import make_source
from bignlp_jax.errors import REQUEUE_EXIT_CODE
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.start import start_state

cache_env = checkpoint_common.cache_env  # the compile cache, on for this module
@pytest.mark.multiprocess
def test_two_processes_save_and_restore_then_one_process_restores(tmp_path, cache_env):
    run, dump = tmp_path / "run", tmp_path / "params.npz"

    # 1. Only process 1 gets SIGTERM; both stop after the same step, save it, restore it
    #    together onto their sharded mesh (full state and data position), and exit 75.
    procs = launch_workers(run, dump, cache_env, "train.steps=100000", "checkpoint.every_steps=0")
    deadline = time.monotonic() + 300
    while logged_steps(run) < 2:
        assert all(p.poll() is None for p in procs), (worker_log(run, 0)[-3000:]
                                                       + worker_log(run, 1)[-3000:])
        assert time.monotonic() < deadline, "the two-process run did not start training"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = finish_workers(procs)
    assert codes == [REQUEUE_EXIT_CODE] * 2, (worker_log(run, 0)[-3000:]
                                              + worker_log(run, 1)[-3000:])
    stopped = latest_step(run)
    for i in range(2):
        assert f"stopped after step {stopped} of 100000" in worker_log(run, i)
    data_files = sorted(p.name for p in (run / "checkpoints" / str(stopped) / "data").iterdir()
                        if p.suffix == ".json")
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # each process checksummed the files it wrote, process 0 the merged metadata
    state_dir = run / "checkpoints" / str(stopped) / "state"
    assert sorted(p.name for p in state_dir.glob("checksums.*.json")) == [
        "checksums.primary.json", "checksums.process_0.json", "checksums.process_1.json"]
    assert integrity.verify(state_dir.parent) is None
    # every process's data position and the metadata are in the primary's list
    listed = integrity.read_listing(state_dir).files
    assert {"../data/process_0-of-2.json", "../data/process_1-of-2.json",
            "../meta/metadata"} <= set(listed)

    two = np.load(dump)
    assert int(two["step"]) == stopped and json.loads(str(two["data"]))["step"] == stopped

    # 2. One process (8 devices, data-parallel mesh) restores the same checkpoint.
    cfg = config(run, "train.steps=100000")
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    one = start_state(cfg, trainer.layout, source, run)
    assert one.step == stopped and source.get_state()["step"] == stopped
    flat = jax.tree_util.tree_flatten_with_path(one.state.params)[0]
    assert len(flat) == len(two.files) - 2
    for path, x in flat:
        assert np.array_equal(np.asarray(x), two[jax.tree_util.keystr(path)])
    assert_trees_equal(load_params(run, cfg.model), one.state.params)


@pytest.mark.slow
def test_load_params_shares_the_verification_and_all_processes_agree(tmp_path, cli_env):
    """Two processes load params: each checksums about half of the files (the checkpoint is
    read once in all), and a flipped bit, wherever it is, stops both with the same message."""
    import shutil

    from test_export_hf import VARIANTS, random_params

    from bignlp_jax.checkpoint.manager import RunCheckpointer
    from bignlp_jax.config import CheckpointConfig

    model = VARIANTS["gpt"]
    good = tmp_path / "good"
    saver = RunCheckpointer(good, CheckpointConfig(async_save=False))
    saver.save(3, {"params": random_params(model)}, {}, {"step": 3})
    saver.close()
    listed = sorted(integrity.read_listing(good / "checkpoints" / "3" / "state").files)
    assert len(listed) >= 4
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    files = sorted((bad / "checkpoints" / "3" / "state").rglob("d/*"),
                   key=lambda p: p.stat().st_size)
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[-1].write_bytes(bytes(data))

    port = str(free_port())
    env = {**cli_env, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(1)}
    procs = [subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("load_params_worker.py")), port, str(i),
         model.model_dump_json(), str(good), str(bad)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    results = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
               for out in outs]
    (good0, bad0), (good1, bad1) = results
    # the good checkpoint: every listed file checked once, by one of the two processes
    assert good0["error"] is None and good1["error"] is None
    assert sorted(good0["checked"] + good1["checked"]) == listed
    assert good0["checked"] and good1["checked"]
    # the damaged one: both processes stop with the same message naming the file
    assert bad0["error"] == bad1["error"], outs
    assert f"is damaged: state/{files[-1].relative_to(bad / 'checkpoints' / '3' / 'state')}" \
        in bad0["error"] and "fails its checksum" in bad0["error"]


# Process FAIL of a CLI job: its share of the third save fails as on a full disk (its own disk
# only: the other process writes fine).
ONE_FAILS = """
import errno, sys
from bignlp_jax.checkpoint import checksum_writer
if sys.argv[1] == sys.argv[sys.argv.index("--process-id") + 1]:
    original, calls = checksum_writer.write_process_sums, []
    def failing(state_dir, process_index):
        calls.append(state_dir)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(state_dir))
        return original(state_dir, process_index)
    checksum_writer.write_process_sums = failing
from bignlp_jax.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_write_failure_on_one_process_stops_the_job_in_seconds(tmp_path, cache_env):
    """Without help, the failed process waits at Orbax's barrier for the others, who wait for
    its commit (a deadlock until Orbax's timeout). It reports the step, leaves, and the other
    names it within seconds; the earlier steps are intact and the rerun resumes exactly."""
    run = tmp_path / "run"
    env = {**subprocess_env(cache_env), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    from checkpoint_common import cli_overrides

    def job(fail: str) -> tuple[list[int], list[str], float]:
        port, started = str(free_port()), time.monotonic()
        procs = [subprocess.Popen(
            [sys.executable, "-c", ONE_FAILS, fail, "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), "train", "tiny",
             *cli_overrides(run, *MESH, "train.steps=4", "checkpoint.every_steps=1",
                            "checkpoint.keep=100")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        return [p.returncode for p in procs], outs, time.monotonic() - started

    codes, outs, took = job(fail="1")
    assert codes == [2, 2], outs
    # not Orbax's 300 s barrier timeout (start-up and compiling under load included)
    assert took < 240, f"{took:.0f} s"
    assert "bignlp-jax train: error: cannot save checkpoint step 3 in " in outs[1], outs[1]
    assert "no space left on the device (ENOSPC)" in outs[1]
    assert "bignlp-jax train: error: process 1 of 2 stopped: cannot save checkpoint step 3" \
        in outs[0] and "stopping process 0 too (exit 2)" in outs[0], outs[0]
    for out in outs:
        assert "Traceback" not in out and "Check failure" not in out, out
    from bignlp_jax.checkpoint import complete_steps

    assert complete_steps(run / "checkpoints") == [1, 2]
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    codes, outs, _ = job(fail="none")  # the same command, nothing failing: resumes from 2
    assert codes == [0, 0], outs
    assert re.search(r"resumed from checkpoint \S+/checkpoints/2; training steps 3\.\.4", outs[0])
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r for r in after}  # the resumed run's lines replace steps 3..4
    # How far process 0 trains before process 1's failed write of step 3 stops it is a race
    # (step 3, or 4 too). Guaranteed: steps 1 and 2 were logged (process 0 logs a step before
    # the next one, which needs process 1), in order, none twice.
    logged = [r["step"] for r in before]
    assert logged == list(range(1, len(logged) + 1)) and 2 <= len(logged) <= 4, logged
    assert sorted(again) == [1, 2, 3, 4]
    for old in before[2:]:  # steps the failed run computed after step 2: bitwise the same
        assert (old["loss"], old["grad_norm"]) == (again[old["step"]]["loss"],
                                                   again[old["step"]]["grad_norm"])
