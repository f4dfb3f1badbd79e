"""The local fast checkpoint tier (checkpoint.local_dir): agreement between processes, pruning,
config checks, the stop save, and two-process kills with bitwise resumes.

The two-process test (loopback jax.distributed, gloo, 2 CPU devices per process, parameters
split over both processes) runs its four launches two at a time: an uninterrupted reference
beside a run that is SIGKILLed after a local-only step; then the same killed state resumed
twice, once as it is (resumes from the local step) and once with process 1's local directory
gone (falls back to the durable step, warning about the lost one). Both end bitwise equal to
the reference.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import checkpoint_common
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_common import (
    assert_trees_equal,
    config,
    finish_workers,
    host_params,
    launch_workers,
    losses,
    worker_log,
)

from bignlp_jax.checkpoint import complete_steps, integrity, latest_step, local_tier, shard_files
from bignlp_jax.checkpoint.read_errors import DamagedCheckpoint
from bignlp_jax.config import load_config
from bignlp_jax.errors import ConfigError, Preempted, UserError
from bignlp_jax.train.identity import is_resumable
from bignlp_jax.train.local_resume import local_step_dir
from bignlp_jax.train.loop import Trainer, train

cache_env = checkpoint_common.cache_env  # the compile cache, on for this module
END = 16  # the resumed runs' last step (the schedule is pinned: see checkpoint_common)


# --- fast: config, agreement, pruning -------------------------------------------------------


def test_config_checks_and_resumable_keys():
    with pytest.raises(ConfigError, match="checkpoint.local_every_steps=5 needs checkpoint"):
        load_config("tiny", ["checkpoint.local_every_steps=5"])
    with pytest.raises(ConfigError, match="local_dir=gs://b/x is not a local path"):
        load_config("tiny", ["checkpoint.local_dir=gs://b/x"])
    with pytest.raises(ConfigError, match="local_keep"):
        load_config("tiny", ["checkpoint.local_dir=/dev/shm/x", "checkpoint.local_keep=0"])
    cfg = load_config("tiny", ["checkpoint.local_dir=/dev/shm/x",
                               "checkpoint.local_every_steps=5"])
    assert cfg.checkpoint.local_keep == 2
    for key in ("checkpoint.local_dir", "checkpoint.local_every_steps", "checkpoint.local_keep"):
        assert is_resumable(key)


def test_agreement_takes_steps_every_process_holds():
    assert local_tier.agreed([[4, 5, 6], [5, 6], [3, 5, 6, 7]]) == [5, 6]
    assert local_tier.agreed([[4, 5], []]) == []
    assert local_tier.agreed([[2, 9]]) == [2, 9]
    assert local_tier.gather_steps([3, 7]) == [[3, 7]]  # one process: no collective


def test_tier_root_is_per_run_and_per_process(tmp_path):
    a = local_tier.tier_root(tmp_path, tmp_path / "run_a")
    b = local_tier.tier_root(tmp_path, tmp_path / "run_b")
    assert a != b and a.name == b.name == "process_0" and a.parent.parent == tmp_path


def test_local_dir_is_probed_before_the_model_is_built(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = config(tmp_path / "run", f"checkpoint.local_dir={blocker / 'local'}")
    with pytest.raises(UserError, match=r"checkpoint.local_dir .*a_file/local/run-.*/process_0 "
                                        r"is not writable"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_shard_files_round_trip_one_file_per_distinct_shard(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))  # copies on "b"
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = np.random.default_rng(0)
    tree = {"w": jax.device_put(rng.standard_normal((12, 5), np.float32), split),
            "h": jax.device_put(rng.standard_normal((7,)).astype(jnp.bfloat16), whole),
            "step": jax.device_put(np.int32(41), whole),
            # 1 MiB shards: read into anonymous mappings rather than numpy's buffers
            "big": jax.device_put(rng.standard_normal((1024, 1024), np.float32), split)}
    shard_files.ShardFilesHandler().save(tmp_path, shard_files.ShardFilesSave(tree))
    assert len(list((tmp_path / "shards").iterdir())) == 4 + 1 + 1 + 4  # replicas once
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          tree)
    back = shard_files.read_tree(tmp_path, target, verify=True)
    assert_trees_equal(back, tree)
    assert back["w"].sharding == split and back["h"].dtype == jnp.bfloat16
    # each device's copy is its own buffer (one adopted the read buffer, the rest are copies)
    pointers = {s.data.unsafe_buffer_pointer() for s in back["h"].addressable_shards}
    assert len(pointers) == 8
    # a flipped byte is named when verifying, and a short file always
    name = max((tmp_path / "shards").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(name.read_bytes())
    data[3] ^= 0x10
    name.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"state/shards/{name.name} fails its checksum"):
        shard_files.read_tree(tmp_path, target, verify=True)
    name.write_bytes(bytes(data[:-4]))
    with pytest.raises(ValueError, match=f"state/shards/{name.name} holds {len(data) - 4} bytes"):
        shard_files.read_tree(tmp_path, target)


def _trained(tmp_path, *extra):
    """A short single-process run with a local tier (compiled once per session)."""
    run, local = tmp_path / "run", tmp_path / "local"
    cfg = config(run, "train.steps=6", "checkpoint.every_steps=4",
                 "checkpoint.local_every_steps=1", f"checkpoint.local_dir={local}",
                 "checkpoint.local_keep=2", *extra)
    train(cfg)
    return cfg, run, local_tier.tier_root(local, run)


def test_pruning_discarding_and_a_lost_step(tmp_path, cache_env, capsys):
    cfg, run, root = _trained(tmp_path)
    # local_keep=2 newest of 1..5 (the final step 6 is durable only); the run dir untouched
    assert local_tier.own_steps(root, _fingerprint(cfg)) == [4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]
    # a local step's data position and metadata are checksummed too, and checked on restore
    copy = tmp_path / "copy" / "4"
    shutil.copytree(root / "4", copy)
    assert {"../data/process_0-of-1.json", "../meta/metadata"} <= set(
        integrity.read_listing(copy / "state").files)
    position = copy / "data" / "process_0-of-1.json"
    position.write_bytes(position.read_bytes().replace(b"4", b"5", 1))
    with pytest.raises(DamagedCheckpoint, match="data/process_0-of-1.json fails its checksum"):
        local_tier.restore_state(copy, Trainer.build(cfg).layout.abstract(), verify=True)
    # a local step newer than the durable one, corrupt: resuming warns and takes local step 4
    # (as new as the durable one: same trajectory, faster to read)
    shutil.rmtree(run / "checkpoints" / "6")
    data_file = max((root / "5" / "state").glob("shards/*"), key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))
    capsys.readouterr()
    train(config(run, "train.steps=6", "checkpoint.every_steps=4",
                 "checkpoint.local_every_steps=1", f"checkpoint.local_dir={root.parent.parent}"))
    out = capsys.readouterr().out
    assert f"local step 5 is damaged (process 0: state/shards/{data_file.name} fails" in out
    assert f"resumed from local checkpoint {root / '4'}" in out
    assert "deleted its local step(s) 5 (newer than the start, step 4)" in out


def _fingerprint(cfg):
    return local_tier.layout_fingerprint(Trainer.build(cfg).layout.abstract())


def test_stop_saves_to_the_local_tier_then_the_durable_one(tmp_path, cache_env, capsys):
    run, local = tmp_path / "run", tmp_path / "local"
    cfg = config(run, "train.steps=6", "checkpoint.every_steps=0", "train.max_time=1e-9",
                 f"checkpoint.local_dir={local}")  # local_every_steps=0: stop saves only
    with pytest.raises(Preempted, match=r"saved in .*checkpoints/1 \(and in the local tier, "):
        train(cfg)
    root = local_tier.tier_root(local, run)
    assert local_tier.own_steps(root, _fingerprint(cfg)) == [1] and latest_step(run) == 1
    # the local step restores (it is as new as the durable one, and faster to read)
    cfg = config(run, "train.steps=2", "checkpoint.every_steps=0", f"checkpoint.local_dir={local}")
    train(cfg)
    assert f"resumed from local checkpoint {root / '1'}" in capsys.readouterr().out
    assert latest_step(run) == 2
    # requeued onto another mesh (durable steps aside): the local step (each process reads
    # back only its own shards) is refused by name, never restored onto the wrong layout
    other = config(run, "mesh.data=4", "mesh.fsdp=2", f"checkpoint.local_dir={local}")
    target = Trainer.build(other).layout.abstract()  # nothing compiled: the layout only
    assert local_step_dir(other, run, target, durable=None, pending=False) is None
    out = capsys.readouterr().out
    assert "local step(s) 1 were saved on another mesh or process layout" in out


# --- two processes: kill after a local-only step ---------------------------------------------


def _launch(run: Path, name: str, cache_env, *overrides: str) -> list[subprocess.Popen]:
    return launch_workers(run, run.parent / "x.npz", cache_env, *overrides, name=name)


def _finish(procs, what: str, run: Path, name: str) -> None:
    codes = finish_workers(procs)
    assert codes == [0, 0], f"{what}: {codes}\n" + worker_log(run, 0, name)[-3000:] \
        + worker_log(run, 1, name)[-3000:]


def _common_local(local: Path, run: Path) -> list[int]:
    root = local_tier.tier_root(local, run).parent  # run-<hash>/process_<i>
    try:
        return local_tier.agreed([complete_steps(root / f"process_{i}") for i in range(2)])
    except OSError:  # a step pruned while we list it
        return []


def _local_ahead(local: Path, run: Path) -> bool:
    """A step complete in both processes' local tiers is newer than the newest durable one."""
    steps, durable = _common_local(local, run), latest_step(run)
    return bool(steps and durable and steps[-1] > durable)


@pytest.mark.multiprocess
def test_two_processes_resume_from_the_agreed_local_step_or_fall_back(tmp_path, cache_env):
    ref, run, local = tmp_path / "ref" / "run", tmp_path / "a" / "run", tmp_path / "local"
    for d in (ref, run):
        d.parent.mkdir()
    tier = ["checkpoint.every_steps=4", "checkpoint.local_every_steps=1",
            "checkpoint.local_keep=2", f"checkpoint.local_dir={local}"]
    reference = _launch(ref, "w", cache_env, f"train.steps={END}", "checkpoint.every_steps=4")
    killed = _launch(run, "w", cache_env, "train.steps=100000", *tier)
    deadline = time.monotonic() + 300
    # wait for a local-only step: newer than a durable step that is complete. Seen while the
    # processes run, a durable save could catch up before the kill: the processes are frozen
    # (SIGSTOP) and the condition read again, so it holds for what the kill leaves.
    while True:
        assert all(p.poll() is None for p in killed), worker_log(run, 0, "w")[-3000:]
        assert time.monotonic() < deadline, "the two-process run did not save local steps"
        if _local_ahead(local, run):
            for p in killed:
                p.send_signal(signal.SIGSTOP)
            if _local_ahead(local, run):
                break
            for p in killed:
                p.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    for p in killed:
        p.send_signal(signal.SIGKILL)  # no stop save: what a lost node or an OOM kill leaves
    for p in killed:
        p.wait()
    _finish(reference, "reference run", ref, "w")
    lost, durable = _common_local(local, run)[-1], latest_step(run)
    assert durable is not None and durable < lost < END, (lost, durable)

    # the same killed state, with process 1's local directory gone (a host that lost /dev/shm)
    run_b = tmp_path / "b" / "run"
    shutil.copytree(run, run_b)
    shutil.copytree(local_tier.tier_root(local, run), local_tier.tier_root(local, run_b))

    resumed = _launch(run, "r", cache_env, f"train.steps={END}", *tier)
    fallback = _launch(run_b, "r", cache_env, f"train.steps={END}", *tier)
    _finish(resumed, "resume from the local tier", run, "r")
    _finish(fallback, "resume after a lost local dir", run_b, "r")

    step_dir = local_tier.tier_root(local, run) / str(lost)
    assert f"resumed from local checkpoint {step_dir}" in worker_log(run, 0, "r")
    warning = (f"WARNING: local step(s) {lost} (missing on process 1) not complete on every "
               f"process; lost, resuming from durable step {durable}")
    assert warning in worker_log(run_b, 0, "r")
    assert (f"resumed from checkpoint {run_b / 'checkpoints' / str(durable)}"
            in worker_log(run_b, 0, "r"))
    cfg = config(ref, f"train.steps={END}")
    want = host_params(ref, cfg.model)
    for r in (run, run_b):
        assert_trees_equal(host_params(r, cfg.model), want)
        assert losses(r) == losses(ref)
    assert jax.tree.leaves(want) and np.isfinite(losses(ref)[END])
