"""Chunk checksums of a token file: bit rot is caught where the bytes are read.

A store's manifest holds the crc32 of every `CHUNK_TOKENS` tokens of `tokens.bin`. A process
checks a chunk (its crc32 and that every id is below the vocabulary size) the first time it reads
from that chunk, so a flipped byte whose file kept its size and mtime (what failing media looks
like) is never trained on, and opening a store costs O(documents), not O(tokens): the tokens are
checked as they are read, once per process (crc32 runs at several GB/s, far above what a loader
reads).

Long verifications (`data tokenize` of an existing store, a store of the older format whose
files changed) poll `stop_requested`: a training process that got SIGTERM while opening its
stores ends at once with the requeue exit code instead of hashing on (see
`checkpoint/preemption.py`, which sets the hook).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

import numpy as np

from bignlp_jax.errors import Preempted, UserError

CHUNK_TOKENS = 1 << 20  # 2 MiB of uint16 ids: one check costs ~0.5 ms

# Set by a stop request (SIGTERM/SIGINT) while a training process opens its stores.
_stop: Callable[[], str | None] | None = None


def set_stop_hook(hook: Callable[[], str | None] | None) -> None:
    """`hook()` returns why to stop (e.g. 'SIGTERM') or None; long verifications poll it."""
    global _stop
    _stop = hook


def check_stop(what: str) -> None:
    """Raise Preempted (exit 75: run again) if a stop was requested during `what`."""
    reason = _stop() if _stop is not None else None
    if reason is not None:
        raise Preempted(f"{reason} received while {what}; stopped before training (nothing to "
                        "save): run the same command again to continue")


def chunk_crcs(tokens: np.ndarray, chunk: int = CHUNK_TOKENS) -> list[int]:
    """crc32 of every `chunk` tokens of the flat array `tokens` (the last chunk may be short)."""
    return [zlib.crc32(np.ascontiguousarray(tokens[a:a + chunk]).tobytes())
            for a in range(0, len(tokens), chunk)]


class ChunkChecker:
    """Checks each chunk of one token file the first time a read touches it (thread-safe)."""

    def __init__(self, file: str, crcs: list[int], chunk: int, vocab_size: int, rebuild: str):
        self.file, self.crcs, self.chunk = file, crcs, chunk
        self.vocab_size, self.rebuild = vocab_size, rebuild
        self._checked = np.zeros(len(crcs), dtype=bool)
        self._unchecked = len(crcs)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a Grain worker process checks what it reads itself
        state = {**self.__dict__}
        state["_checked"] = np.zeros(len(self.crcs), dtype=bool)
        state["_unchecked"] = len(self.crcs)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def check_positions(self, tokens: np.ndarray, idx: np.ndarray) -> None:
        """Check the chunks holding token positions `idx` and `idx + 1` (the pairs read)."""
        if len(idx) == 0 or self._unchecked == 0:
            return
        # O(len(idx)) scatter, not a sort: this runs on every batch
        touched = np.zeros(len(self.crcs) + 1, dtype=bool)
        touched[idx // self.chunk] = True
        touched[(idx + 1) // self.chunk] = True
        new = np.flatnonzero(touched[:len(self.crcs)] & ~self._checked)
        if len(new):
            with self._lock:
                for c in new.tolist():
                    if not self._checked[c]:
                        self.check_chunk(tokens, c)
                        self._checked[c] = True
                        self._unchecked -= 1

    def check_chunk(self, tokens: np.ndarray, c: int) -> None:
        data = np.ascontiguousarray(tokens[c * self.chunk:(c + 1) * self.chunk])
        if zlib.crc32(data.data) != self.crcs[c]:
            raise self._damaged(c, "corrupt (crc32 of tokens "
                                f"{c * self.chunk}-{c * self.chunk + len(data) - 1} differs "
                                "from its manifest)")
        if len(data) and int(data.max()) >= self.vocab_size:
            raise self._damaged(c, f"corrupt (token id {int(data.max())} in chunk {c} is not "
                                f"below the vocabulary size {self.vocab_size})")

    def check_all(self, tokens: np.ndarray, what: str) -> None:
        """Every chunk (`data tokenize` of an existing store); stops promptly on SIGTERM."""
        for c in range(len(self.crcs)):
            check_stop(what)
            if not self._checked[c]:
                self.check_chunk(tokens, c)
                self._checked[c] = True
                self._unchecked -= 1

    def _damaged(self, c: int, problem: str) -> UserError:
        return UserError(f"token store file {self.file} is {problem}\n"
                         f"  fix: rebuild it: {self.rebuild}")
