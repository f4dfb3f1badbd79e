"""Finetuning: starts from the pretrained parameters, counts only target tokens, scores labels
by log-likelihood, reads tasks deterministically, and refuses bad input with clear messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bignlp_jax.config import ModelConfig, load_config
from bignlp_jax.config.schema import TaskConfig
from bignlp_jax.data.tasks.formats import TaskFormat, make_row, stack_rows
from bignlp_jax.data.tasks.source import TaskBatches
from bignlp_jax.errors import UserError
from bignlp_jax.evaluate.scoring import label_log_likelihoods, sequence_log_likelihood
from bignlp_jax.model import abstract_params, init_params

SMALL = ["model.vocab_size=512", "model.num_layers=1", "model.hidden=32", "model.num_heads=2",
         "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=64",
         "train.global_batch_size=8", "train.steps=2", "data.tokenizer=null"]


class CharTokenizer:
    """Hand-made tokenizer: 0 pad, 1 <s>, 2 </s>, 3 <sep>, then one id per character."""

    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3
    CHARS = "abcx"

    def encode(self, text):
        return [4 + self.CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.CHARS[i - 4] for i in ids if i >= 4)


def classification(labels=("a", "bb", "c"), template="{text}"):
    return TaskConfig(type="classification", template=template, labels=list(labels))


def finetune_config(tmp_path, *overrides):
    return load_config("finetune_stdlib_modules",
                       [f"run.dir={tmp_path / 'ft'}", *SMALL, *overrides])


# -- formats: loss on target tokens only ------------------------------------------------------
def test_rows_weight_only_the_target():
    fmt = TaskFormat(classification(), CharTokenizer(), seq_len=12)
    prompt, target = fmt.example({"text": b"xax", "label": b"bb"})
    assert prompt == [1, 7, 4, 7, 3] and target == [5, 5, 2]  # <s> x a x <sep> | b b </s>
    row = make_row(prompt, target, 12)
    # targets are the sequence shifted by one; only b, b, </s> are counted
    assert row["targets"][:7].tolist() == [7, 4, 7, 3, 5, 5, 2]
    assert row["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1] * 7 + [0] * 5
    # a prompt too long for the row loses its end; the target is kept whole
    long_prompt, _ = fmt.example({"text": b"x" * 30, "label": b"c"})
    assert len(long_prompt) + 2 == 12 + 1 and long_prompt[-1] == 3


@pytest.mark.slow
def test_loss_counts_target_tokens_only():
    from bignlp_jax.train.step import loss_sums

    cfg = load_config(None, SMALL + ["model.vocab_size=16", "data.seq_len=16"])
    params = init_params(cfg.model, jax.random.key(0))
    fmt = TaskFormat(classification(), CharTokenizer(), seq_len=cfg.data.seq_len)
    loss_fn = jax.jit(lambda p, batch: loss_sums(p, batch, cfg))

    def loss(record, scramble_prompt_targets=False):
        batch = stack_rows([make_row(*fmt.example(record), cfg.data.seq_len)])
        if scramble_prompt_targets:  # targets the mask ignores: the prompt's own next tokens
            batch["targets"] = np.where(batch["loss_mask"] > 0, batch["targets"], 7)
        total, count = loss_fn(params, batch)
        return float(total), float(count)

    base, count = loss({"text": b"xaxc", "label": b"a"})
    assert count == 2  # "a" and </s>
    assert loss({"text": b"xaxc", "label": b"a"}, scramble_prompt_targets=True)[0] == base
    assert loss({"text": b"xaxc", "label": b"c"})[0] != base  # another target, another loss
    assert loss({"text": b"xaxc", "label": b"bb"})[1] == 3


# -- label scoring on a hand-made model -------------------------------------------------------
def constant_logits_model(logits):
    """A model whose output is `logits` at every position, whatever the input: every weight is
    zero, so the final LayerNorm outputs its bias e0 and the LM head row 0 holds `logits`."""
    cfg = ModelConfig(vocab_size=len(logits), num_layers=1, hidden=4, num_heads=1, mlp_dim=4,
                      max_seq_len=16, tie_embeddings=False)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(cfg))
    params["final_norm"]["bias"] = jnp.asarray([1.0, 0, 0, 0])
    params["lm_head"] = jnp.zeros((4, len(logits))).at[0].set(jnp.asarray(logits))
    return cfg, params


_score = jax.jit(sequence_log_likelihood, static_argnums=0)  # one compile for every case


@pytest.mark.parametrize("logits,best", [
    # ids: 0 pad, 1 <s>, 2 </s>, 3 <sep>, 4 a, 5 b, 6 c, 7 x
    ([0, 0, 1, 0, 0.5, 3.0, 1.0, 0], "bb"),  # 2 log p(b) beats log p(c) and log p(a)
    ([0, 0, 1, 0, 0.5, 1.0, 2.5, 0], "c"),   # b's two tokens now cost more than c's one
    ([0, 0, 1, 0, 2.0, 1.9, 1.9, 0], "a"),
])
def test_label_scoring_picks_highest_log_likelihood(logits, best):
    cfg, params = constant_logits_model(logits)
    fmt = TaskFormat(classification(), CharTokenizer(), seq_len=10)
    records = [{"text": b"xa", "label": b"a"}, {"text": b"cxxb", "label": b"c"}]
    scores = label_log_likelihoods(lambda rows: np.asarray(_score(cfg, params, rows)), fmt,
                                   records, batch_rows=4, local=(0, 4))
    log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
    # by hand: sum of log p over the label's characters, plus log p(</s>)
    expected = [log_p[4] + log_p[2], 2 * log_p[5] + log_p[2], log_p[6] + log_p[2]]
    np.testing.assert_allclose(scores, [expected, expected], rtol=1e-5)
    assert [("a", "bb", "c")[i] for i in scores.argmax(axis=1)] == [best, best]


def test_text_to_text_generation_and_scores():
    from bignlp_jax.evaluate import metrics
    from bignlp_jax.evaluate.scoring import generate_targets

    # the model always prefers b, then </s>: greedy answers are "bbb" (max_target_tokens=3)
    cfg, params = constant_logits_model([0, 0, 1, 0, 0.5, 3.0, 1.0, 0])
    task = TaskConfig(type="text_to_text", template="{input}", target_key="target",
                      max_target_tokens=3)
    fmt = TaskFormat(task, CharTokenizer(), seq_len=12)
    records = [{"input": b"xa", "target": b"bbb"}, {"input": b"cab", "target": b"ab"}]
    prompt, target = fmt.example(records[1])
    assert prompt == [1, 6, 4, 5, 3] and target == [4, 5, 2]
    answers = generate_targets(cfg, params, fmt, records, batch_size=2)
    assert answers == ["bbb", "bbb"]
    gold = [fmt.target_text(r) for r in records]
    assert metrics.exact_match(answers, gold) == 0.5


# -- the task batch source --------------------------------------------------------------------
def test_task_batches_deterministic_and_split_by_rows():
    fmt = TaskFormat(classification(), CharTokenizer(), seq_len=8)
    records = [{"text": "abcx"[i % 4].encode(), "label": b"a"} for i in range(11)]

    def make(rows=(0, 4), seed=3):
        return TaskBatches(records, fmt, seq_len=8, global_batch=4, rows=rows, seed=seed)

    a, b = make(), make()
    first = [next(a)["tokens"] for _ in range(5)]  # 20 rows: crosses an epoch boundary
    assert all((x == next(b)["tokens"]).all() for x in first)
    # two "processes" reading rows [0, 2) and [2, 4) see exactly the global batch
    lo, hi = make((0, 2)), make((2, 4))
    for x in first:
        assert (np.concatenate([next(lo)["tokens"], next(hi)["tokens"]]) == x).all()
    # resume: the state is the step; another seed gives another order
    c = make()
    c.set_state(make().get_state() | {"step": 3})
    assert (next(c)["tokens"] == first[3]).all()
    assert any((next(make(seed=4))["tokens"] != first[0]).ravel())
    # each epoch holds every record once
    slots = [make().example_index(i) for i in range(22)]
    assert sorted(slots[:11]) == list(range(11)) == sorted(slots[11:])
    # held-out: stored order, one pass, the last batch padded with empty rows
    held = TaskBatches(records, fmt, seq_len=8, global_batch=4, rows=(0, 4), seed=None)
    batches = list(held)
    assert len(batches) == 3 and batches[2]["segment_ids"][3].sum() == 0


# -- finetuning from a pretrained checkpoint --------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' run: a fresh state from seed 7, saved as its final checkpoint."""
    from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
    from bignlp_jax.train.loop import Trainer

    run_dir = tmp_path_factory.mktemp("pretrained") / "pre"
    cfg = load_config(None, [f"run.dir={run_dir}", *SMALL, "run.seed=7", "data.source=synthetic"])
    trainer = Trainer.build(cfg)
    state = trainer.layout.fresh()
    checkpointer = RunCheckpointer(run_dir, cfg.checkpoint)
    checkpointer.save(cfg.train.steps, state, {}, step_meta(cfg, trainer.mesh, cfg.train.steps))
    checkpointer.close()
    return run_dir, state.params


@pytest.mark.slow
def test_finetune_starts_from_pretrained_params(tmp_path, pretrained):
    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    run_dir, params = pretrained
    cfg = finetune_config(tmp_path, f"init_from={run_dir}")
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, cfg.run.dir)
    assert start.step == 0
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), start.state.params, params)
    # (the finetune config has run.seed=0, the pretrained run 7: ignoring init_from would fail)
    assert all(jax.tree.leaves(same))


# -- bad input --------------------------------------------------------------------------------
def test_unknown_label_and_template_field():
    fmt = TaskFormat(classification(), CharTokenizer(), seq_len=12, where="split 'train' of t")
    with pytest.raises(UserError, match=r"record 5 of split 'train' of t has label 'zz', which "
                                        r"is not in the label set"):
        fmt.example({"text": b"a", "label": b"zz"}, 5)
    bad = TaskFormat(classification(template="{sentence}"), CharTokenizer(), seq_len=12)
    with pytest.raises(UserError, match="uses field 'sentence'.*fields: label, text"):
        bad.example({"text": b"a", "label": b"a"})


def test_init_from_other_architecture(tmp_path, pretrained):
    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.train.start import load_init_params

    cfg = finetune_config(tmp_path, f"init_from={pretrained[0]}", "model.hidden=48")
    with pytest.raises(UserError, match=r"embed/embedding: checkpoint has shape \(512, 32\), "
                                        r"the config expects \(512, 48\)"):
        load_init_params(cfg, default_shardings(cfg.model))


def test_init_from_other_tokenizer(tmp_path, pretrained):
    import shutil

    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.data.tokenizer import train_tokenizer
    from bignlp_jax.train.start import load_init_params

    run_dir = tmp_path / "pre"
    shutil.copytree(pretrained[0], run_dir)
    # a tokenizer of the same size trained on other text: only the recorded hash tells
    rng = np.random.default_rng(0)
    texts = [" ".join("".join(rng.choice(list("abcdefghij"), 5)) for _ in range(12))
             for _ in range(400)]
    train_tokenizer(texts, run_dir / "tokenizer", 512)
    # finetuning and pretraining (no task:) start up the same way, and both check
    finetune = finetune_config(tmp_path, f"init_from={run_dir}")
    pretrain = finetune.model_copy(update={"task": None})
    for cfg in (finetune, pretrain):
        with pytest.raises(UserError, match=f"(?s)init_from={run_dir} was trained with another "
                                            "tokenizer.*fix: set data.tokenizer="):
            load_init_params(cfg, default_shardings(cfg.model))


def test_task_config_errors():
    from bignlp_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="needs task.labels"):
        load_config(None, ["task.type=classification"])
    with pytest.raises(ConfigError, match="2 entries for 3 task.labels"):
        load_config(None, ["task.labels=[a,b,c]", "task.label_words=[x,y]"])
