"""The tiny preset trains on the embedded corpus through TFDS + Grain, and its loss falls."""

import json

import jax
import pytest

from bignlp_jax.checkpoint import load_run_config
from bignlp_jax.config import load_config
from bignlp_jax.data.corpora import embedded
from bignlp_jax.data.tokenizer import load_tokenizer
from bignlp_jax.train.loop import train


@pytest.mark.slow  # a training/compile run end to end: CI's whole suite runs it
def test_tiny_trains_on_embedded_text(tmp_path, embedded_data_dir):
    cfg = load_config("tiny", [f"run.dir={tmp_path / 'run'}", "train.steps=30",
                               "train.global_batch_size=8", "train.log_every=1",
                               "train.eval_every=15", "train.eval_batches=2",
                               "checkpoint.async_save=false"])
    assert cfg.data.source == "tfds" and cfg.data.tfds_name == "stdlib_docs"
    train(cfg, devices=jax.devices()[:1])  # one device: this test is about the data
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and all("eval_perplexity" in r for r in records if "eval_loss" in r)
    assert losses[0] > 6.5  # ~ln(1024) = 6.93: an untrained model
    assert losses[-1] < losses[0] - 0.7  # towards the unigram entropy of the corpus (5.8)
    assert evals[1] < evals[0]
    # The run records the tokenizer it used (the default one, trained on stdlib_docs).
    recorded = load_tokenizer(tmp_path / "run")
    default = load_tokenizer(embedded.embedded_tokenizer(embedded_data_dir, 1024))
    assert recorded.describe() == default.describe()
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())[
        "vocab_size"] == cfg.model.vocab_size
    # ... and the data dir it read: the config said null (the user's cache), config.yaml says where
    assert cfg.data.data_dir is None
    assert load_run_config(tmp_path / "run").data.data_dir == str(embedded_data_dir.absolute())
