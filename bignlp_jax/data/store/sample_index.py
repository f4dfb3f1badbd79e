"""Global sample index over a token store: packed sample s is a pure function of (seed, s).

Each document d (<s> ids </s>, length L_d) gives L_d - 1 (input, target) pairs. The index has
two levels, so a process holds arrays only for the shards its rows touch:

- Epoch e orders the store's shards (a permutation over shards drawn from (seed, e); stored order
  when seed is None). Shard j holds R_j = ceil(P_j / T) rows (P_j: its pairs), so an epoch has
  R = sum R_j rows, and global sample s is row s mod R of epoch s div R. Finding its shard is a
  binary search in the cumulative R_j of the epoch's shard order (one small array per epoch).
- Inside a shard, epoch e lays its documents out in the order perm_{e,j} (drawn from
  (seed, e, j); from (seed, e) for a store of one shard, as the single-store index always did)
  and concatenates their pairs; row i of the shard is pairs [i*T, (i+1)*T) of that stream (its
  last row is padded). The document order and its cumulative pair counts (Megatron's document
  index) are computed for a shard when a row first needs them and kept in a small LRU cache:
  host memory grows with the shard size and the cache, not with the corpus.

A store of one shard is therefore read exactly as before shards existed. The per-shard arrays
depend on the seed and the shard only, not on seq_len, batch size or process count; for shards
of at least CACHE_MIN_DOCUMENTS documents they are cached as .npy files in the shard's `index/`
directory (a store in a bucket keeps no cache: each host computes them in memory).

A packed row gives `tokens`, `targets`, `positions` (restarting at 0 for every document piece),
`segment_ids` (1, 2, ... per piece; 0 = padding) and `loss_mask` (1 for every real target), so
attention never crosses documents. Everything is vectorised over all rows of a batch.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from bignlp_jax.data.store.shards import ShardedStore
from bignlp_jax.data.store.token_store import TokenStore

log = logging.getLogger(__name__)
# Epoch arrays are cached on disk only for shards this large: below it a permutation costs
# milliseconds, and a small corpus read for many epochs would leave thousands of tiny files.
CACHE_MIN_DOCUMENTS = 1_000_000
# Shards whose epoch arrays a process keeps: a batch's rows lie in one or two shards of one or
# two epochs; the rest covers Grain's prefetch.
SHARD_CACHE = 8


class SampleIndex:
    """Packed rows of length `seq_len` of `store`, epochs shuffled with `seed` (None: stored
    order every epoch)."""

    def __init__(self, store: TokenStore | ShardedStore, seq_len: int, seed: int | None):
        self.store = ShardedStore.of(store)
        self.seq_len = seq_len
        self.seed = None if seed is None else seed % 2**32
        pairs = np.array([s.pairs for s in self.store.shards], dtype=np.int64)
        self.shard_rows = -(-pairs // seq_len)  # [shards] rows of each shard
        self.shard_pairs = pairs
        self.pairs_per_epoch = int(pairs.sum())
        self.rows_per_epoch = int(self.shard_rows.sum())
        # a store in a bucket keeps no cache beside it: np.save writes local files
        self.cache = not self.store.remote
        self._epoch = functools.lru_cache(maxsize=SHARD_CACHE)(self._compute_epoch)
        self._order = functools.lru_cache(maxsize=4)(self._shard_order)

    def __getstate__(self) -> dict:  # (Grain workers) the caches are rebuilt where used
        return {"store": self.store, "seq_len": self.seq_len, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        seed = state["seed"]
        type(self).__init__(self, state["store"], state["seq_len"], seed)

    def identity(self) -> dict:
        return {"store": self.store.identity, "seed": self.seed}

    def _shard_order(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order of epoch `e`, cumulative rows in that order)."""
        n = len(self.store.shards)
        if self.seed is None or n == 1:
            order = np.arange(n, dtype=np.int64)
        else:  # its own stream: (seed, e) draws a single shard's document order
            order = np.random.default_rng([self.seed, e, 2**32 - 1]).permutation(n)
        return order, np.cumsum(self.shard_rows[order])

    def epoch(self, e: int, j: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative pair ends in that order) of shard `j` in epoch `e`."""
        order, ends, _ = self._epoch(e, j)
        return order, ends

    def _compute_epoch(self, e: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard = self.store.shard(j)
        pairs = np.diff(np.asarray(shard.offsets)) - 1  # pairs per document
        if self.seed is None:
            order = np.arange(shard.num_documents, dtype=np.int64)
            return order, np.cumsum(pairs), pairs
        key = f"seed{self.seed}-epoch{e}-{shard.identity[:16]}"
        cache = (shard.path / "index" if self.cache
                 and shard.num_documents >= CACHE_MIN_DOCUMENTS else None)
        files = () if cache is None else (cache / f"{key}.order.npy", cache / f"{key}.ends.npy")
        if files and all(f.is_file() for f in files):
            try:
                return (np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r"),
                        pairs)
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed below (it is derived data)
        seed = [self.seed, e] if len(self.store.shards) == 1 else [self.seed, e, j]
        order = np.random.default_rng(seed).permutation(shard.num_documents).astype(np.int64)
        ends = np.cumsum(pairs[order])
        if cache is not None:
            self._save(cache, files, (order, ends))
        return order, ends, pairs

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
        rows = samples % self.rows_per_epoch
        out = {k: np.empty((len(samples), self.seq_len), np.int32)
               for k in ("tokens", "targets", "positions", "segment_ids")}
        out["loss_mask"] = np.empty((len(samples), self.seq_len), np.float32)
        for e in np.unique(epochs):  # one or two epochs per batch
            in_epoch = np.flatnonzero(epochs == e)
            order, ends = self._order(int(e))
            at = np.searchsorted(ends, rows[in_epoch], side="right")  # [n] position in order
            shard = order[at]
            row = rows[in_epoch] - (ends[at] - self.shard_rows[shard])  # row inside the shard
            for j in np.unique(shard):  # one or two shards per batch
                sel = np.flatnonzero(shard == j)
                part = self._epoch_rows(int(e), int(j), row[sel])
                for k, v in part.items():
                    out[k][in_epoch[sel]] = v
        return out

    def _epoch_rows(self, e: int, j: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows` of shard `j` in epoch `e`."""
        T, P = self.seq_len, int(self.shard_pairs[j])
        store = self.store.shard(j)
        order, ends, pairs = self._epoch(e, j)
        ends = np.asarray(ends)
        a = rows * T  # [n] first stream position of each row
        b = np.minimum(a + T, P)  # [n] end of the real pairs of each row
        first = np.searchsorted(ends, a, side="right")  # [n] document holding position a
        last = np.searchsorted(ends, b - 1, side="right")  # [n] document holding b - 1
        pieces = last - first + 1  # [n] document pieces per row
        # [M] one entry per (row, piece): its row and its document (in epoch order)
        piece_row = np.repeat(np.arange(len(rows)), pieces)
        piece_start = np.cumsum(pieces) - pieces
        at = first[piece_row] + (np.arange(pieces.sum()) - piece_start[piece_row])
        doc = np.asarray(order[at])  # [M] store document of each piece
        # Only the pieces' documents are touched: O(rows x pieces), never O(documents).
        doc_start = ends[at] - pairs[doc]  # stream position of the document's pair 0
        lo = np.maximum(doc_start, a[piece_row])
        hi = np.minimum(ends[at], b[piece_row])
        count = hi - lo  # pairs of the piece inside the row
        # token index of the piece's first input: document offset + offset inside the document
        token0 = np.asarray(store.offsets)[doc] + (lo - doc_start)
        # Flatten: the real pairs of all rows, in row order, then padding per row.
        real = b - a  # [n]
        flat_piece = np.repeat(np.arange(len(at)), count)  # [sum(real)]
        within = np.arange(len(flat_piece)) - np.repeat(np.cumsum(count) - count, count)
        idx = token0[flat_piece] + within
        seg = (np.arange(len(at)) - piece_start[piece_row] + 1)[flat_piece]
        inputs, targets = store.pairs(idx)  # a bucket store: one round of ranged reads
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

