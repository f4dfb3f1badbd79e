"""Chat records: the documented template, loss on assistant tokens only, overflow policies."""

from __future__ import annotations

import json

import pytest

from bignlp_jax.config.schema import TaskConfig
from bignlp_jax.errors import UserError
from bignlp_jax.tasks.chat import ChatFormat


class WordTokenizer:
    """Hand-made: 0 pad, 1 <s>, 2 </s>, 3 <sep>, then one id per known word."""

    pad_id, bos_id, eos_id, sep_id = 0, 1, 2, 3
    WORDS = ["System:", "User:", "be", "brief", "hi", "hello", "bye", "ok", "\n"]

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
    with pytest.raises(UserError, match="no assistant token fits"):
        fmt(seq_len=6).row(CONVERSATION, 0)


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
