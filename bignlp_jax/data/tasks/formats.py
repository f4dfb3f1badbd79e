"""Task records -> token rows: <s> prompt <sep> target </s>, loss on the target tokens only.

    seq     = <s>  p0  p1  p2  <sep>  t0   t1   </s>
    tokens  = <s>  p0  p1  p2  <sep>  t0   t1          (seq[:-1], then padding)
    targets = p0   p1  p2  <sep> t0   t1   </s>        (seq[1:])
    weight  = 0    0   0   0     1    1    1           (predicting t0, t1 and </s> counts)

A classification target is the label word; scoring a record puts each label word in the target
slot and compares the summed log-likelihoods (evaluate/scoring.py), so no generated text is
parsed. Prompts too long for `data.seq_len` lose their end (the beginning of a text usually
says most about it); targets are never cut except to `task.max_target_tokens`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import numpy as np

from bignlp_jax.config.schema import TaskConfig
from bignlp_jax.data.tfds.source import text_of
from bignlp_jax.errors import UserError

ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def template_fields(template: str) -> list[str]:
    """Record fields a prompt template refers to ("{text}\\nPackage:" -> ["text"])."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class TaskFormat:
    """Turns records of one task into prompt/target token ids and padded training rows."""

    def __init__(self, task: TaskConfig, tokenizer, seq_len: int, where: str = "task data"):
        self.task, self.tokenizer, self.seq_len, self.where = task, tokenizer, seq_len, where
        self.fields = template_fields(task.template)
        self.classification = task.type == "classification"
        # <sep> marks where the answer starts; a foreign tokenizer without it gets nothing there
        self.sep = [] if getattr(tokenizer, "sep_id", None) is None else [tokenizer.sep_id]
        self.label_ids = {label: i for i, label in enumerate(task.labels or [])}
        self.word_ids = [tokenizer.encode(w) for w in task.words] if self.classification else []

    # -- record fields -------------------------------------------------------------------------
    def required_keys(self) -> tuple[str, ...]:
        answer = self.task.label_key if self.classification else self.task.target_key
        return tuple(dict.fromkeys([*self.fields, answer]))

    def prompt(self, record: Mapping) -> str:
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise UserError(
                f"task.template {self.task.template!r} uses field {missing[0]!r}, which the "
                f"records of {self.where} do not have (fields: {', '.join(sorted(record))})\n"
                "  fix: write the template with those field names"
            )
        return self.task.template.format_map({f: text_of(record, f) for f in self.fields})

    def label_index(self, record: Mapping, index: int | None = None) -> int:
        """Position of the record's label in `task.labels` (UserError for unknown labels)."""
        key = self.task.label_key
        if key not in record:
            raise UserError(f"records of {self.where} have no label field {key!r} (fields: "
                            f"{', '.join(sorted(record))})\n  fix: set task.label_key")
        label = text_of(record, key)
        if label not in self.label_ids:
            at = f"record {index} of " if index is not None else ""
            raise UserError(
                f"{at}{self.where} has label {label!r}, which is not in the label set "
                f"task.labels={list(self.label_ids)}\n"
                "  fix: add it to task.labels (and task.label_words), or remove such records"
            )
        return self.label_ids[label]

    def target_text(self, record: Mapping, index: int | None = None) -> str:
        if self.classification:
            return self.task.words[self.label_index(record, index)]
        key = self.task.target_key
        if key not in record:
            raise UserError(f"records of {self.where} have no target field {key!r} (fields: "
                            f"{', '.join(sorted(record))})\n  fix: set task.target_key")
        return text_of(record, key)

    # -- token ids -----------------------------------------------------------------------------
    def prompt_ids(self, record: Mapping, target_len: int = 0) -> list[int]:
        """<s> prompt <sep>, the prompt cut so that `target_len` target tokens + </s> still fit."""
        ids = self.tokenizer.encode(self.prompt(record))
        # seq = [bos] + prompt + sep + target + [eos] has at most seq_len + 1 tokens
        room = self.seq_len + 1 - 2 - len(self.sep) - target_len
        if room < 1:
            raise UserError(
                f"data.seq_len={self.seq_len} leaves no room for a prompt next to a target of "
                f"{target_len} tokens\n  fix: raise data.seq_len or lower task.max_target_tokens"
            )
        return [self.tokenizer.bos_id, *ids[:room], *self.sep]

    def target_ids(self, record: Mapping, index: int | None = None) -> list[int]:
        """Target tokens followed by </s> (the model learns where the answer ends)."""
        if self.classification:
            ids = self.word_ids[self.label_index(record, index)]
        else:
            ids = self.tokenizer.encode(self.target_text(record, index))
            ids = ids[: self.task.max_target_tokens]
        return [*ids, self.tokenizer.eos_id]

    def example(self, record: Mapping, index: int | None = None) -> tuple[list[int], list[int]]:
        target = self.target_ids(record, index)
        return self.prompt_ids(record, len(target) - 1), target

    def row(self, record: Mapping, index: int | None = None) -> dict[str, np.ndarray]:
        """The record's training row (tasks/chat.py builds its rows another way)."""
        return make_row(*self.example(record, index), self.seq_len)

    def empty(self) -> dict[str, np.ndarray]:
        """A padding row of this format (tasks/preference.py has its own)."""
        return empty_row(self.seq_len)


def make_row(prompt: Sequence[int], target: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """One padded row (the batch format of train/step.py) with weight 1 on target tokens only."""
    seq = [*prompt, *target]
    n = len(seq) - 1  # tokens that get a next-token target
    if n > seq_len:
        raise ValueError(f"example of {len(seq)} tokens does not fit seq_len={seq_len}")
    row = {
        "tokens": np.zeros(seq_len, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
    }
    row["tokens"][:n] = seq[:-1]
    row["targets"][:n] = seq[1:]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    row["loss_mask"][len(prompt) - 1:n] = 1.0  # targets seq[len(prompt):] are the answer
    return row


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """A padding row (segment 0, no loss): fills the last, partial batch of a held-out pass."""
    return {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in ROW_KEYS}


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[B, T] arrays from B rows (ROW_KEYS; a preference pair's rows have their own keys)."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
