"""A deterministic synthetic task for smoke tests and benchmarks (`data.source=synthetic`).

Each row is an arithmetic progression modulo the vocabulary, t[i] = (a + s * i) mod V, with a
random start `a` and a stride `s` from a small set: a model must read the first two tokens to
predict the rest, so the loss falls quickly and measurably. Rows are a function of
(seed, step, row) only, so every process count and mesh sees the same global batch.
"""

from __future__ import annotations

import numpy as np

STRIDES = np.array([1, 2, 3, 5, 7])


class SyntheticSource:
    def __init__(self, *, seed: int, vocab_size: int, seq_len: int, global_batch: int,
                 rows: tuple[int, int], split: str = "train"):
        self.seed, self.vocab, self.seq_len = seed, vocab_size, seq_len
        self.global_batch, self.rows = global_batch, rows
        # the held-out stream uses a different seed stream than training
        self.stream = 0 if split == "train" else 1
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.stream, self.step])
        start = rng.integers(0, self.vocab, size=self.global_batch)
        stride = STRIDES[rng.integers(0, len(STRIDES), size=self.global_batch)]
        lo, hi = self.rows
        i = np.arange(self.seq_len + 1)
        seq = (start[lo:hi, None] + stride[lo:hi, None] * i) % self.vocab  # [rows, T+1]
        self.step += 1
        n = hi - lo
        return {
            "tokens": seq[:, :-1].astype(np.int32),
            "targets": seq[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                         (n, self.seq_len)).copy(),
            "segment_ids": np.ones((n, self.seq_len), np.int32),
            "loss_mask": np.ones((n, self.seq_len), np.float32),
        }

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
