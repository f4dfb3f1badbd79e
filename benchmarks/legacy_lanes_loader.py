"""Grain pipeline: TFDS records -> shuffled, tokenized, packed [rows, T] batches in exact order.

Lanes make the order a function of (seed, step) alone. With global batch size B, lane j reads
documents j, j+B, j+2B, ... of the seed-shuffled document order (each epoch shuffled anew,
forever), encodes them and packs them back to back into rows of T tokens (grain's
concat-then-split: a document that does not fit continues in the lane's next row). Row r of
global batch k is row k of lane r. A process runs only the lanes of its own rows, so the global
batch is the same for any number of processes, and reader threads only prefetch (grain keeps
order), so it is the same for any number of threads too.

Each encoded document gives `inputs`, `targets` (inputs shifted by one) and `weights` (the loss
weight of each target); packing adds segment ids (1, 2, ... per row; 0 = padding) and positions
(restarting at 0 for each document piece), so attention never crosses documents and the loss
counts only real targets. The state is grain's iterator state for every lane: small (indices
and slice bounds, no data) and JSON-able.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ZipIterDataset

from bignlp_jax.data.tfds.source import text_of
from bignlp_jax.errors import UserError

Encoder = Callable[[dict], dict[str, np.ndarray]]
STATE_VERSION = 1
# Grain's prefetch buffer per lane, in documents.
PREFETCH_DOCUMENTS = 16

log = logging.getLogger(__name__)


def lm_encoder(tokenizer, text_key: str) -> Encoder:
    """Language-modelling example of a record: <s> text </s>, every target counted."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id

    def encode(record: dict) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(text_of(record, text_key))
        doc = np.asarray([bos, *ids, eos], dtype=np.int32)
        return {"inputs": doc[:-1], "targets": doc[1:],
                "weights": np.ones(len(doc) - 1, dtype=np.float32)}

    return encode


def lane_dataset(source: Sequence, encode: Encoder, *, lane: int, num_lanes: int, seq_len: int,
                 seed: int | None, num_threads: int) -> grain.IterDataset:
    """Packed rows of lane `lane`: documents lane, lane + num_lanes, ... of the shuffled stream."""
    docs = grain.MapDataset.source(source)
    if seed is not None:
        docs = docs.shuffle(seed=seed)  # reshuffled with a new seed each epoch by repeat()
    docs = docs.repeat()[lane::num_lanes].map(encode)
    read = grain.ReadOptions(num_threads=num_threads,
                             prefetch_buffer_size=PREFETCH_DOCUMENTS if num_threads else 0)
    return ConcatThenSplitIterDataset(
        docs.to_iter_dataset(read),
        length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
    )


def _from_json(state: Any) -> Any:
    """Grain lane state as grain wrote it, from its JSON form (a checkpoint, or `get_state`).

    JSON turns tuples into lists, and grain's concat-then-split tells "no remainder" by comparing
    `remainder_slices` with the tuple (-1, -1): a list never equals it, so a lane saved right
    after a row that ended with a whole document would, on restore, take the next document for
    a remainder with slice [-1:-1] (empty) and drop it. The slices go back to tuples here.
    """
    if isinstance(state, dict):
        return {k: ({f: tuple(sl) for f, sl in v.items()} if k == "remainder_slices"
                    else _from_json(v)) for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json(v) for v in state]
    return state


def _stack(rows: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """Lane rows -> the batch format of train/step.py."""
    return {
        "tokens": np.stack([r["inputs"] for r in rows]),
        "targets": np.stack([r["targets"] for r in rows]),
        "positions": np.stack([r["inputs_positions"] for r in rows]),
        "segment_ids": np.stack([r["inputs_segment_ids"] for r in rows]),
        "loss_mask": np.stack([r["weights"] for r in rows]).astype(np.float32),
    }


class PackedBatches:
    """BatchSource of packed rows [lo, hi) of each global batch of `global_batch` rows.

    `seed=None` reads documents in stored order (the held-out stream). Documents of the whole
    dataset are read in order of (seed, index); the result does not depend on `num_threads`.
    """

    def __init__(self, source: Sequence, encode: Encoder, *, seq_len: int, global_batch: int,
                 rows: tuple[int, int], seed: int | None, num_threads: int = 0,
                 name: str = "dataset"):
        if len(source) == 0:
            raise UserError(f"{name} has no records: nothing to train or evaluate on")
        lo, hi = rows
        if not 0 <= lo < hi <= global_batch:
            raise ValueError(f"rows {rows} are not inside a global batch of {global_batch}")
        self.seq_len, self.global_batch, self.rows = seq_len, global_batch, (lo, hi)
        self.seed = seed if seed is None else seed % 2**32
        self._source, self._encode, self._threads = source, encode, num_threads
        self.step = 0
        self._iter = self._make_iter()

    def _make_iter(self):
        lo, hi = self.rows
        lanes = [lane_dataset(self._source, self._encode, lane=j, num_lanes=self.global_batch,
                              seq_len=self.seq_len, seed=self.seed, num_threads=self._threads)
                 for j in range(lo, hi)]
        return iter(ZipIterDataset(lanes).map(_stack))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self.step += 1
        return batch

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "global_batch": self.global_batch, "seq_len": self.seq_len}

    def get_state(self) -> dict:
        """JSON-able position: the step, and grain's state of each of this process's lanes."""
        return {"version": STATE_VERSION, "step": self.step, "rows": list(self.rows),
                **self._identity(), "lanes": json.loads(json.dumps(self._iter.get_state()))}

    def set_state(self, state: dict) -> None:
        """Continue exactly where `state` was taken (also across a change of process count)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data iterator state version {state.get('version')} is not "
                            f"{STATE_VERSION}; it was written by another version of bignlp_jax")
        changed = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise UserError(f"cannot resume the data stream: {what} changed since the checkpoint; "
                            "the batch order depends on them")
        self._iter = self._make_iter()
        self.step = int(state["step"])
        if tuple(state.get("rows", ())) == self.rows:
            self._iter.set_state(_from_json(state["lanes"]))
            return
        # Another process layout wrote the state: our lanes are not in it. The stream is a
        # function of (seed, step), so replaying `step` batches reaches the same position.
        log.warning("data state was saved for rows %s, this process reads %s: replaying %d "
                    "batches to restore the position", state.get("rows"), self.rows, self.step)
        for _ in range(self.step):
            next(self._iter)
