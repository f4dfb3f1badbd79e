"""Task batch sources: one example per row, in an order fixed by (seed, step).

Training (`seed` given): global example slot i = step * B + row reads example
perm_e[i mod N] with e = i div N and perm_e a permutation drawn from (seed, e), so every epoch is
shuffled anew and a process that reads only rows [lo, hi) gets exactly its share of the same
global batch. The state is the step alone. Held-out streams (`seed=None`) read the split once in
stored order; the last batch is filled with empty rows, then iteration stops.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import numpy as np

from bignlp_jax.config import Config
from bignlp_jax.data.tasks.chat import ChatFormat
from bignlp_jax.data.tasks.formats import TaskFormat, stack_rows
from bignlp_jax.data.tasks.preference import PreferenceFormat
from bignlp_jax.data.tfds.source import open_split
from bignlp_jax.errors import UserError

STATE_VERSION = 1


class TaskBatches:
    """BatchSource over task records: rows [lo, hi) of each global batch of `global_batch`."""

    def __init__(self, records: Sequence, fmt: TaskFormat, *, seq_len: int, global_batch: int,
                 rows: tuple[int, int], seed: int | None, name: str = "task data"):
        if len(records) == 0:
            raise UserError(f"{name} has no records: nothing to finetune or evaluate on")
        self.records, self.fmt, self.seq_len = records, fmt, seq_len
        self.global_batch, self.rows, self.seed, self.name = global_batch, rows, seed, name
        self.step = 0

    def __iter__(self):
        return self

    @functools.lru_cache(maxsize=2)  # noqa: B019 - at most two epochs meet in one batch
    def _permutation(self, epoch: int) -> np.ndarray:
        assert self.seed is not None  # held-out streams (seed None) are read in order
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def example_index(self, slot: int) -> int | None:
        """Record index of global example slot `slot` (None: past the end of a held-out pass)."""
        n = len(self.records)
        if self.seed is None:
            return slot if slot < n else None
        return int(self._permutation(slot // n)[slot % n])

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.step * self.global_batch
        if self.seed is None and first >= len(self.records):
            raise StopIteration
        lo, hi = self.rows
        out = []
        for row in range(lo, hi):
            index = self.example_index(first + row)
            if index is None:
                out.append(self.fmt.empty())
            else:
                out.append(self.fmt.row(self.records[index], index))
        self.step += 1
        return stack_rows(out)

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": "task", "step": self.step, "seed": self.seed,
                "global_batch": self.global_batch, "records": len(self.records)}

    def set_state(self, state: dict) -> None:
        if state.get("kind") != "task" or state.get("version") != STATE_VERSION:
            raise UserError(f"the checkpoint's data state {json.dumps(state)[:200]} was not "
                            "written by a task source of this version; cannot resume it here")
        mine = self.get_state()
        changed = [k for k in ("seed", "global_batch", "records") if state.get(k) != mine[k]]
        if changed:
            raise UserError(
                "cannot resume the task data stream: "
                + ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in changed)
                + " changed since the checkpoint; the example order depends on them"
            )
        self.step = int(state["step"])


def task_format(cfg: Config, where: str = "task data") -> TaskFormat:
    from bignlp_jax.data.dataset_choice import resolve_tokenizer  # tfds: only when used

    assert cfg.task is not None, "a task format needs a config with a task: section"
    return format_class(cfg)(cfg.task, resolve_tokenizer(cfg), cfg.data.seq_len, where)


def format_class(cfg: Config) -> type[TaskFormat]:
    """The TaskFormat of the config's task.type."""
    assert cfg.task is not None, "a task format needs a config with a task: section"
    return {"chat": ChatFormat, "preference": PreferenceFormat}.get(cfg.task.type, TaskFormat)


def open_task_split(cfg: Config, split: str) -> tuple[Sequence, str]:
    """Records of a stream role ('train', 'validation') or a named split; and a description."""
    from bignlp_jax.data.dataset_choice import data_dir, dataset_name, split_name  # tfds

    if cfg.data.source != "tfds":
        raise UserError(f"a task needs data.source=tfds (records of data.tfds_name), got "
                        f"data.source={cfg.data.source}")
    name, directory = dataset_name(cfg), data_dir(cfg)
    split_ = split_name(cfg, split)
    assert cfg.task is not None, "task records need a config with a task: section"
    fmt_keys = format_class(cfg)(cfg.task, _NoTokenizer(), cfg.data.seq_len).required_keys()
    records = open_split(name, directory, split_, required_keys=fmt_keys)
    return records, f"split {split_!r} of {name} in {directory}"


class _NoTokenizer:
    """Stand-in to ask a TaskFormat for its record fields without loading a tokenizer."""

    sep_id = None

    def encode(self, text: str) -> list[int]:
        return []


def make_task_source(cfg: Config, split: str, rows: tuple[int, int]) -> TaskBatches:
    """`make_source` for configs with a `task:` section."""
    records, where = open_task_split(cfg, split)
    fmt = task_format(cfg, where)
    return TaskBatches(records, fmt, seq_len=cfg.data.seq_len,
                       global_batch=cfg.train.global_batch_size, rows=rows,
                       seed=cfg.run.seed if split == "train" else None, name=where)

