"""BatchSource over token stores: batch k row r is global sample k*B + r, read by index.

One Grain `MapDataset` per process maps step k to this process's rows [lo, hi) of batch k
(`MixturePlan` says which dataset and which of its samples each row is; `SampleIndex` packs
it), so a process reads only its own rows and the global batch is the same for any number of
processes. `workers` > 0 runs the map in Grain worker processes and `threads` > 0 prefetches
in threads; Grain keeps the order, so neither changes a batch. The state is the step and the
identity of the data (stores, seeds, weights): restoring it at any step costs the same and
works for any process count, because batch k is computed, not replayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

from bignlp_jax.data.store.mixture import MixturePlan
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.errors import UserError

STATE_VERSION = 2
KIND = "token_store"
# Far beyond any run: the stream of batches is endless (epochs repeat, reshuffled).
_ENDLESS = 2**62


class _Batch:
    """Picklable map function (Grain workers): step -> this process's rows of that batch."""

    def __init__(self, indexes: list[SampleIndex], plan: MixturePlan, rows: tuple[int, int]):
        self.indexes, self.plan, self.rows = indexes, plan, rows

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        lo, hi = self.rows
        parts = self.plan.rows(int(k), lo, hi)
        if len(parts) == 1:  # the common case (one dataset, or all rows from one)
            return self.indexes[parts[0][0]].rows(parts[0][2])
        T = self.indexes[0].seq_len
        out = {k_: np.empty((hi - lo, T), np.float32 if k_ == "loss_mask" else np.int32)
               for k_ in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
        for d, where, samples in parts:
            for key, value in self.indexes[d].rows(samples).items():
                out[key][where] = value
        return out


class StoreBatches:
    """Rows [lo, hi) of each global batch of `global_batch` rows from a mixture of datasets."""

    def __init__(self, indexes: dict[str, SampleIndex], weights: dict[str, float], *,
                 global_batch: int, rows: tuple[int, int], workers: int = 0, threads: int = 0):
        lo, hi = rows
        if not 0 <= lo < hi <= global_batch:
            raise ValueError(f"rows {rows} are not inside a global batch of {global_batch}")
        self.names = list(indexes)
        self.plan = MixturePlan(self.names, [weights[n] for n in self.names], global_batch)
        self.global_batch, self.rows = global_batch, rows
        self.workers, self.threads = workers, threads
        self._map = _Batch([indexes[n] for n in self.names], self.plan, rows)
        self.step = 0
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def identity(self) -> dict[str, Any]:
        """What the batch order depends on besides the step (not seq_len, batch, processes)."""
        return {"datasets": {n: {**i.identity(), "weight": float(w)} for n, i, w in zip(
            self.names, self._map.indexes, [x / self.plan.den for x in self.plan.num])}}

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """This process's rows of batch k, computed directly (no iterator)."""
        return self._map(k)

    def _make_iter(self):
        ds = grain.MapDataset.range(self.step, _ENDLESS).map(self._map)
        read = grain.ReadOptions(num_threads=self.threads,
                                 prefetch_buffer_size=2 * self.threads if self.threads else 0)
        it = ds.to_iter_dataset(read)
        if self.workers:
            # Grain's worker processes read absl flags, which only an absl `app.run` parses.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(it)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "kind": KIND, "step": self.step, **self.identity()}

    def set_state(self, state: dict) -> None:
        """Continue at `state`'s step: O(1), for any process count, seq_len or batch size."""
        if state.get("kind") != KIND or state.get("version") != STATE_VERSION:
            raise UserError(
                f"the checkpoint's data state (kind {state.get('kind')!r}, version "
                f"{state.get('version')}) was not written by the token-store loader of this "
                "version; resume it with the bignlp_jax version that wrote it, or start a new "
                "run.dir")
        saved, mine = state.get("datasets"), self.identity()["datasets"]
        if saved != mine:
            raise UserError(
                "cannot resume the data stream: the checkpoint read "
                f"{_describe(saved)} but this run reads {_describe(mine)}; the batch order "
                "depends on them\n  fix: use the data (stores, run.seed, data.mixture) of the "
                "checkpoint, or start a new run.dir")
        self.step = int(state["step"])
        self._iter = None


def _describe(datasets: dict | None) -> str:
    if not datasets:
        return "(nothing)"
    return ", ".join(f"{n} (store {d.get('store', '?')[:12]}, seed {d.get('seed')}, weight "
                     f"{d.get('weight', 0):.4g})" for n, d in datasets.items())
