"""Data and pipelines in buckets (gs://, s3://), against the emulators the tests start.

Token stores in a bucket are read by byte ranges and must give bitwise the rows (and so the
losses) of the same store on local disk; `data tokenize` writes stores into a bucket; a
pipeline's output_dir may be a bucket, and a rerun there skips the finished stages.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import storage_emulators
from checkpoint_common import config, losses

from bignlp_jax import storage
from bignlp_jax.checkpoint import load_run_config
from bignlp_jax.cli import main
from bignlp_jax.data.store import remote as remote_store
from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import write_store
from bignlp_jax.data.store.manifest import MANIFEST, TOKENS
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.data.tfds.source import open_split
from bignlp_jax.errors import UserError
from bignlp_jax.train.loop import train

gcs_emulator, gcs_bucket = storage_emulators.gcs_emulator, storage_emulators.gcs_bucket
s3_emulator, s3_bucket = storage_emulators.s3_emulator, storage_emulators.s3_bucket

RNG = np.random.default_rng(7)
DOCS = [np.array([2, *RNG.integers(5, 60000, n), 3]) for n in RNG.integers(0, 90, 60)]


def _upload(local: Path, remote: str) -> str:
    remote_store.publish_store(local, storage.path(remote), MANIFEST)
    return remote


def test_bucket_store_gives_the_rows_of_the_local_store(gcs_bucket, s3_bucket, tmp_path,
                                                        monkeypatch):
    local = write_store(tmp_path / "s", DOCS, dataset="d", split="train",
                        tokenizer_sha256="a" * 64, vocab_size=65000)
    near = TokenStore(local)
    rows_per_epoch = SampleIndex(near, 16, seed=3).rows_per_epoch
    # whole batches, one crossing into the next epoch, one holding the padded last row
    batches = [np.arange(0, 24), np.arange(rows_per_epoch - 5, rows_per_epoch + 7),
               np.array([rows_per_epoch - 1, 3, 3])]
    monkeypatch.setattr(remote_store, "MERGE_GAP_BYTES", 0)  # a request per piece, then merged
    for bucket in (gcs_bucket, s3_bucket):
        far = TokenStore(_upload(local, f"{bucket}/stores/s"), "a" * 64)
        assert far.remote and far.identity == near.identity
        assert np.array_equal(far.tokens[5:40], near.tokens[5:40])
        for seed in (3, None):
            for samples in batches:
                want = SampleIndex(near, 16, seed).rows(samples)
                got = SampleIndex(far, 16, seed).rows(samples)
                assert all(np.array_equal(got[k], want[k]) for k in want), (bucket, samples)
        again = pickle.loads(pickle.dumps(far))  # what a Grain worker process receives
        assert np.array_equal(again.tokens[:9], near.tokens[:9])
        monkeypatch.setattr(remote_store, "MERGE_GAP_BYTES", 1 << 16)


def test_bucket_store_errors_are_one_line(gcs_bucket, tmp_path):
    local = write_store(tmp_path / "s", DOCS, dataset="d", split="train",
                        tokenizer_sha256="a" * 64, vocab_size=65000)
    with pytest.raises(UserError, match=r"no token store at gs://.*/missing \(no manifest"):
        TokenStore(f"{gcs_bucket}/missing", rebuild="bignlp-jax data tokenize --name d")
    remote = storage.path(_upload(local, f"{gcs_bucket}/s"))
    data = (remote / TOKENS).read_bytes()
    (remote / TOKENS).write_bytes(data[:-6])
    with pytest.raises(UserError) as e:
        TokenStore(remote, rebuild="bignlp-jax data tokenize --name d")
    assert f"token store file {remote / TOKENS} is {len(data) - 6} bytes" in str(e.value)
    assert len(str(e.value).splitlines()) == 2
    # flipped bytes are found by `data tokenize` (verify_tokens), which reads the whole store
    (remote / TOKENS).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    TokenStore(remote)  # a training run opens it without reading every byte
    with pytest.raises(UserError, match=r"tokens.bin is corrupt \(sha256"):
        TokenStore(remote, verify_tokens=True)
    # removed while a run reads it (through the loader's prefetch threads): one line
    store = TokenStore(remote)
    batches = StoreBatches({"d": SampleIndex(store, 16, seed=1)}, {"d": 1.0}, global_batch=8,
                           rows=(0, 8), threads=2)
    next(batches)
    (remote / TOKENS).unlink()
    with pytest.raises(UserError, match=r"tokens.bin could not be read: FileNotFoundError"):
        store.tokens[0:4]
    with pytest.raises(UserError, match=r"tokens.bin could not be read"):
        for _ in range(8):  # past the prefetched batches
            next(batches)


def _corpus(tmp_path: Path) -> Path:
    """Text files (this package's config sources, paragraph by paragraph) and a tokenizer."""
    sources = sorted((Path(storage.__file__).parent / "config").glob("*.py"))
    (tmp_path / "text").mkdir()
    for p in sources:
        (tmp_path / "text" / f"{p.stem}.txt").write_text(p.read_text())
    assert main(["tokenizer", "train", "--input", str(tmp_path / "text" / "*.txt"),
                 "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    return tmp_path / "tok"


def _prepare_and_tokenize(data_dir: str, tmp_path: Path, tokenizer: Path) -> list[str]:
    """`data prepare` + `data tokenize` into `data_dir`; returns the tokenize argv."""
    assert main(["data", "prepare", "--input", str(tmp_path / "text" / "*.txt"), "--name",
                 "code_text", "--data-dir", data_dir, "--text-unit", "paragraph"]) == 0
    tokenize = ["data", "tokenize", "--name", "code_text", "--data-dir", data_dir,
                "--tokenizer", str(tokenizer), "--split", "train", "--workers", "1"]
    assert main(tokenize) == 0
    return tokenize


@pytest.mark.slow
def test_tokenize_into_a_bucket_and_train_from_it(gcs_bucket, s3_bucket, tmp_path, capsys):
    tokenizer = _corpus(tmp_path)
    data_dir = f"{gcs_bucket}/datasets"
    assert main(["data", "prepare", "--input", str(tmp_path / "text" / "*.txt"), "--name",
                 "code_text", "--data-dir", data_dir, "--text-unit", "paragraph"]) == 0
    data = ["data.source=tfds", "data.tfds_name=code_text", f"data.tokenizer={tokenizer}",
            "model.vocab_size=400", "data.seq_len=16"]
    # no store in the bucket yet: a run does not build one there, it says what to run
    assert main(["train", "tiny", f"run.dir={tmp_path / 'refused'}", f"data.data_dir={data_dir}",
                 *data]) == 2
    err = capsys.readouterr().err
    assert "no token store for split 'train' of code_text" in err and "Traceback" not in err
    assert f"bignlp-jax data tokenize --name code_text --data-dir {data_dir}" in err

    tokenize = ["data", "tokenize", "--name", "code_text", "--data-dir", data_dir,
                "--tokenizer", str(tokenizer), "--split", "train", "--workers", "1"]
    assert main(tokenize) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[-1])["stores"][0]
    assert built["path"].startswith(f"{data_dir}/token_stores/code_text/train-")
    assert main(tokenize) == 0  # found, and verified whole (sha256 of the bucket's bytes)
    assert "already built and verified" in capsys.readouterr().out

    # from the bucket: 3 steps, then resumed to 5 (prefetching threads); from disk: 5 at once
    bucket_run = [f"data.data_dir={data_dir}", *data, "data.worker_threads=2"]
    train(config(tmp_path / "from_bucket", *bucket_run, "train.steps=3"))
    capsys.readouterr()
    train(config(tmp_path / "from_bucket", *bucket_run, "train.steps=5"))
    assert "training steps 4..5" in capsys.readouterr().out  # resumed, not restarted
    local = storage.fetch_dir(data_dir)  # the same dataset and store, on local disk
    # records of a bucket dataset (task finetuning, tokenizer training): from a local copy
    far, near = (open_split("code_text", d, "validation") for d in (data_dir, local))
    assert len(far) > 0 and [far[i] for i in range(len(far))] == [near[i] for i in range(len(near))]
    train(config(tmp_path / "from_disk", f"data.data_dir={local}", *data, "train.steps=5"))
    assert losses(tmp_path / "from_bucket") == losses(tmp_path / "from_disk")
    assert len(losses(tmp_path / "from_disk")) == 5
    # the same through S3 (moto): prepared, tokenized and read there
    s3_dir = f"{s3_bucket}/datasets"
    _prepare_and_tokenize(s3_dir, tmp_path, tokenizer)
    train(config(tmp_path / "from_s3", f"data.data_dir={s3_dir}", *data, "train.steps=5"))
    assert losses(tmp_path / "from_s3") == losses(tmp_path / "from_disk")
    recorded = load_run_config(tmp_path / "from_bucket").data
    assert recorded.data_dir == data_dir and list(recorded.stores) == ["code_text/train"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme", [pytest.param(s, marks=pytest.mark.required) for s in ("gs", "s3")])
def test_pipeline_into_a_bucket_then_rerun_skips(scheme, request, capsys):
    bucket = request.getfixturevalue({"gs": "gcs_bucket", "s3": "s3_bucket"}[scheme])
    out = f"{bucket}/pipe"
    # tokenizer -> pretrain -> evaluate -> export, every output in the bucket; in-process,
    # so this process's JAX config stays as it is (no compilation cache of the pipeline's)
    args = ["pipeline", "pipelines/mini", f"output_dir={out}", "finetune=null",
            "compilation_cache=null", "pretrain.train.steps=2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    stages = ["tokenizer", "pretrain", "evaluate", "export"]
    for stage in stages:
        assert f"[pipeline] {stage}: done" in first, first[-3000:]
    root = storage.path(out)
    names = {p.name for p in root.iterdir()}
    assert {"pipeline.json", "report.md", "loss_curves.png", *stages} <= names, names
    assert (root / "tokenizer" / "tokenizer.model").is_file()
    assert (root / "export" / "config.json").is_file()
    assert (root / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((root / "pipeline.json").read_text())["stages"]
    assert [state[s]["status"] for s in stages] == ["done"] * 4
    results = json.loads((root / "evaluate" / "results.json").read_text())
    assert results["pretrain"]["step"] == 2
    assert "## Pretraining" in (root / "report.md").read_text()

    assert main(args) == 0  # the rerun finds every stage complete and current in the bucket
    again = capsys.readouterr().out
    for stage in stages:
        assert f"[pipeline] {stage}: complete and current, skipped" in again, again[-3000:]

    # a changed export setting: the old export is set aside inside the bucket, redone there
    assert main([*args, "export.dtype=bfloat16"]) == 0
    changed = capsys.readouterr().out
    assert "[pipeline] export: stale (settings changed); rerunning" in changed, changed[-3000:]
    assert "[pipeline] pretrain: complete and current, skipped" in changed
    moved = [p.name for p in (root / "stale").iterdir()]
    assert len(moved) == 1 and moved[0].startswith("export.")
    assert (root / "stale" / moved[0] / "config.json").is_file()
    assert json.loads((root / "export" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_pipeline_into_a_missing_bucket_is_one_line(gcs_emulator, tmp_path, capsys):
    assert main(["pipeline", "pipelines/mini", "output_dir=gs://no-such-bucket-bignlp/p",
                 "compilation_cache=null"]) == 2
    err = capsys.readouterr().err
    assert "output_dir=gs://no-such-bucket-bignlp/p: bucket gs://no-such-bucket-bignlp does " \
           "not exist" in err, err
    assert "Traceback" not in err and "[pipeline]" not in capsys.readouterr().out
    assert main(["data", "tokenize", "--name", "x", "--data-dir", "gs://no-such-bucket-bignlp/d",
                 "--tokenizer", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir=gs://no-such-bucket-bignlp/d: bucket" in err and "Traceback" not in err
    assert main(["train", "tiny", f"run.dir={tmp_path}", "data.source=tfds",
                 "data.tfds_name=x", "data.data_dir=gs://no-such-bucket-bignlp/d",
                 "data.tokenizer=x"]) == 2
    err = capsys.readouterr().err
    assert "data.data_dir=gs://no-such-bucket-bignlp: bucket gs://no-such-bucket-bignlp does " \
           "not exist" in err and "Traceback" not in err, err
