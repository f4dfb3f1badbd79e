"""Chat records -> one training row per conversation, the loss on assistant tokens only.

A record holds `messages: [{role, content}, ...]` (a list, or the same list as JSON text, which
is how a dataset stores it): an optional first `system` message, then `user` and `assistant`
turns alternating, starting with a user turn and ending with an assistant turn. Rendered with
our special tokens <s>, <sep> (end of a user turn: the answer starts) and </s> (end of an
answer):

    <s> "System: {system}\\n" "User: {user 1}" <sep> "{assistant 1}" </s> "User: {user 2}" <sep>
        "{assistant 2}" </s> ...

Each quoted part is tokenized on its own. The loss counts the tokens of every assistant answer
and its </s> (the model learns to answer and to stop), nothing of the system or user text.
A conversation longer than `data.seq_len` + 1 tokens is refused with
`task.chat_overflow=refuse`; with `truncate` the first user turn loses its end if the first
answer would not fit after it, and whatever still does not fit is cut from the end (later turns
are lost; a conversation left without any answer token is refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from bignlp_jax.data.tasks.formats import TaskFormat
from bignlp_jax.errors import UserError

ROLES = ("system", "user", "assistant")


class ChatFormat(TaskFormat):
    """`TaskFormat` for task.type=chat: rows straight from the conversation (`row`)."""

    def required_keys(self) -> tuple[str, ...]:
        return (self.task.messages_key,)

    def messages(self, record: Mapping, index: int | None = None) -> list[dict[str, str]]:
        """The record's messages, checked: roles, order, text contents."""
        at = f"record {index} of {self.where}" if index is not None else self.where
        key = self.task.messages_key
        if key not in record:
            raise UserError(f"{at} has no {key!r} field (fields: {', '.join(sorted(record))})\n"
                            "  fix: set task.messages_key to the field holding the messages")
        messages = record[key]
        if isinstance(messages, bytes):
            messages = messages.decode("utf-8")
        if isinstance(messages, str):
            messages = json.loads(messages)
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
        body = roles[1:] if roles[:1] == ["system"] else roles
        expected = ["user", "assistant"] * (len(body) // 2)
        if (not body or body != expected or any(r not in ROLES for r in roles)
                or not all(isinstance(m.get("content"), str) for m in messages)):
            raise UserError(
                f"{at}: messages with roles {roles} are not a conversation\n  fix: give "
                "[{role, content}, ...] with an optional first system message, then user and "
                "assistant turns alternating, ending with an assistant turn")
        return list(messages)

    def pieces(self, record: Mapping, index: int | None = None) -> list[tuple[list[int], bool]]:
        """(token ids, counted by the loss) for each part of the template, in order."""
        tok, out = self.tokenizer, []
        messages = self.messages(record, index)
        system = ""
        if messages[0]["role"] == "system":
            system = f"System: {messages[0]['content']}\n"
            messages = messages[1:]
        out.append(([tok.bos_id], False))
        for user, assistant in zip(messages[::2], messages[1::2]):
            out.append(([*tok.encode(system + f"User: {user['content']}"), *self.sep], False))
            out.append(([*tok.encode(assistant["content"]), tok.eos_id], True))
            system = ""
        return out

    def row(self, record: Mapping, index: int | None = None) -> dict[str, np.ndarray]:
        pieces = self.pieces(record, index)
        limit = self.seq_len + 1  # seq_len inputs, each with its next token as target
        total = sum(len(ids) for ids, _ in pieces)
        if total > limit and self.task.chat_overflow == "refuse":
            raise UserError(
                f"record {index} of {self.where} is a conversation of {total} tokens, "
                f"more than data.seq_len={self.seq_len} + 1\n  fix: raise data.seq_len, "
                "shorten or split the conversation, or set task.chat_overflow=truncate")
        # truncate: the first user turn loses its end if the first answer would not fit
        # (as prompts do in formats.py); later turns past the limit are dropped
        first = sum(len(ids) for ids, _ in pieces[:3])
        if first > limit:
            user = pieces[1][0]
            keep = len(user) - len(self.sep) - (first - limit)
            if keep >= 1:
                pieces[1] = ([*user[:keep], *self.sep], False)
        seq, counted = [], []
        for ids, answer in pieces:
            seq += ids
            counted += [answer] * len(ids)
        seq, counted = seq[:limit], counted[:limit]
        if not any(counted[1:]):
            raise UserError(
                f"record {index} of {self.where}: no assistant token fits in data.seq_len="
                f"{self.seq_len}\n  fix: raise data.seq_len or shorten the first user turn")
        n = len(seq) - 1
        row = {k: np.zeros(self.seq_len, np.int32)
               for k in ("tokens", "targets", "positions", "segment_ids")}
        row["tokens"][:n], row["targets"][:n] = seq[:-1], seq[1:]
        row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        row["loss_mask"] = np.zeros(self.seq_len, np.float32)
        row["loss_mask"][:n] = np.asarray(counted[1:], np.float32)  # target t is seq[t + 1]
        return row
