"""Run directories on buckets (gs://, s3://) against emulators started by the tests.

The GCS emulator gets the whole run: config, metrics, TensorBoard events, sharded Orbax
checkpoints, SIGTERM and an exact resume. Storage errors (missing bucket, unreachable endpoint)
must stop the CLI with one line and exit 2 before a model is built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import storage_emulators
from checkpoint_common import assert_trees_equal, config, host_params, losses
from conftest import bignlp_cmd

from bignlp_jax import storage
from bignlp_jax.checkpoint import latest_step, load_run_config
from bignlp_jax.errors import REQUEUE_EXIT_CODE, UserError
from bignlp_jax.train.loop import train
from bignlp_jax.train.metrics import MetricsLogger, read_metrics

TRAIN = ["train", "tiny"]
# the emulators, one per test session
gcs_emulator, gcs_bucket = storage_emulators.gcs_emulator, storage_emulators.gcs_bucket
s3_emulator, s3_bucket = storage_emulators.s3_emulator, storage_emulators.s3_bucket


def _overrides(run_dir: str, *extra: str) -> list[str]:
    from checkpoint_common import OVERRIDES

    return [*OVERRIDES, f"run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_gcs_run_sigterm_then_resume_is_bitwise(gcs_bucket, tmp_path, cli_env):
    run = f"{gcs_bucket}/runs/a"
    proc = subprocess.Popen(
        bignlp_cmd(*TRAIN, *_overrides(run, "train.steps=100000", "checkpoint.every_steps=2")),
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while (latest_step(run) or 0) < 2:  # step 2 is durable in the bucket
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    stopped = latest_step(run)
    assert f"stopped after step {stopped} of 100000" in out
    assert f"{run}/checkpoints/{stopped}" in out
    # metrics were flushed at the checkpoints and at exit: every step up to the stop
    assert sorted(losses(run)) == list(range(1, stopped + 1))

    final = stopped + 2
    train(config(run, f"train.steps={final}"))  # resumes from the bucket, in this process
    reference = tmp_path / "reference"
    train(config(reference, f"train.steps={final}"))
    assert losses(run) == losses(reference)
    model = config(run).model
    assert_trees_equal(host_params(run, model), host_params(reference, model))
    assert load_run_config(run).train.steps == final
    root = storage.path(run)
    assert (root / "config.yaml").is_file()
    assert next((root / "tensorboard").iterdir()).name.startswith("events.out")


def test_metrics_on_a_bucket_are_buffered_until_flush(s3_bucket, monkeypatch):
    run = f"{s3_bucket}/metrics"
    logger = MetricsLogger(run, total_steps=3, progress=False, enabled=True)
    logger.log(1, {"loss": 2.0})
    assert read_metrics(run) == []  # nothing written per step
    logger.flush()
    logger.log(2, {"loss": 1.5})
    logger.close()
    assert [r["loss"] for r in read_metrics(run)] == [2.0, 1.5]
    # a resumed run appends to what is there; a log step flushes once enough time has passed
    monkeypatch.setattr("bignlp_jax.train.metrics.REMOTE_FLUSH_SECONDS", 0.0)
    again = MetricsLogger(run, total_steps=3, start_step=2, progress=False, enabled=True)
    again.log(3, {"loss": 1.25})
    assert [r["loss"] for r in read_metrics(run)] == [2.0, 1.5, 1.25]
    again.close()
    names = [p.name for p in (storage.path(run) / "tensorboard").iterdir()]
    assert names and names[0].startswith("events.out")


def test_missing_bucket_is_one_line_before_the_model(gcs_emulator, cli_env):
    result = subprocess.run(
        bignlp_cmd(*TRAIN, *_overrides("gs://no-such-bucket-bignlp/run")),
        check=False, env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "run.dir=gs://no-such-bucket-bignlp/run" in result.stderr
    assert "does not exist" in result.stderr and "fix:" in result.stderr


def test_s3_run_dir_is_refused_before_the_model(s3_bucket, capsys):
    # orbax-checkpoint 0.12 cannot write arrays to s3:// (see README, Object storage)
    with pytest.raises(UserError, match=r"run.dir=s3://.*checkpoints cannot be written"):
        train(config(f"{s3_bucket}/run"))
    assert "training steps" not in capsys.readouterr().out


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line(cli_env):
    env = dict(cli_env, STORAGE_EMULATOR_HOST="http://127.0.0.1:9",
               TENSORSTORE_GCS_HTTP_URL="http://127.0.0.1:9")
    started = time.monotonic()
    result = subprocess.run(bignlp_cmd(*TRAIN, *_overrides("gs://some-bucket/run")),
                            check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "gs://some-bucket/run" in result.stderr
    assert "STORAGE_EMULATOR_HOST" in result.stderr  # the fix names the endpoint setting
    assert time.monotonic() - started < 60


def test_local_paths_are_untouched(tmp_path):
    assert type(storage.path(tmp_path)) is type(tmp_path)
    assert storage.absolute("rel").is_absolute()
    storage.check_access(tmp_path / "x", "run.dir")  # local paths are not probed
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_hf_to_gcs_then_import_from_it(gcs_bucket, tmp_path, capsys):
    from bignlp_jax.checkpoint import load_params
    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.cli import main
    from bignlp_jax.train.start import load_init_params

    run = f"{gcs_bucket}/run"
    train(config(run, "train.steps=2"))  # train on the bucket; export reads it from there
    hf = f"{gcs_bucket}/exports/hf"
    assert main(["export", "--run", run, "--format", "hf", "--out", hf]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == hf
    assert (storage.path(hf) / "config.json").is_file()
    assert any(p.name.endswith(".safetensors") for p in storage.path(hf).iterdir())
    imported = tmp_path / "imported"
    assert main(["import", "--from", hf, "--out", str(imported)]) == 0
    model = config(run).model
    assert_trees_equal(jax.tree.map(np.asarray, load_params(imported, model)),
                       host_params(run, model))
    # init_from a run directory in a bucket
    from_bucket = load_init_params(config(tmp_path / "fresh", f"init_from={run}"),
                                   default_shardings(model))
    assert_trees_equal(jax.tree.map(np.asarray, from_bucket), host_params(run, model))
    # a second export to the same --out replaces the earlier one; a foreign prefix is refused
    assert main(["export", "--run", run, "--format", "hf", "--out", hf]) == 0
    (storage.path(gcs_bucket) / "other" / "notes.txt").write_text("keep me")
    assert main(["export", "--run", run, "--format", "hf",
                 "--out", f"{gcs_bucket}/other"]) == 2
    assert (storage.path(gcs_bucket) / "other" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_save_to_gcs_and_one_restores(gcs_bucket, tmp_path):
    from test_checkpoint_multiprocess import MESH, WORKER, free_port

    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    run, dump = f"{gcs_bucket}/two", tmp_path / "params.npz"
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port, logs = str(free_port()), [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(WORKER), port, "2", str(i), run, str(dump), *MESH,
         "train.steps=100000", "checkpoint.every_steps=2"],
        env=env, stdout=logs[i].open("w"), stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while (latest_step(run) or 0) < 2:  # both processes' shards of step 2 are in the bucket
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the two-process run did not save step 2"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # one process told: both stop after the same step
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [REQUEUE_EXIT_CODE] * 2, logs[0].read_text()[-3000:]
    stopped = latest_step(run)
    data_dir = storage.path(run) / "checkpoints" / str(stopped) / "data"
    assert sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    two = np.load(dump)  # what the two processes restored together, gathered
    assert int(two["step"]) == stopped

    cfg = config(run, "train.steps=100000")  # one process, 8 devices, another mesh
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    one = start_state(cfg, trainer.layout, source, run)
    assert one.step == stopped and source.get_state()["step"] == stopped
    for path, x in jax.tree_util.tree_flatten_with_path(one.state.params)[0]:
        assert np.array_equal(np.asarray(x), two[jax.tree_util.keystr(path)])


def test_tokenizer_saved_to_and_loaded_from_a_bucket(s3_bucket, gcs_bucket, tmp_path):
    from bignlp_jax.data.tokenizer import load_tokenizer, train_tokenizer

    sources = sorted((Path(storage.__file__).parent / "config").glob("*.py"))
    local = tmp_path / "tok"
    train_tokenizer([p.read_text() for p in sources], local, vocab_size=400)
    for bucket in (gcs_bucket, s3_bucket):
        out = load_tokenizer(local).save(f"{bucket}/run/tokenizer")
        remote = load_tokenizer(f"{bucket}/run")  # a run dir: finds run/tokenizer/
        assert remote.describe() == load_tokenizer(local).describe()
        assert (out / "tokenizer.json").is_file()
        assert remote.encode("return x") == load_tokenizer(local).encode("return x")


def test_data_prepare_into_a_bucket(gcs_bucket, tmp_path, capsys):
    from bignlp_jax.cli import main
    from bignlp_jax.data.tfds_source import open_split

    paragraphs = [f"paragraph {i} " + "word " * (i % 5) for i in range(20)]
    (tmp_path / "part.txt").write_text("\n\n".join(paragraphs) + "\n")
    argv = ["data", "prepare", "--input", str(tmp_path / "part.txt"), "--name", "my_text",
            "--data-dir", f"{gcs_bucket}/datasets", "--text-unit", "paragraph",
            "--validation-fraction", "0.2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["path"] == f"{gcs_bucket}/datasets/my_text/1.0.0"
    assert main(argv) == 2  # exists: refused without --overwrite
    assert main([*argv, "--overwrite"]) == 0
    # what is in the bucket is a complete TFDS dataset: read it back from a local copy
    local = storage.fetch_dir(f"{gcs_bucket}/datasets")
    texts = sorted(open_split("my_text", local, split)[i]["text"].decode()
                   for split in ("train", "validation")
                   for i in range(len(open_split("my_text", local, split))))
    assert texts == sorted(paragraphs)
    assert {s: len(open_split("my_text", local, s)) for s in ("train", "validation")} == \
        result["splits"]


@pytest.mark.slow
def test_resume_from_an_older_step_in_a_bucket(gcs_bucket):
    run = f"{gcs_bucket}/older"
    train(config(run, "train.steps=4", "checkpoint.every_steps=2"))
    first = losses(run)
    train(config(run, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.resume_from=2"))
    assert latest_step(f"{run}/checkpoints_abandoned") == 4  # the newer step was set aside
    assert losses(run) == first  # steps 3-4 trained again, bitwise the same


def test_init_from_a_missing_bucket_path_is_one_line(gcs_bucket):
    with pytest.raises(UserError, match=r"init_from=gs://.*/nowhere does not exist"):
        train(config(f"{gcs_bucket}/run", f"init_from={gcs_bucket}/nowhere"))
    with pytest.raises(UserError, match=r"init_from=gs://no-such-bucket-bignlp/x: bucket"):
        train(config(f"{gcs_bucket}/run", "init_from=gs://no-such-bucket-bignlp/x"))
