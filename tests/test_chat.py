"""Chat records: the documented template, loss on assistant tokens only, overflow policies."""

from __future__ import annotations

import json

import pytest

from bignlp_jax.config.schema import TaskConfig
from bignlp_jax.data.tasks.chat import ChatFormat
from bignlp_jax.errors import UserError


class WordTokenizer:
    """Hand-made: 0 pad, 1 <s>, 2 </s>, 3 <sep>, then one id per known word."""

    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3
    WORDS = ("System:", "User:", "be", "brief", "hi", "hello", "bye", "ok", "\n")

    def encode(self, text):
        return [4 + self.WORDS.index(w) for w in text.replace("\n", " \n ").split(" ") if w]


S, U, BE, BRIEF, HI, HELLO, BYE, OK, NL = range(4, 13)
CONVERSATION = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok ok"},
]}


def fmt(seq_len=32, **task):
    return ChatFormat(TaskConfig(type="chat", **task), WordTokenizer(), seq_len)


def test_loss_counts_assistant_tokens_only():
    row = fmt().row(CONVERSATION, 0)
    # <s> System: be brief \n User: hi <sep> hello </s> User: bye <sep> ok ok </s>
    seq = [1, S, BE, BRIEF, NL, U, HI, 3, HELLO, 2, U, BYE, 3, OK, OK, 2]
    n = len(seq) - 1
    assert row["tokens"][:n].tolist() == seq[:-1] and row["targets"][:n].tolist() == seq[1:]
    counted = [t for t, w in zip(row["targets"].tolist(), row["loss_mask"].tolist()) if w]
    assert counted == [HELLO, 2, OK, OK, 2]  # both answers and their </s>, nothing else
    assert row["loss_mask"][n:].sum() == 0 and row["segment_ids"].tolist() == [1] * n + [0] * (
        32 - n)
    # the same conversation stored as JSON text (how a dataset keeps the field)
    same = fmt().row({"messages": json.dumps(CONVERSATION["messages"])}, 0)
    assert all((same[k] == row[k]).all() for k in row)


def test_overflow_truncates_or_refuses():
    row = fmt(seq_len=11).row(CONVERSATION, 0)  # 12 tokens kept: up to "User: bye"
    assert [t for t, w in zip(row["targets"], row["loss_mask"]) if w] == [HELLO, 2]
    with pytest.raises(UserError, match="task.chat_overflow=truncate"):
        fmt(seq_len=11, chat_overflow="refuse").row(CONVERSATION, 3)
    # the first user turn loses its end so the first answer fits: <s> System: be brief <sep> hello </s>
    row = fmt(seq_len=6).row(CONVERSATION, 0)
    assert row["tokens"].tolist() == [1, S, BE, BRIEF, 3, HELLO] and row["loss_mask"].sum() == 2
    with pytest.raises(UserError, match="no assistant token fits"):
        fmt(seq_len=2).row(CONVERSATION, 0)


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "robot", "content": "ok"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
     {"role": "system", "content": "be"}, {"role": "assistant", "content": "ok"}],
])
def test_malformed_conversations_are_refused(messages):
    with pytest.raises(UserError, match="record 5 of .*not a conversation"):
        fmt().row({"messages": messages}, 5)


@pytest.mark.slow
def test_embedded_chat_task_finetunes_with_lora_and_evaluates(tmp_path, embedded_data_dir):
    """configs/finetune_stdlib_chat.yaml on the embedded conversations: rows count only the
    answers, LoRA trains from a checkpoint, and eval reports the answers' loss."""
    import numpy as np

    from bignlp_jax.config import load_config
    from bignlp_jax.data.corpora.embedded import CHAT_SYSTEM
    from bignlp_jax.data.tasks.source import make_task_source, open_task_split
    from bignlp_jax.evaluate.run import evaluate_run
    from bignlp_jax.train.loop import Trainer, train

    small = ["model.vocab_size=1024", "model.num_layers=1", "model.hidden=32",
             "model.num_heads=2", "model.mlp_dim=64", "data.seq_len=96", "model.max_seq_len=96",
             "train.global_batch_size=8", "train.log_every=1", f"data.data_dir={embedded_data_dir}"]
    pre = load_config(None, [f"run.dir={tmp_path / 'pre'}", *small[:-1], "data.source=synthetic"])
    trainer = Trainer.build(pre)
    from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta

    ckpt = RunCheckpointer(pre.run.dir, pre.checkpoint)
    ckpt.save(1, trainer.layout.fresh(), {}, step_meta(pre, trainer.mesh, 1))
    ckpt.close()

    cfg = load_config("finetune_stdlib_chat", [
        f"run.dir={tmp_path / 'chat'}", *small, f"init_from={pre.run.dir}", "data.tokenizer=null",
        "train.steps=2", "task.eval_examples=8", "checkpoint.every_steps=0"])
    records, _ = open_task_split(cfg, "validation")
    assert CHAT_SYSTEM in records[0]["messages"].decode() if isinstance(
        records[0]["messages"], bytes) else CHAT_SYSTEM in records[0]["messages"]
    batch = next(make_task_source(cfg, "train", (0, 8)))
    counted = batch["loss_mask"].sum(axis=1)
    assert (counted > 0).all() and (counted < (batch["segment_ids"] > 0).sum(axis=1)).all()
    train(cfg)
    results = evaluate_run(cfg)
    assert results["task"] == "chat" and np.isfinite(results["loss"])
    assert results["target_tokens"] > 8  # two answers per conversation, 8 conversations


def test_data_prepare_jsonl_keeps_messages(tmp_path):
    """`data prepare --format jsonl --text-key messages` stores the conversation (as JSON text)
    and the chat format reads it back into the same row."""
    from bignlp_jax.data.tfds.local_files import prepare_local
    from bignlp_jax.data.tfds.source import open_split

    full = CONVERSATION["messages"]
    lines = [json.dumps({"messages": m, "id": i}) for i, m in enumerate([full, full[1:], full[3:]])]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_local([str(tmp_path / "chats.jsonl")], "chats", tmp_path / "data", fmt="jsonl",
                  text_key="messages")
    rows = []
    for split in ("train", "validation"):
        try:
            records = open_split("chats", tmp_path / "data", split, required_keys=("messages",))
        except UserError:  # an empty split
            continue
        rows += [fmt().row(records[i], i) for i in range(len(records))]
    want = fmt().row(CONVERSATION, 0)
    assert len(rows) == 3 and any(all((r[k] == want[k]).all() for k in want) for r in rows)
