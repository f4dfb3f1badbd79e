"""Global sample index over a token store: packed sample s is a pure function of (seed, s).

Each document d of the store (<s> ids </s>, length L_d) gives L_d - 1 (input, target) pairs.
Epoch e lays the documents out in the order perm_e (a permutation drawn from (seed, e); the
stored order when seed is None) and concatenates their pairs into one stream of P pairs; row i
of the epoch is pairs [i*T, (i+1)*T) of that stream (the last row is padded), so an epoch has
R = ceil(P / T) rows and global sample s is row s mod R of epoch s div R. Finding a row's
documents is a binary search in the epoch's cumulative pair counts: no earlier row is read.

The per-epoch arrays (Megatron's document index and its cumulative lengths) depend on the seed
and the store only, not on seq_len, batch size or process count; for large stores they are
cached as .npy files in the store's `index/` directory (computing one is O(documents); a store
in a bucket keeps no cache: each host computes them in memory).

A packed row gives `tokens`, `targets`, `positions` (restarting at 0 for every document piece),
`segment_ids` (1, 2, ... per piece; 0 = padding) and `loss_mask` (1 for every real target), so
attention never crosses documents. Everything is vectorised over all rows of a batch.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from bignlp_jax.data.token_store import TokenStore

log = logging.getLogger(__name__)
# Epoch arrays are cached on disk only for stores this large: below it a permutation costs
# milliseconds, and a small corpus read for many epochs would leave thousands of tiny files.
CACHE_MIN_DOCUMENTS = 1_000_000


class SampleIndex:
    """Packed rows of length `seq_len` of `store`, epochs shuffled with `seed` (None: stored
    order every epoch)."""

    def __init__(self, store: TokenStore, seq_len: int, seed: int | None):
        self.store, self.seq_len = store, seq_len
        self.seed = None if seed is None else seed % 2**32
        lengths = np.diff(np.asarray(store.offsets)) - 1  # pairs per document
        self.pairs_per_epoch = int(lengths.sum())
        self.rows_per_epoch = -(-self.pairs_per_epoch // seq_len)
        self._pairs = lengths
        # a store in a bucket keeps no cache beside it: np.save writes local files
        self.cache_dir = None if store.remote else store.path / "index"

    def identity(self) -> dict:
        return {"store": self.store.identity, "seed": self.seed}

    @functools.lru_cache(maxsize=4)  # noqa: B019 - at most two epochs meet in one batch
    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative pair ends in that order) of epoch `e`."""
        if self.seed is None:
            order = np.arange(self.store.num_documents, dtype=np.int64)
            return order, np.cumsum(self._pairs)
        key = f"seed{self.seed}-epoch{e}-{self.store.identity[:16]}"
        cache = self.cache_dir if self.store.num_documents >= CACHE_MIN_DOCUMENTS else None
        files = () if cache is None else (cache / f"{key}.order.npy", cache / f"{key}.ends.npy")
        if files and all(f.is_file() for f in files):
            try:
                return np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r")
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed below (it is derived data)
        rng = np.random.default_rng([self.seed, e])
        order = rng.permutation(self.store.num_documents).astype(np.int64)
        ends = np.cumsum(self._pairs[order])
        if cache is not None:
            self._save(cache, files, (order, ends))
        return order, ends

    def _save(self, cache, files, arrays) -> None:
        try:  # a read-only store still works: the index is recomputed in memory each run
            cache.mkdir(exist_ok=True)
            for f, a in zip(files, arrays):
                tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, a)
                os.replace(tmp, f)
        except OSError as e:
            log.info("sample index cache not written (%s); computed in memory", e)

    def rows(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Packed rows of the global sample numbers `samples` ([n] int) -> dict of [n, T]."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs = samples // self.rows_per_epoch
        out = {k: np.empty((len(samples), self.seq_len), np.int32)
               for k in ("tokens", "targets", "positions", "segment_ids")}
        out["loss_mask"] = np.empty((len(samples), self.seq_len), np.float32)
        for e in np.unique(epochs):  # one or two epochs per batch
            sel = np.flatnonzero(epochs == e)
            part = self._epoch_rows(int(e), samples[sel] % self.rows_per_epoch)
            for k, v in part.items():
                out[k][sel] = v
        return out

    def _epoch_rows(self, e: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        T, P = self.seq_len, self.pairs_per_epoch
        order, ends = self.epoch(e)
        ends = np.asarray(ends)
        a = rows * T  # [n] first stream position of each row
        b = np.minimum(a + T, P)  # [n] end of the real pairs of each row
        first = np.searchsorted(ends, a, side="right")  # [n] document holding position a
        last = np.searchsorted(ends, b - 1, side="right")  # [n] document holding b - 1
        pieces = last - first + 1  # [n] document pieces per row
        # [M] one entry per (row, piece): its row and its document (in epoch order)
        piece_row = np.repeat(np.arange(len(rows)), pieces)
        piece_start = np.cumsum(pieces) - pieces
        j = first[piece_row] + (np.arange(pieces.sum()) - piece_start[piece_row])
        doc = np.asarray(order[j])  # [M] store document of each piece
        # Only the pieces' documents are touched: O(rows x pieces), never O(documents).
        doc_start = ends[j] - self._pairs[doc]  # stream position of the document's pair 0
        lo = np.maximum(doc_start, a[piece_row])
        hi = np.minimum(ends[j], b[piece_row])
        count = hi - lo  # pairs of the piece inside the row
        # token index of the piece's first input: document offset + offset inside the document
        token0 = np.asarray(self.store.offsets)[doc] + (lo - doc_start)
        # Flatten: the real pairs of all rows, in row order, then padding per row.
        real = b - a  # [n]
        flat_piece = np.repeat(np.arange(len(j)), count)  # [sum(real)]
        within = np.arange(len(flat_piece)) - np.repeat(np.cumsum(count) - count, count)
        idx = token0[flat_piece] + within
        seg = (np.arange(len(j)) - piece_start[piece_row] + 1)[flat_piece]
        inputs, targets = self.store.pairs(idx)  # a bucket store: one round of ranged reads
        n = len(rows)
        result: dict[str, np.ndarray] = {k: np.zeros((n, T), np.int32)
                                         for k in ("tokens", "targets", "positions", "segment_ids")}
        mask = np.zeros((n, T), np.float32)
        if (real == T).all():  # the common case: no padded row in this batch
            result["tokens"][:] = inputs.reshape(n, T)
            result["targets"][:] = targets.reshape(n, T)
            result["positions"][:] = within.reshape(n, T)
            result["segment_ids"][:] = seg.reshape(n, T)
            mask[:] = 1.0
        else:  # the last row of an epoch: real pairs first, then padding (segment 0, mask 0)
            col = np.arange(T)
            keep = col[None, :] < real[:, None]
            result["tokens"][keep] = inputs
            result["targets"][keep] = targets
            result["positions"][keep] = within
            result["segment_ids"][keep] = seg
            mask[keep] = 1.0
        result["loss_mask"] = mask
        return result

