"""Preference records -> one chosen row and one rejected row per pair, the loss on answers only.

A record is TRL's preference format, in one of two forms:

    {"prompt": "...", "chosen": "...", "rejected": "..."}              (standard)
    {"chosen": [{role, content}, ...], "rejected": [...]}              (conversational)

Standard pairs render like every task example, <s> prompt <sep> answer </s> (formats.py), one
row for each answer. Conversations render with the chat template (tasks/chat.py); their prompt
is the messages both share (or an explicit `prompt` message list put in front of both), which
must end with a user turn, and the answer is everything after it. Only answer tokens (and their
</s>) count, as in TRL, whose log-probabilities are sums over the completion tokens.

The two rows of a pair travel together as `chosen_*` and `rejected_*` keys of one batch row, so
no pair is ever split across microbatches or packed with another. A side longer than
`data.seq_len` + 1 tokens is refused with `task.chat_overflow=refuse`; with `truncate` a text
prompt loses its end until the longer answer fits (the same prompt on both sides), then answers
lose their ends (a conversation whose prompt leaves no room for an answer token is refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from bignlp_jax.data.tasks.chat import ChatFormat
from bignlp_jax.data.tasks.formats import ROW_KEYS, TaskFormat, empty_row
from bignlp_jax.data.tfds.source import text_of
from bignlp_jax.errors import UserError

SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{k}" for side in SIDES for k in ROW_KEYS)

Pieces = list[tuple[list[int], bool]]  # (token ids, counted by the loss), in order


def _conversation(value) -> list | None:
    """`value` as a message list, if it is one (a list, or one stored as JSON text)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value):
        return value
    return None


class PreferenceFormat(TaskFormat):
    """`TaskFormat` for task.type=preference: a pair of rows from each record (`row`)."""

    def __init__(self, task, tokenizer, seq_len: int, where: str = "task data"):
        super().__init__(task, tokenizer, seq_len, where)
        self.chat = ChatFormat(task, tokenizer, seq_len, where)

    def required_keys(self) -> tuple[str, ...]:
        return (self.task.chosen_key, self.task.rejected_key)

    def _at(self, index: int | None) -> str:
        return f"record {index} of {self.where}" if index is not None else self.where

    def _field(self, record: Mapping, key: str, index: int | None):
        if key not in record:
            raise UserError(
                f"{self._at(index)} has no {key!r} field (fields: {', '.join(sorted(record))})"
                f"\n  fix: give every preference record {self.task.chosen_key!r} and "
                f"{self.task.rejected_key!r} answers, or set task.chosen_key/task.rejected_key")
        return record[key]

    def sides(self, record: Mapping, index: int | None = None) -> tuple[Pieces, Pieces]:
        """(chosen pieces, rejected pieces): the prompt's pieces uncounted, then the answer's."""
        task = self.task
        chosen = self._field(record, task.chosen_key, index)
        rejected = self._field(record, task.rejected_key, index)
        prompt = record.get(task.prompt_key)
        if isinstance(prompt, (str, bytes)) and not prompt:
            prompt = None  # an empty prompt field (data prepare keeps the text key) is none
        chosen_msgs, rejected_msgs = _conversation(chosen), _conversation(rejected)
        if (chosen_msgs is None) != (rejected_msgs is None):
            raise UserError(f"{self._at(index)}: one answer is a conversation and the other "
                            "is text\n  fix: give both as text or both as message lists")
        if chosen_msgs is not None and rejected_msgs is not None:
            prompt_msgs = _conversation(prompt) if prompt is not None else []
            if prompt_msgs is None:
                raise UserError(f"{self._at(index)}: {task.prompt_key!r} is text but the "
                                "answers are conversations\n  fix: give the prompt as a "
                                "message list too, or leave it out (the shared messages are it)")
            return self._conversation_sides(prompt_msgs + chosen_msgs,
                                            prompt_msgs + rejected_msgs, index)
        if prompt is None:
            raise UserError(f"{self._at(index)} has no {task.prompt_key!r} field (fields: "
                            f"{', '.join(sorted(record))})\n  fix: give text pairs a prompt, or "
                            "set task.prompt_key")
        answers = [text_of(record, task.chosen_key), text_of(record, task.rejected_key)]
        if answers[0] == answers[1]:
            raise self._identical(index)
        tok = self.tokenizer
        head = [tok.bos_id, *tok.encode(text_of(record, task.prompt_key)), *self.sep]
        pairs = [[(head, False), ([*tok.encode(a), tok.eos_id], True)] for a in answers]
        return pairs[0], pairs[1]

    def _identical(self, index: int | None) -> UserError:
        return UserError(f"{self._at(index)}: chosen and rejected are identical, so the pair "
                         "prefers nothing\n  fix: remove such records from the data")

    def _conversation_sides(self, chosen: list, rejected: list,
                            index: int | None) -> tuple[Pieces, Pieces]:
        if chosen == rejected:
            raise self._identical(index)
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        body = shared - (1 if chosen[:1] and chosen[0].get("role") == "system" else 0)
        if body <= 0 or body % 2 == 0:
            raise UserError(
                f"{self._at(index)}: the chosen and rejected conversations share "
                f"{shared} message(s), which do not end with a user turn\n  fix: give both the "
                "same messages up to a user turn (the prompt), then their different answers")
        key = self.task.messages_key
        out = []
        for messages in (chosen, rejected):
            pieces = self.chat.pieces({key: messages}, index)
            # pieces: [<s>], then (user turn, assistant answer) per exchange; the first
            # 1 + body pieces are the shared prompt
            out.append([(ids, counted and i > body) for i, (ids, counted) in enumerate(pieces)])
        return out[0], out[1]

    def _side_row(self, pieces: Pieces, side: str, index: int | None) -> dict[str, np.ndarray]:
        limit = self.seq_len + 1  # seq_len inputs, each with its next token as target
        total = sum(len(ids) for ids, _ in pieces)
        prompt = 0
        for ids, counted in pieces:
            if counted:
                break
            prompt += len(ids)
        if total > limit and self.task.chat_overflow == "refuse":
            raise UserError(
                f"{self._at(index)}: its {side} side has {total} tokens, more than data.seq_len="
                f"{self.seq_len} + 1\n  fix: raise data.seq_len, shorten the pair, or set "
                "task.chat_overflow=truncate")
        if prompt + 1 > limit:
            raise UserError(
                f"{self._at(index)}: its prompt ({prompt} tokens) leaves no room for an answer "
                f"in data.seq_len={self.seq_len}\n  fix: raise data.seq_len or shorten the prompt")
        seq, counted_ = [], []
        for ids, counted in pieces:
            seq += ids
            counted_ += [counted] * len(ids)
        seq, counted_ = seq[:limit], counted_[:limit]  # truncate: the answer loses its end
        n = len(seq) - 1
        row = empty_row(self.seq_len)
        row["tokens"][:n], row["targets"][:n] = seq[:-1], seq[1:]
        row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        row["loss_mask"][:n] = np.asarray(counted_[1:], np.float32)  # target t is seq[t + 1]
        return {f"{side}_{k}": v for k, v in row.items()}

    def _fit_prompt(self, chosen: Pieces, rejected: Pieces) -> tuple[Pieces, Pieces]:
        """Text pairs under `truncate`: a prompt too long for the longer answer loses its end
        (as task prompts do, formats.py), the same on both sides, so that both condition on
        one prompt; what still does not fit is cut from the answers (`_side_row`)."""
        if self.task.chat_overflow != "truncate" or len(chosen) != 2:
            return chosen, rejected
        head = chosen[0][0]
        over = len(head) + max(len(chosen[1][0]), len(rejected[1][0])) - (self.seq_len + 1)
        if over <= 0:
            return chosen, rejected
        keep = max(len(head) - len(self.sep) - over, min(2, len(head) - len(self.sep)))
        head = [*head[:keep], *self.sep]  # <s> and at least one prompt token, then <sep>
        return [(head, False), chosen[1]], [(head, False), rejected[1]]

    def row(self, record: Mapping, index: int | None = None) -> dict[str, np.ndarray]:
        chosen, rejected = self._fit_prompt(*self.sides(record, index))
        return {**self._side_row(chosen, "chosen", index),
                **self._side_row(rejected, "rejected", index)}

    def empty(self) -> dict[str, np.ndarray]:
        """A padding pair: no loss on either side, and not counted as a pair."""
        row = empty_row(self.seq_len)
        return {f"{side}_{k}": v.copy() for side in SIDES for k, v in row.items()}
