"""Sharded token stores: shards read as one corpus, a single-store directory is a store of one
shard, the two-level index packs every pair once per epoch and touches only the shards its rows
need, and manifests, chunk checksums and stop requests guard what is read."""

import json
import os
import signal

import numpy as np
import pytest

from bignlp_jax.checkpoint.preemption import StopRequest
from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import write_store
from bignlp_jax.data.store.manifest import MANIFEST, TOKENS
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.shard_files import write_sharded_manifest
from bignlp_jax.data.store.shards import ShardedStore, shard_entry
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.errors import Preempted, UserError

T = 16
# Document i: <s> 1000*(i+1)+k ... </s>, lengths 3..42: every token names its document.
DOCS = [np.array([1, *[1000 * (i + 1) + k for k in range(1 + (7 * i) % 40)], 2])
        for i in range(61)]


def make(tmp_path, name="s", shard_tokens=200, docs=DOCS):
    return write_store(tmp_path / name, docs, dataset="numbers", split="train",
                       tokenizer_sha256="a" * 64, vocab_size=2**16, shard_tokens=shard_tokens)


def all_pairs(docs):
    return sorted((int(d[k]), int(d[k + 1])) for d in docs for k in range(len(d) - 1))


def epoch_pairs(index, e):
    rows = index.rows(np.arange(e * index.rows_per_epoch, (e + 1) * index.rows_per_epoch))
    keep = rows["loss_mask"] > 0
    return sorted(zip(rows["tokens"][keep].tolist(), rows["targets"][keep].tolist())), rows


def test_shards_hold_the_documents_bounded_and_in_order(tmp_path):
    store = ShardedStore(make(tmp_path), "a" * 64)
    assert len(store.shards) > 5 and store.num_documents == len(DOCS)
    docs = []
    for j, shard in enumerate(store.shards):
        opened = store.shard(j)
        assert shard.tokens <= 200 or shard.documents == 1
        docs += [np.asarray(opened.tokens[a:b]) for a, b in zip(opened.offsets[:-1],
                                                                 opened.offsets[1:])]
    assert all((a == b).all() for a, b in zip(docs, DOCS)) and len(docs) == len(DOCS)
    # a directory in the single-store layout is a store of one shard, with its identity
    single = make(tmp_path, "single", shard_tokens=None)
    one = ShardedStore(single)
    assert len(one.shards) == 1 and one.identity == TokenStore(single).identity


def test_adding_a_shard_keeps_the_others_and_changes_the_identity(tmp_path):
    path = make(tmp_path, docs=DOCS[:40])
    before = ShardedStore(path)
    extra = make(tmp_path, "extra", docs=DOCS[40:])
    manifest = json.loads((path / MANIFEST).read_text())
    entries = list(manifest["shards"])
    for e in json.loads((extra / MANIFEST).read_text())["shards"]:
        name = f"shard-b{e['name'][6:]}"
        os.rename(extra / e["name"], path / name)
        entries.append({**e, "name": name})
    info = {k: v for k, v in manifest.items() if k not in ("format", "documents", "tokens",
                                                          "shards")}
    write_sharded_manifest(path, entries, info)
    after = ShardedStore(path)
    assert after.shards[:len(before.shards)] == before.shards
    assert after.num_documents == len(DOCS) and after.identity != before.identity
    # the added shards are complete stores of their own
    assert shard_entry("x", after.shard(len(entries) - 1).manifest)["identity"] == \
        entries[-1]["identity"]


def test_two_level_index_packs_every_pair_once_per_epoch(tmp_path):
    store = ShardedStore(make(tmp_path))
    index = SampleIndex(store, T, seed=7)
    first, rows = epoch_pairs(index, 0)
    assert first == all_pairs(DOCS)
    second, _ = epoch_pairs(index, 1)
    assert second == first
    # epochs order shards (and documents in them) differently
    assert index._order(0)[0].tolist() != index._order(1)[0].tolist()
    # sample s is a pure function of (seed, s): another index, other groupings, same rows
    other = SampleIndex(ShardedStore(store.path), T, seed=7)
    samples = np.array([5, index.rows_per_epoch + 3, 0, 2 * index.rows_per_epoch - 1])
    got = other.rows(samples)
    for i, s in enumerate(samples):
        one = index.rows(np.array([s]))
        for k in got:
            np.testing.assert_array_equal(got[k][i], one[k][0])
    # a row never mixes shards: its documents all come from one shard's ids
    assert (rows["segment_ids"][:, 0] == 1).all()


def test_index_opens_only_the_shards_its_rows_touch(tmp_path):
    index = SampleIndex(ShardedStore(make(tmp_path)), T, seed=3)
    index.rows(np.arange(2))
    assert len(index.store._open) == 1 and len(index.store.shards) > 5


def test_single_shard_order_is_the_single_store_order(tmp_path):
    path = make(tmp_path, shard_tokens=None)
    a, b = SampleIndex(TokenStore(path), T, seed=5), SampleIndex(ShardedStore(path), T, seed=5)
    samples = np.arange(3 * a.rows_per_epoch)
    for k, v in a.rows(samples).items():
        np.testing.assert_array_equal(v, b.rows(samples)[k])
    # the layout of one shard: epoch 0's documents in the order drawn from (seed, 0)
    order = np.random.default_rng([5, 0]).permutation(len(DOCS))
    np.testing.assert_array_equal(a.epoch(0)[0], order)


def test_mixture_of_sharded_stores_keeps_quotas_and_resumes_anywhere(tmp_path):
    sharded = SampleIndex(ShardedStore(make(tmp_path)), T, seed=1)
    single = SampleIndex(ShardedStore(make(tmp_path, "one", shard_tokens=None)), T, seed=2)

    def source(rows):
        return StoreBatches({"a": sharded, "b": single}, {"a": 0.75, "b": 0.25},
                            global_batch=8, rows=rows)

    whole = source((0, 8))
    batches = [next(whole) for _ in range(6)]
    for k in range(len(batches)):
        counts = [c for _, _, c in whole.plan.batch(k)]
        assert counts == [6, 2]
    state = json.loads(json.dumps(whole.get_state()))
    resumed = [source((h * 2, h * 2 + 2)) for h in range(4)]
    for s in resumed:
        s.set_state({**state, "step": 3})
    for k in range(3, 6):
        parts = [s.batch(k) for s in resumed]
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]),
                                      batches[k]["tokens"])


@pytest.mark.parametrize("name", ["../outside", "/dev/zero", "shard-../../x", "tokens.bin"])
def test_manifest_naming_anything_but_its_shards_is_refused_in_one_line(tmp_path, name):
    path = make(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["shards"][0]["name"] = name
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        ShardedStore(path)
    assert f"names {name!r}, not a shard folder" in str(e.value)
    assert len(str(e.value).splitlines()) == 2 and "fix:" in str(e.value)


def test_shard_manifest_naming_other_files_or_a_symlink_out_is_refused(tmp_path):
    path = make(tmp_path)
    shard = path / "shard-00000"
    manifest = json.loads((shard / MANIFEST).read_text())
    manifest["sha256"]["/dev/zero"] = manifest["sha256"].pop(TOKENS)
    (shard / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="names the files .*/dev/zero.*nothing else is read"):
        ShardedStore(path).shard(0)
    outside = make(tmp_path, "outside", shard_tokens=None)
    os.remove(path / "shard-00001" / TOKENS)
    os.symlink(outside / TOKENS, path / "shard-00001" / TOKENS)
    with pytest.raises(UserError, match="leads outside its folder"):
        ShardedStore(path).shard(1)
    os.rename(path / "shard-00002", tmp_path / "moved")
    os.symlink(tmp_path / "moved", path / "shard-00002")
    with pytest.raises(UserError, match="leads outside its folder"):
        ShardedStore(path)


def flip(file, offset, mask=0x01):
    st = os.stat(file)
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # what media corruption looks like


def test_flipped_byte_with_unchanged_mtime_is_caught_when_read(tmp_path):
    path = make(tmp_path, shard_tokens=None)
    store = TokenStore(path)
    store.pairs(np.arange(10))  # checked and read once
    rng = np.random.default_rng(0)
    for _ in range(20):  # 20 single-bit flips anywhere in the tokens
        offset = int(rng.integers(os.path.getsize(path / TOKENS)))
        mask = 1 << int(rng.integers(8))
        flip(path / TOKENS, offset, mask)
        fresh = TokenStore(path, rebuild="REBUILD")  # opening is O(documents): no hashing
        with pytest.raises(UserError, match=f"{TOKENS} is corrupt .*\n  fix: rebuild it: REBUILD"):
            fresh.pairs(np.arange(len(fresh.tokens) - 1))
        flip(path / TOKENS, offset, mask)  # repaired for the next trial


def test_token_id_outside_the_vocabulary_is_refused(tmp_path):
    path = write_store(tmp_path / "v", DOCS[:3], dataset="numbers", split="train",
                       tokenizer_sha256="a" * 64, vocab_size=1500)
    with pytest.raises(UserError, match="token id 3014 in chunk 0 is not below the vocabulary "
                                        "size 1500"):
        TokenStore(path).pairs(np.arange(3))


def test_sigterm_during_store_verification_ends_promptly(tmp_path):
    path = make(tmp_path)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        with pytest.raises(Preempted, match="SIGTERM received while verifying token store"):
            ShardedStore(path, verify_tokens=True).shard(0)
    ShardedStore(path, verify_tokens=True).shard(0)  # outside a run: verified in full


@pytest.mark.multiprocess
def test_processes_read_a_sharded_store_and_resume_on_1_and_4(tmp_path, embedded_data_dir):
    """2 processes read the tiny preset's stream from a sharded store; its state after 3
    batches resumes on 1 and on 4 processes with the same next batches."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from bignlp_jax.cli import main

    data = tmp_path / "data"
    for part in ("stdlib_docs", "tokenizers"):
        shutil.copytree(embedded_data_dir / part, data / part)
    tokenizer = str(data / "tokenizers" / "stdlib_docs_bpe_1024")
    assert main(["data", "tokenize", "--name", "stdlib_docs", "--data-dir", str(data),
                 "--tokenizer", tokenizer, "--split", "train", "--shard-tokens", "50000",
                 "--workers", "1"]) == 0
    worker = Path(__file__).with_name("store_reader_worker.py")

    def start(n, first, steps, state=None):
        outs = [tmp_path / f"{n}-{first}-{i}.npz" for i in range(n)]
        return outs, [subprocess.Popen(
            [sys.executable, str(worker), str(data), str(i), str(n), str(first), str(steps),
             str(out), *([str(state)] if state else [])]) for i, out in enumerate(outs)]

    def result(job):
        outs, procs = job
        assert [p.wait(timeout=300) for p in procs] == [0] * len(procs)
        parts = [np.load(o) for o in outs]
        assert all((p["states"] == parts[0]["states"]).all() for p in parts)  # one state
        return ({k: np.concatenate([p[k] for p in parts], axis=1)
                 for k in ("tokens", "segments")}, parts[0]["states"])

    two, states = result(start(2, 0, 5))
    state = tmp_path / "state.json"
    state.write_text(str(states[2]))  # after 3 batches
    assert json.loads(str(states[2]))["step"] == 3
    jobs = {n: start(n, 3, 2, state) for n in (1, 4)}  # both at once
    for job in jobs.values():
        resumed, _ = result(job)
        for k in resumed:
            np.testing.assert_array_equal(resumed[k], two[k][3:])
    store = ShardedStore(next((data / "token_stores" / "stdlib_docs").glob("train-*")))
    assert len(store.shards) > 3  # the stream really came from a sharded store


def test_raw_files_build_a_store_a_run_reads_with_data_store(tmp_path, embedded_data_dir, capsys):
    import gzip

    from bignlp_jax.cli import main
    from bignlp_jax.config import load_config
    from bignlp_jax.data import make_source
    from bignlp_jax.data.run_identity import with_store_identities

    raw = tmp_path / "raw"
    raw.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for f in range(3):
        with gzip.open(raw / f"{f}.jsonl.gz", "wt") as out:
            for i in range(60):
                out.write(json.dumps({"text": " ".join(words[: 1 + (i + f) % 8] * 4)}) + "\n")
    (raw / "notes.txt").write_text("first document\n\nsecond document\n")
    tokenizer = str(embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024")
    store = tmp_path / "store"
    args = ["data", "tokenize", "--name", "words", "--input", str(raw / "*.jsonl.gz"),
            "--input", str(raw / "*.txt"), "--text-unit", "paragraph", "--out", str(store),
            "--tokenizer", tokenizer, "--shard-tokens", "1000"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"]
    assert summary["documents"] == 3 * 60 + 2 and summary["built_inputs"] == 4
    assert summary["shards"] > 4  # bounded shards: several per input
    # a corpus that grows: only the new file is built, the manifest lists it too
    (raw / "more.txt").write_text("third document\n")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["store"]
    assert (summary["built_inputs"], summary["reused_inputs"]) == (1, 4)
    assert summary["documents"] == 3 * 60 + 3

    cfg = load_config("tiny", [f"data.store={store}", f"data.tokenizer={tokenizer}",
                               "data.tfds_name=null", "data.seq_len=32", "train.global_batch_size=8",
                               f"run.dir={tmp_path / 'run'}"])
    source = make_source(cfg, "train", (0, 8))
    expected = SampleIndex(ShardedStore(store), 32, cfg.run.seed).rows(np.arange(8))
    np.testing.assert_array_equal(next(source)["tokens"], expected["tokens"])
    recorded = with_store_identities(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"eval_every": 0})}))
    assert recorded.data.stores == {"store/train": ShardedStore(store).identity}
    with pytest.raises(UserError, match="a held-out stream needs data.eval_store"):
        make_source(cfg, "validation", (0, 8))


def test_crafted_manifest_exits_2_in_one_line_reading_nothing(tmp_path, embedded_data_dir,
                                                               capsys):
    from bignlp_jax.cli import main

    tokenizer = embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024"
    path = make(tmp_path)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["shards"][0]["name"] = "/dev/zero"
    (path / MANIFEST).write_text(json.dumps(manifest))
    code = main(["data", "bench", "tiny", f"data.store={path}", f"data.tokenizer={tokenizer}",
                 "data.tfds_name=null", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "names '/dev/zero', not a shard folder" in err
    assert "Traceback" not in err and len(err.splitlines()) == 2  # the problem, the fix


@pytest.mark.parametrize("shard_tokens", [None, 200])
def test_bit_flip_campaign_every_flip_that_changes_rows_is_caught(tmp_path, shard_tokens):
    """40 single-bit flips at random offsets of a store's files (one shard; or the manifest and
    the files of 6+ shards), mtimes restored: each is refused in a readable message or changes
    nothing a run reads."""
    path = make(tmp_path, shard_tokens=shard_tokens)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    rows_per_epoch = SampleIndex(ShardedStore(path), T, seed=1).rows_per_epoch
    samples = np.arange(2 * rows_per_epoch)
    clean = SampleIndex(ShardedStore(path), T, seed=1).rows(samples)
    rng = np.random.default_rng(1)
    outcomes = {"refused": 0, "harmless": 0}
    for _ in range(int(os.environ.get("FLIPS", 40))):
        file = files[int(rng.integers(len(files)))]
        offset = int(rng.integers(os.path.getsize(file)))
        mask = 1 << int(rng.integers(8))
        flip(file, offset, mask)
        try:
            index = SampleIndex(ShardedStore(path, rebuild="REBUILD"), T, seed=1)
            assert index.rows_per_epoch == rows_per_epoch
            rows = index.rows(samples)
        except UserError as e:
            assert str(e).splitlines()[-1] in ("  fix: rebuild it: REBUILD",
                                               "  fix: build it: REBUILD"), str(e)
            outcomes["refused"] += 1
        else:
            for k, v in clean.items():  # not refused: nothing it reads changed
                np.testing.assert_array_equal(rows[k], v, err_msg=f"{file} byte {offset}")
            outcomes["harmless"] += 1
        flip(file, offset, mask)
    assert outcomes["refused"] >= 20, outcomes
