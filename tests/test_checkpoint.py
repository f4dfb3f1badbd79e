"""Checkpoints: exact resume, atomic saves under SIGKILL, SIGTERM/max_time requeue, corrupt or
mismatched checkpoints, restore onto other meshes, init_from, keep policy, NaN stop.

A 12-step reference run (checkpoints every 4 steps, 8 devices) is trained once per module; the
other runs are compared with it. Signals need a real process, so those tests run the CLI.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import checkpoint_common
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_common import (
    assert_trees_equal,
    config,
    host_params,
    logged_steps,
    losses,
    subprocess_env,
)
from conftest import bignlp_cmd

from bignlp_jax.checkpoint import is_complete, latest_step, load_params, load_run_config
from bignlp_jax.checkpoint.manager import RunCheckpointer, read_meta
from bignlp_jax.config import CheckpointConfig
from bignlp_jax.errors import REQUEUE_EXIT_CODE, Preempted, UserError
from bignlp_jax.train.loop import NonFiniteLoss, train

cache_env = checkpoint_common.cache_env  # the compile cache, on for this module


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_env):
    """12 uninterrupted steps: (run_dir, losses by step, final params on the host)."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = config(run_dir, "train.steps=12")
    train(cfg)
    return run_dir, losses(run_dir), host_params(run_dir, cfg.model)


@pytest.mark.slow
def test_resume_is_bitwise_exact(reference, tmp_path):
    ref_dir, ref_losses, ref_params = reference
    assert latest_step(ref_dir) == 12 and is_complete(ref_dir, config(ref_dir, "train.steps=12"))
    run = tmp_path / "run"
    train(config(run, "train.steps=8"))
    assert latest_step(run) == 8 and not is_complete(run, config(run, "train.steps=12"))
    train(config(run, "train.steps=12"))
    resumed = losses(run)
    assert [resumed[s] for s in range(9, 13)] == [ref_losses[s] for s in range(9, 13)]
    assert_trees_equal(host_params(run, config(run).model), ref_params)
    # the step directory carries the config, the tokenizer reference and the data position
    meta = read_meta(run / "checkpoints" / "12")
    assert meta["step"] == 12 and meta["config"]["train"]["steps"] == 12
    assert "tokenizer" in meta and meta["mesh"]["data"] == 8
    assert load_run_config(run).train.steps == 12
    assert (run / "checkpoints" / "12" / "data" / "process_0-of-1.json").is_file()


@pytest.mark.slow
def test_max_time_stops_with_checkpoint_and_resumes_exactly(reference, tmp_path):
    _, ref_losses, ref_params = reference
    run = tmp_path / "run"
    with pytest.raises(Preempted, match="stopped after step 1 of 12") as stopped:
        train(config(run, "train.steps=12", "train.max_time=1e-6"))
    assert stopped.value.exit_code == REQUEUE_EXIT_CODE
    assert latest_step(run) == 1
    train(config(run, "train.steps=12"))
    assert losses(run) == ref_losses
    assert_trees_equal(host_params(run, config(run).model), ref_params)


def test_corrupt_latest_checkpoint_is_named_and_never_restarts(reference, tmp_path):
    ref_dir, ref_losses, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    data_files = sorted((run / "checkpoints" / "12" / "state").rglob("d/*"),
                        key=lambda p: p.stat().st_size)
    with open(data_files[-1], "r+b") as f:  # truncate the biggest array file
        f.truncate(data_files[-1].stat().st_size // 2)
    with pytest.raises(UserError) as err:
        train(config(run, "train.steps=16"))
    message = str(err.value)
    assert "checkpoint step 12" in message and "checkpoint.resume_from=8" in message
    assert losses(run) == ref_losses  # nothing was trained, nothing restarted from 0
    # the offered fix works: resume from 8, the broken step is set aside (not deleted)
    train(config(run, "train.steps=12", "checkpoint.resume_from=8"))
    (aside,) = (run / "checkpoints_abandoned").glob("8.*")  # its own folder: step 8, a time
    assert [p.name for p in aside.iterdir()] == ["12"]
    assert losses(run) == ref_losses
    # a requeued job with the same command continues from its own newer checkpoint
    train(config(run, "train.steps=13", "checkpoint.resume_from=8"))
    assert latest_step(run) == 13 and sorted(losses(run)) == list(range(1, 14))


def test_wrong_model_shape_names_parameter_and_shapes(reference, tmp_path):
    ref_dir, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    with pytest.raises(UserError) as err:  # allowed: the checkpoint itself must refuse
        train(config(run, "train.steps=16", "model.hidden=32"), allow_config_change=True)
    message = str(err.value)
    assert "checkpoint step 12" in message
    assert "params/embed/embedding: checkpoint has shape (256, 64)" in message
    assert "expects (256, 32)" in message
    assert load_run_config(run).model.hidden == 64  # the refused config was not recorded
    with pytest.raises(UserError, match=r"embed/embedding: checkpoint has shape \(256, 64\), "
                                        r"the config expects \(512, 64\)"):
        load_params(ref_dir, config(run, "model.vocab_size=512").model)


def test_init_from_loads_params_only(reference, tmp_path):
    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    ref_dir, _, ref_params = reference
    cfg = config(tmp_path / "finetune", f"init_from={ref_dir}", "train.steps=12")
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, tmp_path / "finetune")
    assert start.step == 0 and int(start.state.step) == 0
    assert_trees_equal(start.state.params, ref_params)
    moments = [x for path, x in jax.tree_util.tree_flatten_with_path(start.state.opt_state)[0]
               if any(getattr(k, "name", None) in ("mu", "nu") for k in path)]
    assert moments and all(not np.asarray(x).any() for x in moments)  # a fresh optimizer



def test_checkpoint_with_the_old_rng_leaf_still_resumes(reference, tmp_path):
    """Earlier versions saved an unused `rng` in the train state; those runs resume."""
    from bignlp_jax.checkpoint.manager import step_meta
    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    ref_dir, _, ref_params = reference
    cfg = config(tmp_path / "old", "train.steps=12")
    trainer = Trainer.build(cfg)
    state = trainer.layout.fresh()
    old = {"step": state.step, "params": load_params(ref_dir, cfg.model, trainer.state_sh.params),
           "opt_state": state.opt_state, "rng": jnp.zeros((2,), jnp.uint32)}
    source = make_source(cfg, "train", trainer.rows)
    checkpointer = RunCheckpointer(tmp_path / "old", cfg.checkpoint)
    checkpointer.save(4, old, source.get_state(), step_meta(cfg, trainer.mesh, 4))
    checkpointer.close()
    start = start_state(cfg, trainer.layout, source, tmp_path / "old")
    assert start.origin.startswith("resumed") and not hasattr(start.state, "rng")
    assert_trees_equal(start.state.params, ref_params)

def test_init_from_a_relative_path(reference, tmp_path, monkeypatch):
    """Pipelines and users name run dirs relative to the working directory (Orbax itself
    refuses relative paths)."""
    ref_dir, _, ref_params = reference
    shutil.copytree(ref_dir, tmp_path / "runs" / "pretrain")
    monkeypatch.chdir(tmp_path)
    model_cfg = config(tmp_path / "x").model
    assert_trees_equal(load_params("runs/pretrain", model_cfg), ref_params)


def test_init_from_hugging_face_dir(reference, tmp_path):
    from bignlp_jax.data import make_source
    from bignlp_jax.hf.weights import export_hf
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    ref_dir, _, ref_params = reference
    model_cfg = config(ref_dir).model
    export_hf(load_params(ref_dir, model_cfg), model_cfg, tmp_path / "hf", dtype="float32")
    cfg = config(tmp_path / "finetune", f"init_from=hf:{tmp_path / 'hf'}")
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, tmp_path / "finetune")
    assert start.step == 0 and "hf:" in start.origin
    assert_trees_equal(start.state.params, ref_params)


@pytest.mark.slow  # trains and restores on three more meshes (~15 s): whole-run tier
@pytest.mark.parametrize("mesh", [["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"], "1 device",
                                  ["mesh.data=2", "mesh.sequence=4"]])
def test_restore_onto_other_mesh(reference, tmp_path, mesh):
    ref_dir, ref_losses, ref_params = reference
    devices = [jax.devices()[0]] if mesh == "1 device" else None
    extra = [] if devices else mesh
    cfg = config(tmp_path / "run", *extra, "train.steps=12",
                 f"checkpoint.resume_from={ref_dir / 'checkpoints' / '8'}")
    train(cfg, devices=devices)
    resumed = losses(tmp_path / "run")
    assert sorted(resumed) == [9, 10, 11, 12]
    np.testing.assert_allclose([resumed[s] for s in range(9, 13)],
                               [ref_losses[s] for s in range(9, 13)], rtol=2e-5)
    # Adam turns tiny float32 differences in near-zero gradients into lr-sized steps, so the
    # parameters after 4 more steps agree only to about the learning rate
    final = host_params(tmp_path / "run", cfg.model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), final, ref_params)
    # the arrays read onto the new layout are exactly the saved ones
    saved8 = load_params(ref_dir, cfg.model, step=8)
    from bignlp_jax.train.loop import Trainer

    shardings = Trainer.build(cfg, devices).state_sh.params
    assert_trees_equal(load_params(ref_dir, cfg.model, shardings, step=8), saved8)


def test_nan_stops_without_saving_the_bad_state(reference, tmp_path, monkeypatch):
    from bignlp_jax.data.corpora.synthetic import SyntheticSource

    original = SyntheticSource.__next__

    def poisoned(self):
        batch = original(self)
        if self.step == 4:  # the 4th batch: a save step that is not a log step
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch

    monkeypatch.setattr(SyntheticSource, "__next__", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        train(config(run, "train.steps=12", "checkpoint.every_steps=2", "train.log_every=5"))
    assert latest_step(run) == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]


def test_keep_policy_keeps_latest_and_every_n(tmp_path):
    ckpt = RunCheckpointer(tmp_path, CheckpointConfig(keep=2, keep_every=4))
    state = {"w": jnp.arange(6.0)}
    for step in range(1, 11):
        ckpt.save(step, state, {"step": step}, {"step": step})
    ckpt.close()
    assert latest_step(tmp_path) == 10
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8, 9, 10]


def test_restore_that_does_not_fit_says_why(tmp_path):
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import check_fits
    from bignlp_jax.train.state import abstract_state

    trainer = Trainer.build(config(tmp_path, "mesh.data=1", "mesh.fsdp=8"))
    target = abstract_state(trainer.cfg.model, trainer.tx, trainer.state_sh)
    check_fits(target, "restoring step 8", limit=2**30)
    with pytest.raises(UserError, match=r"(?s)restoring step 8 does not fit: the train state "
                                        r"needs [\d.]+ KiB per device.* has 97.66 KiB.*"
                                        r"raise mesh.fsdp"):
        check_fits(target, "restoring step 8", limit=100_000)


def test_grain_iterator_state_round_trips_through_checkpoint(tmp_path, embedded_data_dir):
    from bignlp_jax.checkpoint.manager import restore_data_state
    from bignlp_jax.data import make_source

    cfg = config(tmp_path, "data.source=tfds", "data.tfds_name=stdlib_docs",
                 "model.vocab_size=1024", "data.seq_len=64", "data.worker_threads=1")
    source = make_source(cfg, "train", (0, cfg.train.global_batch_size))
    for _ in range(3):
        next(source)
    ckpt = RunCheckpointer(tmp_path, cfg.checkpoint)
    ckpt.save(3, {"w": jnp.zeros(3)}, source.get_state(), {"step": 3})
    ckpt.close()
    expected = [next(source) for _ in range(2)]
    resumed = make_source(cfg, "train", (0, cfg.train.global_batch_size))
    resumed.set_state(restore_data_state(tmp_path / "checkpoints" / "3"))
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _run_cli(run_dir, cache_env, *extra):
    return subprocess.Popen(
        bignlp_cmd("train", "tiny", *config_overrides(run_dir, *extra)),
        env=subprocess_env(cache_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def config_overrides(run_dir, *extra):
    from checkpoint_common import cli_overrides

    return cli_overrides(run_dir, *extra)


def _wait_for(predicate, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out = proc.stdout.read()
            raise AssertionError(f"training exited early (rc {proc.returncode}):\n{out[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the training subprocess"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_last_complete(reference, tmp_path, cache_env):
    _, _, ref_params = reference
    run = tmp_path / "run"
    # a checkpoint every step: the kill lands during (or between) asynchronous saves
    proc = _run_cli(run, cache_env, "train.steps=12", "checkpoint.every_steps=1")
    _wait_for(lambda: (latest_step(run) or 0) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = latest_step(run)
    assert proc.returncode == -signal.SIGKILL and killed_at < 12
    train(config(run, "train.steps=12", "checkpoint.every_steps=1"))
    assert_trees_equal(host_params(run, config(run).model), ref_params)
    assert sorted(losses(run)) == list(range(1, 13))  # one trajectory, no duplicate steps


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_requeue(tmp_path, cache_env):
    run = tmp_path / "run"
    proc = _run_cli(run, cache_env, "train.steps=100000", "checkpoint.every_steps=0")
    _wait_for(lambda: logged_steps(run) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    stopped = latest_step(run)
    assert stopped is not None and f"stopped after step {stopped} of 100000" in out
    assert max(losses(run)) == stopped  # the checkpoint is the last step trained
    assert [p.name for p in (run / "checkpoints").iterdir()] == [str(stopped)]


# --- faults: damaged files, full and read-only disks, resume_from to a broken step ----------

def _flip_bit(step_dir, position=None):
    """Flip one bit in the middle of the step's biggest array file; returns its path."""
    files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    target = files[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2 if position is None else position] ^= 0x10
    target.write_bytes(bytes(data))
    return target


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_flipped_bit_is_named_and_previous_step_resumes_bitwise(reference, tmp_path):
    ref_dir, ref_losses, ref_params = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    damaged = _flip_bit(run / "checkpoints" / "12")
    with pytest.raises(UserError) as err:
        train(config(run, "train.steps=16"))
    message = str(err.value)
    assert err.value.exit_code == 2
    assert "checkpoint step 12" in message and damaged.name in message
    assert "fails its checksum" in message and "checkpoint.resume_from=8" in message
    # the offered fix: resume from 8 gives exactly the uninterrupted run
    train(config(run, "train.steps=12", "checkpoint.resume_from=8"))
    (aside,) = (run / "checkpoints_abandoned").glob("8.*")  # its own folder: step 8, a time
    assert [p.name for p in aside.iterdir()] == ["12"]
    assert losses(run) == ref_losses
    assert_trees_equal(host_params(run, config(run).model), ref_params)
    # params-only readers (export, eval, init_from) refuse the damaged step too
    with pytest.raises(UserError, match=f"is damaged: .*{damaged.name}"):
        load_params(aside / "12", config(run).model)


def test_resume_from_a_broken_step_moves_nothing(reference, tmp_path):
    ref_dir, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    _flip_bit(run / "checkpoints" / "8")
    before = _tree(run)
    with pytest.raises(UserError, match=r"(?s)checkpoint step 8 .*fails its checksum.*"
                                        r"checkpoint.resume_from=4"):
        train(config(run, "train.steps=12", "checkpoint.resume_from=8"))
    assert _tree(run) == before  # nothing set aside, no marker written
    assert latest_step(run) == 12


@pytest.mark.slow
def test_resume_from_three_times_then_a_fourth(reference, tmp_path):
    """Each resume sets its abandoned steps aside in a folder of its own (no nesting, no
    collision, even twice from one step within a second), and the directory stays usable."""
    ref_dir, ref_losses, ref_params = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    aside = run / "checkpoints_abandoned"
    seen: set = set()
    for step, moved in ((8, ["12"]), (4, ["12", "8"]), (8, ["12"])):
        train(config(run, "train.steps=12", f"checkpoint.resume_from={step}"))
        assert latest_step(run) == 12
        (newest,) = set(aside.iterdir()) - seen  # one new folder per resume
        seen.add(newest)
        assert newest.name.startswith(f"{step}.") and sorted(
            p.name for p in newest.iterdir()) == sorted(moved)
    assert len(list(aside.iterdir())) == 3  # three trajectories, three folders
    assert sorted(str(p.relative_to(aside)).split("/", 1)[1] for p in aside.glob("*/*")) == [
        "12", "12", "12", "8"]
    train(config(run, "train.steps=12", "checkpoint.resume_from=4"))  # the fourth
    assert len(list(aside.iterdir())) == 4 and losses(run) == ref_losses
    assert_trees_equal(host_params(run, config(run).model), ref_params)


def test_a_set_aside_failing_part_way_moves_everything_back(tmp_path, monkeypatch):
    from bignlp_jax import storage
    from bignlp_jax.rundir import RunDir
    from bignlp_jax.train import resume_from

    run = RunDir(tmp_path / "run")
    for step in (4, 8, 12, 16):
        (run.checkpoints / str(step) / "state").mkdir(parents=True)
        (run.checkpoints / str(step) / "state" / "x").write_text(str(step))
    before = _tree(run.path)
    real_move, calls = storage.move, []

    def failing_move(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the second step: a full disk, a permission change...
            raise OSError(28, "No space left on device")
        real_move(src, dst)

    monkeypatch.setattr(storage, "move", failing_move)
    plan = resume_from.plan_set_aside(run, 4, now=0.0)
    assert plan.folder == run.abandoned / "4.19700101T000000Z"
    with pytest.raises(UserError, match=r"could not set the steps after 4 aside.*No space "
                                        r"left.*moved back"):
        resume_from.carry_out(plan)
    assert _tree(run.path) == before  # step 8 moved back, no folder left
    monkeypatch.setattr(storage, "move", real_move)
    resume_from.carry_out(plan)
    again = resume_from.plan_set_aside(run, 4, now=0.0)  # same second: a folder of its own
    assert again.folder.name == "4.19700101T000000Z.2" and again.moves == ()
    assert sorted(p.name for p in plan.folder.iterdir()) == ["12", "16", "8"]


def test_a_rerun_after_an_attempt_without_a_checkpoint_keeps_its_metrics(tmp_path, capsys):
    """Two Ctrl-Cs before the first checkpoint, then a rerun: a new trajectory, and the
    earlier attempt's metrics and events are moved aside (and the move is announced), never
    truncated."""
    import json

    from bignlp_jax.config import save_config

    run = tmp_path / "run"
    save_config(config(run, "train.steps=2"), run / "config.yaml")  # what the attempt wrote
    earlier = "".join(json.dumps({"step": s, "time": 0.0, "loss": 5.5}) + "\n"
                      for s in range(1, 21))
    (run / "metrics.jsonl").write_text(earlier)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_bytes(b"\x00events")
    train(config(run, "train.steps=2"))
    (kept,) = (run / "earlier_attempts").iterdir()
    assert (kept / "metrics.jsonl").read_text() == earlier  # every byte, not cut to one line
    assert (kept / "tensorboard" / "events.out").read_bytes() == b"\x00events"
    assert sorted(losses(run)) == [1, 2] and 5.5 not in losses(run).values()
    assert f"20 logged line(s) of an earlier attempt without a checkpoint; kept in {kept}" in (
        capsys.readouterr().out)


@pytest.mark.parametrize("extra, problem", [
    (["train.global_batch_size=12"], "cannot be split over the 8 data-parallel devices"),
    (["mesh.data=3"], "mesh"),
    (["model.hidden=32", "init_from=REF"], "expects \\(256, 32\\)"),
])
def test_a_start_that_fails_its_checks_leaves_the_run_dir_as_it_was(reference, tmp_path, extra,
                                                                    problem):
    ref_dir, _, _ = reference
    user = tmp_path / "user"  # a run dir that holds the user's files (an earlier attempt)
    user.mkdir()
    (user / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (user / "notes.txt").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    extra = [e.replace("REF", str(ref_dir)) for e in extra]
    # (init_from is refused after the ~10 s state set-up: one dir is enough to show it)
    for run in (tmp_path / "new" / "run", user)[:1 if "init_from" in extra[-1] else 2]:
        with pytest.raises(UserError, match=problem):
            train(config(run, "train.steps=2", *extra))
    assert not (tmp_path / "new").exists()  # not even the parent was left behind
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before
    assert sorted(user.iterdir()) == [user / "metrics.jsonl", user / "notes.txt"]


def test_a_refused_tfds_start_makes_no_tokenizer_folder(tmp_path, embedded_data_dir):
    run = tmp_path / "run"
    cfg = config(run, "data.source=tfds", f"data.data_dir={embedded_data_dir}",
                 "model.vocab_size=1024", "train.global_batch_size=12", "train.steps=1")
    with pytest.raises(UserError, match="cannot be split"):
        train(cfg)
    assert not run.exists()


def test_half_deleted_step_is_not_complete(reference, tmp_path):
    from bignlp_jax.checkpoint import complete_steps

    ref_dir, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    # a kill during Orbax's removal of an old step: some of its files are already gone
    next((run / "checkpoints" / "4" / "state").rglob("d/*")).unlink()
    assert complete_steps(run / "checkpoints") == [8, 12]
    # the newest step is never skipped: missing files there are damage, reported on restore
    shutil.rmtree(run / "checkpoints" / "12" / "state" / "ocdbt.process_0")
    assert complete_steps(run / "checkpoints") == [8, 12]
    with pytest.raises(UserError, match=r"(?s)checkpoint step 12 .*ocdbt.process_0/.* is "
                                        r"missing.*checkpoint.resume_from=8"):
        train(config(run, "train.steps=16"))


def test_sigterm_during_the_last_step_finishes_the_run(reference, tmp_path, monkeypatch):
    """A finished run exits 0 (the CLI returns train's result), not 75: a scheduler must not
    requeue a job that is done."""
    import os

    from bignlp_jax.data.corpora.synthetic import SyntheticSource

    ref_dir, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoints" / "8", run / "checkpoints" / "8")
    original = SyntheticSource.__next__

    def signalled(self):
        batch = original(self)
        if self.step == 12:  # the batch of the last step
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    monkeypatch.setattr(SyntheticSource, "__next__", signalled)
    train(config(run, "train.steps=12"))  # returns: no Preempted
    assert latest_step(run) == 12


@pytest.fixture
def mounted(tmp_path):
    """mount(path, *options): a tmpfs at `path` (root only), unmounted after the test."""
    mounts = []

    def mount(path, *options):
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                               str(path)], capture_output=True, check=False)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_stops_with_bytes_needed_and_resumes_bitwise(reference, tmp_path, mounted):
    from bignlp_jax.checkpoint import complete_steps
    from bignlp_jax.checkpoint.fs_probe import CheckpointWriteError

    _, ref_losses, ref_params = reference
    run = mounted(tmp_path / "run", "size=3800k")  # room for two steps of the tiny state
    with pytest.raises(CheckpointWriteError) as err:
        train(config(run, "train.steps=12", "checkpoint.every_steps=1", "checkpoint.keep=100"))
    message = str(err.value)
    assert err.value.exit_code == 2
    assert f"cannot save checkpoint step 3 in {run / 'checkpoints'}" in message
    assert "no space left on the device (ENOSPC)" in message and "needs about" in message
    assert complete_steps(run / "checkpoints") == [1, 2]  # earlier steps intact
    # space freed: the same command resumes from step 2 and ends exactly like the reference
    subprocess.run(["mount", "-o", "remount,size=64m", str(run)], check=True)
    train(config(run, "train.steps=12", "checkpoint.every_steps=1", "checkpoint.keep=100"))
    assert losses(run) == ref_losses
    assert_trees_equal(host_params(run, config(run).model), ref_params)


def test_read_only_checkpoint_dir_stops_at_once(tmp_path, mounted):
    run = tmp_path / "run"
    mounted(run / "checkpoints", "size=1m", "ro")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"checkpoint directory .*/run/checkpoints is not "
                                        r"writable: Read-only file system \(errno 30\)"):
        train(config(run, "train.steps=4"))
    assert time.monotonic() - started < 10


def test_nan_soon_after_a_restore_names_the_checkpoint(reference, tmp_path, monkeypatch):
    from bignlp_jax.data.corpora.synthetic import SyntheticSource

    ref_dir, _, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    original = SyntheticSource.__next__

    def poisoned(self):
        batch = original(self)
        if self.step == 14:  # two steps after resuming at 12
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch

    monkeypatch.setattr(SyntheticSource, "__next__", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"(?s)at step 14.*suspect: checkpoint step 12 "
                                            r".*2 step\(s\) ago.*checkpoint.resume_from=8.*"
                                            r"lower optimizer.lr"):
        train(config(run, "train.steps=16"))


def test_checkpoint_dir_turning_read_only_mid_run_stops_in_seconds(reference, tmp_path,
                                                                    monkeypatch, mounted):
    from bignlp_jax.checkpoint import complete_steps
    from bignlp_jax.checkpoint.fs_probe import CheckpointWriteError
    from bignlp_jax.data.corpora.synthetic import SyntheticSource

    run = tmp_path / "run"
    ckpt = mounted(run / "checkpoints", "size=16m")  # no open files there between saves
    original, when = SyntheticSource.__next__, {}

    def remount_read_only(self):
        batch = original(self)
        if self.step == 3:  # after the step-2 checkpoint, before the step-4 one
            subprocess.run(["mount", "-o", "remount,ro", str(ckpt)], check=True)
            when["ro"] = time.monotonic()
        return batch

    monkeypatch.setattr(SyntheticSource, "__next__", remount_read_only)
    with pytest.raises(CheckpointWriteError, match=r"cannot save checkpoint step 4 in .*: the "
                                                   r"file system is read-only \(EROFS\)"):
        # synchronous saves: step 2 is durable before the mount turns read-only
        train(config(run, "train.steps=6", "checkpoint.every_steps=2",
                     "checkpoint.async_save=false"))
    assert time.monotonic() - when["ro"] < 10
    assert complete_steps(run / "checkpoints") == [2]


@pytest.mark.slow
def test_full_disk_cli_prints_one_message_and_no_traceback(tmp_path, cache_env, mounted):
    # ~1.5 MiB a step: room for two steps and the run's logs with ~0.7 MiB to spare either way
    # (at 3m the margin was ~50 KiB, and a CI machine's logs took it: step 2 failed instead)
    run = mounted(tmp_path / "run", "size=3800k")
    proc = _run_cli(run, cache_env, "train.steps=12", "checkpoint.every_steps=1",
                    "checkpoint.keep=100")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "bignlp-jax train: error: cannot save checkpoint step 3" \
        in errors[0] and "needs about" in errors[0], out[-3000:]
    assert latest_step(run) == 2


# The free-space check before a save sees room (fault injection), so the disk fills in the
# middle of writing the step: TensorStore's pending writes then fail on Orbax's closed loop.
MID_WRITE = """
import sys
from bignlp_jax.checkpoint import fs_probe
fs_probe.free_bytes = lambda path: 10**12
from bignlp_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_filling_mid_write_is_one_message_and_resumes_bitwise(reference, tmp_path,
                                                                   cache_env, mounted):
    from bignlp_jax.checkpoint import complete_steps

    _, ref_losses, ref_params = reference
    run = mounted(tmp_path / "run", "size=3m")
    extra = ("train.steps=12", "checkpoint.every_steps=1", "checkpoint.keep=100")
    proc = subprocess.run(
        [sys.executable, "-c", MID_WRITE, "train", "tiny", *config_overrides(run, *extra)],
        env=subprocess_env(cache_env), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    for noise in ("Traceback", "Event loop is closed", "Exception ignored", "Exception in"):
        assert noise not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "no space left on the device (ENOSPC)" in errors[0], out[-3000:]
    steps = complete_steps(run / "checkpoints")
    assert steps and steps == list(range(1, steps[-1] + 1))  # earlier steps intact
    subprocess.run(["mount", "-o", "remount,size=64m", str(run)], check=True)
    train(config(run, *extra))  # room again: the same command resumes and ends like the reference
    assert losses(run) == ref_losses
    assert_trees_equal(host_params(run, config(run).model), ref_params)
