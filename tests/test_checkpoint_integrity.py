"""Every file of a checkpoint step is covered by its checksums: a flipped bit in any kind of file
(data position, metadata, Orbax's index and array files, the checksum lists themselves) or a
missing listed file stops a resume with one message naming the step, the file and the
`checkpoint.resume_from` to use, before Orbax reads anything (benchmarks/bitflip_campaign.py
runs the random campaign)."""

from __future__ import annotations

import logging
import shutil
import subprocess

import checkpoint_common
import pytest
from checkpoint_common import cli_overrides, config, subprocess_env
from conftest import bignlp_cmd

from bignlp_jax.checkpoint import integrity
from bignlp_jax.checkpoint.manager import RunCheckpointer
from bignlp_jax.errors import UserError
from bignlp_jax.train.loop import Trainer, train
from bignlp_jax.train.start import restore_checkpoint

cache_env = checkpoint_common.cache_env  # the compile cache, on for this module

# one file of each kind in a one-process step (relative to the step directory)
KINDS = [
    "data/process_0-of-1.json", "meta/metadata", "state/_METADATA", "state/_sharding",
    "state/array_metadatas/process_0", "state/manifest.ocdbt", "state/d/*",
    "state/ocdbt.process_0/manifest.ocdbt", "state/ocdbt.process_0/d/*",
    "state/checksums.primary.json", "state/checksums.process_0.json",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps, checkpoints at 2 and 4; and the layout a resume restores onto."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    cfg = config(run_dir, "train.steps=4", "checkpoint.every_steps=2")
    train(cfg)
    return run_dir, Trainer.build(cfg).layout


def _one(step_dir, pattern):
    found = sorted(step_dir.glob(pattern), key=lambda p: p.stat().st_size)
    assert found, pattern
    return found[-1]  # the biggest: for state/d/* the index node, for process d/* the arrays


def _flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("pattern", KINDS)
def test_a_flipped_bit_in_each_kind_of_file_is_named(run, pattern):
    run_dir, layout = run
    step_dir = run_dir / "checkpoints" / "4"
    path = _one(step_dir, pattern)
    position = path.stat().st_size // 2
    _flip(path, position)
    try:
        with pytest.raises(UserError) as err:
            restore_checkpoint(layout, step_dir)
    finally:
        _flip(path, position)  # back as it was, for the next kind
    message = str(err.value)
    assert err.value.exit_code == 2
    assert "cannot resume from checkpoint step 4" in message, message
    assert path.name in message and "checkpoint.resume_from=2" in message, message
    assert integrity.verify(step_dir) is None  # restored


def test_listed_data_position_or_metadata_missing_is_named(run, tmp_path):
    run_dir, layout = run
    for name in ("data/process_0-of-1.json", "meta/metadata"):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(run_dir, copy)
        step_dir = copy / "checkpoints" / "4"
        (step_dir / name).unlink()
        assert integrity.missing_file(step_dir) == f"{name} is missing"
        with pytest.raises(UserError, match=rf"(?s)step 4 .*{name} is missing.*resume_from=2"):
            restore_checkpoint(layout, step_dir)


@pytest.mark.slow
def test_a_damaged_index_file_is_one_clean_message(run, tmp_path, cache_env):
    """The CLI on a flipped bit in Orbax's index (state/d/<hash>): the message and nothing else
    (no TensorStore spec dump, no asyncio tracebacks)."""
    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    index = _one(copy / "checkpoints" / "4", "state/d/*")
    _flip(index, index.stat().st_size // 2)
    done = subprocess.run(
        bignlp_cmd("train", "tiny", *cli_overrides(copy, "train.steps=6",
                                                   "checkpoint.every_steps=2")),
        env=subprocess_env(cache_env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
    assert f"state/d/{index.name} fails its checksum" in done.stderr
    assert "checkpoint.resume_from=2" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) <= 6, done.stderr


def test_a_bug_in_our_restore_code_exits_1_and_a_flipped_bit_exits_2(run, tmp_path, monkeypatch,
                                                                      capsys):
    """read_errors.py: a ValueError raised by our own code while restoring is a bug (traceback,
    exit 1), not a damaged checkpoint; the damaged file still exits 2 with one message."""
    from bignlp_jax.checkpoint.read_errors import is_read_error
    from bignlp_jax.cli import main
    from bignlp_jax.train import start

    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    argv = ["train", "tiny", *cli_overrides(copy, "train.steps=6", "checkpoint.every_steps=2")]

    def broken(step_dir):
        raise ValueError("a bug in our restore code")

    with monkeypatch.context() as patched:
        patched.setattr(start, "restore_data_state", broken)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: a bug in our restore code" in err, err[-3000:]
    try:
        broken(None)
    except ValueError as e:
        assert not is_read_error(e)

    _flip(copy / "checkpoints" / "4" / "data" / "process_0-of-1.json", 3)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "data/process_0-of-1.json fails its checksum" in err and "resume_from=2" in err


def test_a_damaged_step_metadata_file_logs_at_debug_only(run, tmp_path, caplog):
    """Orbax's `_CHECKPOINT_METADATA` (never read by a restore, outside the checksums): a
    damaged copy resumes, and Orbax's "Failed to read Metadata file" ERROR is a DEBUG record."""
    run_dir, layout = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    step_dir = copy / "checkpoints" / "4"
    (step_dir / "_CHECKPOINT_METADATA").write_bytes(b"\xff\xfe not utf-8")
    with caplog.at_level(logging.DEBUG, logger="absl"):
        restore_checkpoint(layout, step_dir)
        RunCheckpointer(copy, config(copy).checkpoint).steps()
    damaged = [r for r in caplog.records if "Failed to read Metadata file" in r.getMessage()]
    assert damaged, [r.getMessage() for r in caplog.records]  # Orbax did complain
    assert {r.levelno for r in damaged} == {logging.DEBUG}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="absl"):
        RunCheckpointer(copy, config(copy).checkpoint).steps()
    assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]
