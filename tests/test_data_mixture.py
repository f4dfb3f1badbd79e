"""Dataset mixtures: exact per-batch quotas, rows read by index from each store, exact resume on
another process count, and per-dataset evaluation."""

import json

import numpy as np
import pytest

from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import write_store
from bignlp_jax.data.store.mixture import MixturePlan
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.errors import UserError

B, T = 8, 16


@pytest.mark.parametrize("weights,batch", [((0.5, 0.3, 0.2), 8), ((7, 2, 1), 16),
                                           ((1 / 3, 1 / 3, 1 / 3), 12), ((0.9, 0.1), 10)])
def test_any_hundred_consecutive_batches_hold_the_weights_within_one_percent(weights, batch):
    plan = MixturePlan(["a", "b", "c"][:len(weights)], list(weights), batch)
    share = np.asarray(weights) / sum(weights)
    for start in [*range(0, 400, 13), 10_000_000]:
        counts = np.zeros(len(weights))
        for k in range(start, start + 100):
            quota = [count for _, _, count in plan.batch(k)]
            assert sum(quota) == batch and min(quota) >= 0
            counts += quota
        assert np.all(np.abs(counts / (100 * batch) - share) <= 0.01), (start, counts)
        # and cumulatively the count never strays a row from the exact share
        assert np.all(np.abs(np.asarray(plan.cumulative(start)) - share * start * batch) < 1)


def test_weight_below_one_row_per_batch_is_refused():
    with pytest.raises(UserError, match="'b' has weight 0.01 .* at least 1 row per batch"):
        MixturePlan(["a", "b"], [0.99, 0.01], 8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    docs = {"low": [np.array([1, *range(1000 * i + 10, 1000 * i + 10 + (5 * i) % 23), 2])
                    for i in range(1, 30)],
            "high": [np.array([1, *range(40_000 + 100 * i, 40_000 + 100 * i + 3 + i % 9), 2])
                     for i in range(40)]}
    return {name: TokenStore(write_store(root / name, d, dataset=name, split="train",
                                         tokenizer_sha256="c" * 64, vocab_size=2**16))
            for name, d in docs.items()}


def mixture(stores, rows=(0, B), weights=(0.75, 0.25), seed=3):
    indexes = {n: SampleIndex(s, T, seed) for n, s in stores.items()}
    return StoreBatches(indexes, dict(zip(stores, weights)), global_batch=B, rows=rows)


def test_mixture_rows_come_from_each_store_in_quota(stores):
    src = mixture(stores)
    indexes = {n: SampleIndex(s, T, 3) for n, s in stores.items()}
    seen = {"low": 0, "high": 0}
    for k in range(40):
        batch = next(src)
        row = 0
        for d, first, count in src.plan.batch(k):
            name = src.names[d]
            expected = indexes[name].rows(first + np.arange(count))
            for key in batch:
                np.testing.assert_array_equal(batch[key][row:row + count], expected[key])
            body = batch["tokens"][row:row + count]
            body = body[body > 2]  # without <s>, </s>, padding
            assert ((body >= 40_000) == (name == "high")).all()
            seen[name] += count
            row += count
    assert seen == {"low": 240, "high": 80}


@pytest.mark.parametrize("restore_hosts", [1, 4])
def test_mixture_resumes_exactly_on_another_process_count(stores, restore_hosts):
    k = 7
    reference = mixture(stores)
    full = [next(reference) for _ in range(k + 5)]
    saved = [mixture(stores, rows=r) for r in ((0, 4), (4, 8))]
    for s in saved:
        for _ in range(k):
            next(s)
    state = json.loads(json.dumps(saved[1].get_state()))
    per = B // restore_hosts
    resumed = [mixture(stores, rows=(h * per, (h + 1) * per)) for h in range(restore_hosts)]
    for s in resumed:
        s.set_state(state)
    for i in range(5):
        parts = [next(s) for s in resumed]
        for key in full[0]:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                          full[k + i][key], err_msg=key)
    with pytest.raises(UserError, match="weight 0.75.*weight 0.5"):
        mixture(stores, weights=(0.5, 0.5)).set_state(state)


def mixture_config(tmp_path, data_dir, *extra):
    from helpers import TINY_MODEL

    from bignlp_jax.config import load_config

    return load_config("tiny", [
        f"run.dir={tmp_path / 'run'}", f"data.data_dir={data_dir}", *TINY_MODEL,
        "model.vocab_size=1024", "model.max_seq_len=32", "data.seq_len=32",
        "data.tfds_name=null",
        "data.mixture={stdlib_docs: 0.75, stdlib_modules: {weight: 0.25, text_key: text}}",
        "train.global_batch_size=8", *extra])


def test_evaluation_reports_eval_loss_per_dataset_from_streams_built_once(tmp_path,
                                                                          embedded_data_dir):
    import jax

    from bignlp_jax.model import abstract_params
    from bignlp_jax.train.loop import Trainer

    cfg = mixture_config(tmp_path, embedded_data_dir)
    trainer = Trainer.build(cfg)
    rng = np.random.default_rng(0)  # random weights without compiling the initialiser
    params = jax.device_put(jax.tree.map(
        lambda a: rng.normal(0, 0.5, a.shape).astype(a.dtype), abstract_params(cfg.model)),
        trainer.state_sh.params)
    first = trainer.evaluate(params, 2)
    assert set(first) == {"eval_loss/stdlib_docs", "eval_loss/stdlib_modules", "eval_loss",
                          "eval_perplexity"}
    a, b = first["eval_loss/stdlib_docs"], first["eval_loss/stdlib_modules"]
    assert min(a, b) < first["eval_loss"] < max(a, b)  # the total weighs both sets' tokens
    streams = dict(trainer._eval)
    assert trainer.evaluate(params, 2) == first  # rewound: the same batches every time
    assert all(trainer._eval[n][0] is streams[n][0] for n in streams)


@pytest.mark.slow
def test_train_with_mixture_logs_per_dataset_eval_loss(tmp_path, embedded_data_dir):
    from bignlp_jax.train.loop import train

    train(mixture_config(tmp_path, embedded_data_dir, "train.steps=2", "train.eval_every=2",
                         "train.eval_batches=1", "checkpoint.every_steps=0"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {"eval_loss/stdlib_docs", "eval_loss/stdlib_modules"} <= set(records[-1])
