"""Token-store loader: packing keeps every token once, batch k is a function of (seed, k) for any
process count, threads or workers, and a saved state resumes in O(1) on another process count."""

import json

import numpy as np
import pytest

from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import write_store
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.errors import UserError

BOS, EOS = 1, 2
B, T = 8, 16


def make_docs(n=37, base=1000):
    """Document i is <s> base*(i+1)+k ... </s>, so every token says which document it is from.
    Lengths 1..40 include documents longer than a row (T=16) and very short ones."""
    return [np.array([BOS, *[base * (i + 1) + k for k in range(1 + (7 * i) % 40)], EOS])
            for i in range(n)]


DOCS = make_docs()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "numbers"
    return TokenStore(write_store(path, DOCS, dataset="numbers", split="train",
                                  tokenizer_sha256="a" * 64, vocab_size=2**16))


def batches(store, rows=(0, B), seed=5, threads=0, workers=0, seq_len=T, **kw):
    index = SampleIndex(store, seq_len, seed)
    return StoreBatches({"numbers": index}, {"numbers": 1.0}, global_batch=B, rows=rows,
                        threads=threads, workers=workers, **kw)


def take(src, n):
    return [next(src) for _ in range(n)]


def hosts(store, n_hosts, steps, state=None, **kw):
    """Global batches read by `n_hosts` simulated processes, each reading its own rows."""
    per = B // n_hosts
    sources = [batches(store, rows=(h * per, (h + 1) * per), **kw) for h in range(n_hosts)]
    for s in sources:
        if state is not None:
            s.set_state(json.loads(json.dumps(state)))
    parts = [take(s, steps) for s in sources]
    return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]}
            for i in range(steps)], sources


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_epoch_packs_every_document_once_with_segments_and_positions(store):
    index = SampleIndex(store, T, seed=5)
    R = index.rows_per_epoch
    assert R == -(-sum(len(d) - 1 for d in DOCS) // T)
    rows = index.rows(np.arange(R))
    order, _ = index.epoch(0)
    assert sorted(order) == list(range(len(DOCS))) and list(order) != list(range(len(DOCS)))
    real = rows["loss_mask"] == 1
    assert real[:-1].all() and not real[-1].all()  # only the epoch's last row is padded
    # Inputs and targets of the real pairs are the documents, whole, in the epoch's order.
    np.testing.assert_array_equal(rows["tokens"][real],
                                  np.concatenate([DOCS[d][:-1] for d in order]))
    np.testing.assert_array_equal(rows["targets"][real],
                                  np.concatenate([DOCS[d][1:] for d in order]))
    for r in range(R):
        seg, pos, tgt = rows["segment_ids"][r], rows["positions"][r], rows["targets"][r]
        seg, pos, tgt = seg[real[r]], pos[real[r]], tgt[real[r]]
        new = np.r_[True, seg[1:] != seg[:-1]]
        assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1}
        np.testing.assert_array_equal(pos == 0, new)  # positions restart for every piece
        np.testing.assert_array_equal(pos[~new], pos[np.flatnonzero(~new) - 1] + 1)
        assert (tgt[np.flatnonzero(new)[1:] - 1] == EOS).all()  # a new piece only after </s>
    assert (rows["segment_ids"][~real] == 0).all() and (rows["tokens"][~real] == 0).all()
    # Sample s is a pure function of s: computed alone it equals the same row computed in bulk,
    # and the next epoch is shuffled anew.
    later = index.rows(np.arange(R, 3 * R))
    for s in (3, R - 1, R + 2, 3 * R - 1):
        one = index.rows(np.array([s]))
        expected, i = (rows, s) if s < R else (later, s - R)
        for k in one:
            np.testing.assert_array_equal(one[k][0], expected[k][i])
    assert list(index.epoch(1)[0]) != list(order)
    # The stored order (held-out streams) is the same every epoch.
    held = SampleIndex(store, T, seed=None)
    np.testing.assert_array_equal(held.rows(np.array([0]))["tokens"],
                                  held.rows(np.array([held.rows_per_epoch]))["tokens"])
    first = held.rows(np.array([0]))["tokens"][0]
    assert first.tolist() == np.concatenate([d[:-1] for d in DOCS])[:T].tolist()


def test_index_cache_is_reused_and_independent_of_row_length(store, monkeypatch):
    from bignlp_jax.data.store import sample_index

    monkeypatch.setattr(sample_index, "CACHE_MIN_DOCUMENTS", 1)
    a = SampleIndex(store, T, seed=9)
    order, ends = a.epoch(0)
    cached = sorted(p.name for p in (store.path / "index").glob("seed9-epoch0-*.npy"))
    assert len(cached) == 2
    b = SampleIndex(store, 2 * T, seed=9)  # another seq_len reads the same document index
    np.testing.assert_array_equal(b.epoch(0)[0], order)
    np.testing.assert_array_equal(b.epoch(0)[1], ends)
    # a fresh index reads the cached arrays (memory-mapped), not a new permutation
    cached_order = SampleIndex(store, T, seed=9).epoch(0)[0]
    assert isinstance(cached_order, np.memmap)
    np.testing.assert_array_equal(cached_order, order)


@pytest.mark.parametrize("n_hosts", [2, 4])
def test_same_global_batches_for_any_process_count_and_threads(store, n_hosts):
    reference = take(batches(store), 12)
    assert_same(take(batches(store, threads=2), 12), reference)
    assert_same(hosts(store, n_hosts, 12, threads=1)[0], reference)
    assert not np.array_equal(next(batches(store, seed=6))["tokens"], reference[0]["tokens"])


@pytest.mark.slow  # spawns two Grain worker processes (~10 s on 2 cores)
def test_same_global_batches_with_worker_processes(store):
    reference = take(batches(store), 6)
    second_host = take(batches(store, rows=(4, 8), workers=2), 6)
    assert_same(second_host, [{k: v[4:] for k, v in b.items()} for b in reference])


@pytest.mark.parametrize("restore_hosts", [1, 4])
def test_state_saved_by_two_processes_restores_on_one_and_four(store, restore_hosts):
    k = 5
    full = take(batches(store), k + 6)
    _, two = hosts(store, 2, k)
    state = two[0].get_state()
    assert state["step"] == k and two[1].get_state() == state  # the same on every process
    resumed, _ = hosts(store, restore_hosts, 6, state=state)
    assert_same(resumed, full[k:])


def test_restore_at_step_ten_million_is_immediate_and_exact(store):
    src = batches(store)
    state = src.get_state() | {"step": 10_000_000}
    src.set_state(state)
    direct = SampleIndex(store, T, 5).rows(10_000_000 * B + np.arange(B))
    assert_same([next(src)], [direct])
    assert src.get_state()["step"] == 10_000_001


def test_state_refuses_another_seed_or_store(store, tmp_path):
    state = batches(store).get_state()
    with pytest.raises(UserError, match=r"seed 5.*seed 6"):
        batches(store, seed=6).set_state(state)
    other = TokenStore(write_store(tmp_path / "other", DOCS[:-1], dataset="numbers",
                                   split="train", tokenizer_sha256="a" * 64, vocab_size=2**16))
    with pytest.raises(UserError, match="cannot resume the data stream"):
        batches(other).set_state(state)
    with pytest.raises(UserError, match="was not written by the token-store loader"):
        batches(store).set_state({"version": 1, "step": 3, "lanes": []})


def test_embedded_corpus_batches_deterministic(embedded_data_dir):
    from bignlp_jax.config import load_config
    from bignlp_jax.data import make_source

    def cfg(*extra):
        return load_config("tiny", [f"data.data_dir={embedded_data_dir}",
                                    "train.global_batch_size=8", *extra])

    one = take(make_source(cfg("data.worker_threads=0"), "train", (0, 8)), 4)
    two = take(make_source(cfg("data.worker_threads=2"), "train", (0, 8)), 4)
    assert_same(one, two)
    parts = [take(make_source(cfg(), "train", rows), 4) for rows in ((0, 4), (4, 8))]
    assert_same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], one)
    batch = one[0]
    assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == np.int32
    assert batch["tokens"].max() < 1024 and (batch["tokens"][:, 0] >= 0).all()
    assert batch["loss_mask"].all() and (batch["positions"][:, 0] == 0).all()
    # Resuming with another seq_len is allowed (the index does not depend on it).
    src = make_source(cfg("data.seq_len=32"), "train", (0, 8))
    src.set_state(json.loads(json.dumps(make_source(cfg(), "train", (0, 8)).get_state())))
    # The held-out stream is the same every time the loop evaluates.
    assert_same(take(make_source(cfg(), "validation", (0, 8)), 2),
                take(make_source(cfg(), "validation", (0, 8)), 2))


def test_data_bench_reports_loader_speed_as_json(embedded_data_dir, capsys):
    from bignlp_jax.cli import main

    assert main(["data", "bench", "tiny", f"data.data_dir={embedded_data_dir}", "--steps", "3",
                 "--start-step", "1000000"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_per_sec"] > 0 and result["rows_per_sec"] > 0
    assert result["first_batch_s"] > 0 and result["start_step"] == 1_000_000
    assert result["steps"] == 3 and result["rows"] == [0, 16]  # tiny: global batch 16


def test_checkpoint_files_of_two_processes_restore_on_one_and_four(store, tmp_path, monkeypatch):
    """Through the checkpoint's per-process JSON files, as `start_state` restores them."""
    import jax

    from bignlp_jax.checkpoint.handlers import ProcessJsonHandler, ProcessJsonSave

    k = 6
    full = take(batches(store), k + 3)
    _, two = hosts(store, 2, k)
    handler = ProcessJsonHandler()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for i, src in enumerate(two):
        monkeypatch.setattr(jax, "process_index", lambda i=i: i)
        handler.save(tmp_path, ProcessJsonSave(src.get_state()))
    for count in (1, 4):
        monkeypatch.setattr(jax, "process_count", lambda count=count: count)
        parts = []
        for i in range(count):
            monkeypatch.setattr(jax, "process_index", lambda i=i: i)
            src = batches(store, rows=(i * B // count, (i + 1) * B // count))
            src.set_state(handler.restore(tmp_path))
            parts.append(take(src, 3))
        assert_same([{key: np.concatenate([p[n][key] for p in parts]) for key in parts[0][n]}
                     for n in range(3)], full[k:])
