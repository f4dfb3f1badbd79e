"""Run directories on buckets (gs://, s3://) against emulators started by the tests.

Both emulators get the whole run: config, metrics, TensorBoard events, sharded Orbax
checkpoints (s3:// through compat/orbax.py), SIGTERM and an exact resume. Storage
errors (missing bucket, unreachable endpoint, missing or refused credentials, a denied write)
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
from compile_flags import xla_flags
from conftest import bignlp_cmd

from bignlp_jax import access, storage
from bignlp_jax.checkpoint import latest_step, load_params, load_run_config
from bignlp_jax.errors import REQUEUE_EXIT_CODE, UserError
from bignlp_jax.train.loop import train
from bignlp_jax.train.metrics import MetricsLogger, read_metrics

TRAIN = ["train", "tiny"]
# the emulators, one per test session
gcs_emulator, gcs_bucket = storage_emulators.gcs_emulator, storage_emulators.gcs_bucket
s3_emulator, s3_bucket = storage_emulators.s3_emulator, storage_emulators.s3_bucket
s3_auth_emulator = storage_emulators.s3_auth_emulator
# the bucket fixture is chosen at run time (request.getfixturevalue): marked required by hand
BUCKETS = pytest.mark.parametrize(
    "scheme", [pytest.param(s, marks=pytest.mark.required) for s in ("gs", "s3")])


def _bucket(request, scheme: str) -> str:
    """A fresh bucket on the emulator of `scheme` (its session fixture sets the environment)."""
    return request.getfixturevalue({"gs": "gcs_bucket", "s3": "s3_bucket"}[scheme])


def _overrides(run_dir: str, *extra: str) -> list[str]:
    from checkpoint_common import cli_overrides

    return cli_overrides(run_dir, *extra)


@pytest.mark.slow
@BUCKETS
def test_bucket_run_sigterm_then_resume_is_bitwise(scheme, request, tmp_path):
    run = f"{_bucket(request, scheme)}/runs/a"
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # with the emulator's endpoint variables
    proc = subprocess.Popen(
        bignlp_cmd(*TRAIN, *_overrides(run, "train.steps=100000", "checkpoint.every_steps=2")),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_error_kinds_come_from_types_and_codes_not_message_text(tmp_path):
    import botocore.exceptions
    import google.auth.exceptions
    from gcsfs.retry import HttpError

    def client_error(code: str) -> PermissionError:
        error = PermissionError("x")
        error.__cause__ = botocore.exceptions.ClientError({"Error": {"Code": code}}, "PutObject")
        return error

    kind = access.error_kind
    assert kind(client_error("SignatureDoesNotMatch"), "s3://") == "refused"
    assert kind(client_error("AccessDenied"), "s3://") == "permission"
    assert kind(botocore.exceptions.NoCredentialsError(), "s3://") == "no_credentials"
    assert kind(google.auth.exceptions.DefaultCredentialsError("x"), "gs://") == "no_credentials"
    assert kind(google.auth.exceptions.RefreshError("x"), "gs://") == "refused"
    assert kind(HttpError({"code": 401, "message": "x"}), "gs://") == "refused"
    assert kind(OSError("Forbidden: b/run"), "gs://") == "permission"  # gcsfs's 403
    assert kind(access.PathMissing("gs://b/x"), "gs://") == "path_missing"
    assert kind(FileNotFoundError("b"), "gs://") == "bucket_missing"
    # words in a message decide nothing: a proxy's "token bucket" note is no credentials problem
    assert kind(ConnectionRefusedError(111, "token bucket exhausted"), "gs://") == "unreachable"
    assert kind(PermissionError("refresh token expired"), "s3://") == "permission"
    assert access.explain("gs://b/r", ConnectionResetError("no token"), True).startswith(
        "cannot reach the storage service for gs://b/r")


def test_local_path_check_reads_writes_and_free_space(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=rf"^run.dir {blocker}/run is not writable: Not a "
                                        rf"directory \(errno 20\) at {blocker}\n"
                                        r"  fix: .*run.dir=DIR"):
        access.check_path(blocker / "run", "run.dir")
    with pytest.raises(UserError, match=r"^--out .*/new/out: no space left on the device "
                                        r"\(ENOSPC\): about .* needed, .* free\n"
                                        r"  fix: free space .*--out DIR"):
        access.check_path(tmp_path / "new" / "out", "--out", fix="--out DIR", free_bytes=2**62)
    access.check_path(tmp_path / "new" / "out", "--out", free_bytes=1)
    access.check_path(tmp_path / "missing", "init_from", write=False)  # its reader names it
    assert sorted(tmp_path.iterdir()) == [blocker]  # no probe left anything behind


@pytest.mark.parametrize("ending", ["pass", "raise SystemExit(2)", "raise ValueError('bug')"])
def test_scratch_dirs_are_removed_when_the_process_ends(tmp_path, ending):
    # bucket runs copy TensorBoard files, exports and HF models through local temporary dirs:
    # however the process ends (short of SIGKILL), none is left behind in the temp folder
    code = ("from bignlp_jax import storage\n"
            "d = storage.scratch_dir('bignlp-test-')\n"
            "(d / 'sub').mkdir(); (d / 'sub' / 'f.bin').write_bytes(b'x' * 4096)\n"
            f"print(d, flush=True)\n{ending}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    made = Path(proc.stdout.strip())
    assert made.parent == tmp_path and made.name.startswith("bignlp-test-"), proc.stderr
    assert not made.exists() and not list(tmp_path.iterdir())


def test_local_paths_are_untouched(tmp_path):
    assert type(storage.path(tmp_path)) is type(tmp_path)
    assert storage.absolute("rel").is_absolute()
    access.check_path(tmp_path / "x", "run.dir")  # a local probe leaves nothing behind
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@BUCKETS
def test_export_hf_to_a_bucket_then_import_from_it(scheme, request, tmp_path, capsys,
                                                    monkeypatch):
    import tempfile

    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.cli import main
    from bignlp_jax.train.start import load_init_params

    bucket = _bucket(request, scheme)
    run = f"{bucket}/run"
    train(config(run, "train.steps=2"))  # train on the bucket; export reads it from there
    hf = f"{bucket}/exports/hf"
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
    # init_from the Hugging Face model in the bucket: safetensors needs local files, so it is
    # copied to a temporary dir, removed as soon as it is read (not when the run ends)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from_hf = load_init_params(config(tmp_path / "fresh_hf", f"init_from=hf:{hf}"),
                               default_shardings(model))
    assert_trees_equal(jax.tree.map(np.asarray, from_hf), host_params(run, model))
    assert not list(scratch.iterdir())
    # a second export to the same --out replaces the earlier one with --overwrite; a foreign
    # prefix is refused even then
    assert main(["export", "--run", run, "--format", "hf", "--out", hf]) == 2
    assert main(["export", "--run", run, "--format", "hf", "--out", hf, "--overwrite"]) == 0
    (storage.path(bucket) / "other" / "notes.txt").write_text("keep me")
    assert main(["export", "--run", run, "--format", "hf", "--overwrite",
                 "--out", f"{bucket}/other"]) == 2
    assert (storage.path(bucket) / "other" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.multiprocess
@BUCKETS
def test_two_processes_save_to_a_bucket_and_one_restores(scheme, request, tmp_path):
    from checkpoint_common import MESH, WORKER, free_port

    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    run, dump = f"{_bucket(request, scheme)}/two", tmp_path / "params.npz"
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(2))
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
    from bignlp_jax.data.tfds.source import open_split

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
@BUCKETS
def test_resume_from_an_older_step_in_a_bucket(scheme, request):
    run = f"{_bucket(request, scheme)}/older"
    train(config(run, "train.steps=4", "checkpoint.every_steps=2"))
    first = losses(run)
    train(config(run, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.resume_from=2"))
    (aside,) = storage.path(f"{run}/checkpoints_abandoned").iterdir()  # one per resume
    assert aside.name.startswith("2.") and latest_step(aside) == 4  # the newer step, set aside
    assert losses(run) == first  # steps 3-4 trained again, bitwise the same
    # the checksums written with each step are checked on a bucket too: a changed object is
    # named when the params are read
    step_dir = storage.path(run) / "checkpoints" / "4"
    shard = max((f for f in storage.files_under(step_dir / "state") if "ocdbt.process" in str(f)),
                key=storage.size)  # array data (a B-tree node would fail Orbax's own read)
    shard.write_bytes(shard.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"checkpoints/4 is damaged: .*"):
        load_params(run, config(run).model)


def test_init_from_a_missing_bucket_path_is_one_line(gcs_bucket):
    with pytest.raises(UserError, match=r"init_from=gs://.*/nowhere does not exist"):
        train(config(f"{gcs_bucket}/run", f"init_from={gcs_bucket}/nowhere"))
    with pytest.raises(UserError, match=r"init_from=gs://no-such-bucket-bignlp/x: bucket"):
        train(config(f"{gcs_bucket}/run", "init_from=gs://no-such-bucket-bignlp/x"))


@pytest.fixture
def fresh_s3_clients():
    """Bucket clients keep the credentials they were made with (fsspec and epath cache them):
    forget them before and after a test that changes the credentials."""
    import fsspec
    from etils.epath import backend

    def forget() -> None:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
        backend.fsspec_backend._get_filesystem.cache_clear()

    forget()
    yield forget  # (call it again after changing the credentials)
    forget()


def test_denied_write_and_missing_credentials_are_one_line(s3_auth_emulator, fresh_s3_clients,
                                                           monkeypatch, tmp_path):
    auth = s3_auth_emulator
    run = f"{auth['bucket']}/run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth["secret"])
    # the user may list and read but not s3:PutObject: reading is fine, writing is refused
    access.check_path(f"{auth['bucket']}/existing", "init_from", write=False)
    with pytest.raises(UserError) as denied:
        access.check_path(run, "run.dir")
    assert str(denied.value).startswith(
        f"run.dir={run}: no permission to write to {run} (PermissionError: Access Denied)\n"
        "  fix: grant this identity access")
    assert "s3:PutObject" in str(denied.value)
    # no credentials anywhere in the chain (none in the environment, no profile files, no
    # instance role: IMDS is switched off so a CI machine's own role cannot answer)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fresh_s3_clients()  # the cached clients hold the user's keys
    with pytest.raises(UserError) as missing:
        access.check_path(run, "run.dir")
    assert str(missing.value) == (
        f"run.dir={run}: no credentials for {run} (NoCredentialsError: Unable to locate "
        "credentials)\n  fix: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or an "
        "instance or pod role")


@pytest.mark.slow
def test_refused_credentials_stop_train_before_the_model(s3_auth_emulator, cli_env):
    auth = s3_auth_emulator
    run = f"{auth['bucket']}/run"
    env = dict(cli_env, AWS_ENDPOINT_URL=auth["endpoint"], AWS_ACCESS_KEY_ID=auth["key_id"],
               AWS_SECRET_ACCESS_KEY="not-the-secret")
    result = subprocess.run(bignlp_cmd(*TRAIN, *_overrides(run)), check=False, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "training steps" not in result.stdout
    assert f"run.dir={run}: the credentials for {run} were refused (PermissionError: The " \
           "request signature we calculated does not match" in result.stderr
    assert "fix: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in result.stderr


@pytest.mark.slow
def test_gcs_without_credentials_fails_fast(cli_env, tmp_path):
    # no emulator, no Application Default Credentials, and a GCE metadata server address where
    # nothing listens (what a machine off GCE sees; a CI runner on GCE must not answer here)
    env = {k: v for k, v in cli_env.items()
           if k not in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                        "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(CLOUDSDK_CONFIG=str(tmp_path), GCE_METADATA_HOST="127.0.0.1:9",
               GCE_METADATA_IP="127.0.0.1:9")
    started = time.monotonic()
    result = subprocess.run(bignlp_cmd(*TRAIN, *_overrides("gs://some-bucket-bignlp/run")),
                            check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "training steps" not in result.stdout
    assert "run.dir=gs://some-bucket-bignlp/run: no credentials for gs://some-bucket-bignlp/run " \
           "(DefaultCredentialsError" in result.stderr
    assert "fix: `gcloud auth application-default login`" in result.stderr
    assert time.monotonic() - started < 60  # (CLI start-up included; the probe is bounded)


def test_a_credential_lookup_that_hangs_is_named(monkeypatch):
    # google-auth pinging a GCE metadata server whose packets are dropped takes ~12 s; the
    # probe's limit stops it, and the message says what it was waiting for
    import google.auth

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(access, "PROBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: time.sleep(3))
    with pytest.raises(UserError, match=r"^run.dir=gs://b/run: no credentials found in 0.3 s "
                                        r"\(no Application Default Credentials on disk.*\n"
                                        r"  fix: `gcloud auth application-default login`"):
        access.check_path("gs://b/run", "run.dir")
