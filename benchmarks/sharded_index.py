"""Host memory and first-batch time of the two-level sample index on a synthetic sharded store.

    PYTHONPATH=. python benchmarks/sharded_index.py make DIR [--shards 1000 --docs 100000]
    PYTHONPATH=. python benchmarks/sharded_index.py measure DIR [--step 0 --rows 256]

`make` writes a sharded store of SHARDS x DOCS documents (lengths 2..4094, mean ~2,048 tokens)
whose `tokens.bin` files are sparse (all zeros: no disk used) while the offsets, chunk
checksums and manifests are real; the tokens' sha256 is not computed (it would read ~200 TB of
zeros) and stands as a placeholder, which only the identity uses. `measure` (run it in a fresh
process) opens the store, builds the index for seq_len 2048 and reads the rows [0, ROWS) of
global batch STEP (of 256 rows), and prints as JSON the time, the peak of Python/NumPy heap
allocations (tracemalloc: what the index and the batch hold) and the process's peak RSS before
and after (RSS also counts the token pages mapped and read by the chunk checks: file-backed,
reclaimable page cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bignlp_jax.data.store.chunks import CHUNK_TOKENS  # noqa: E402
from bignlp_jax.data.store.manifest import FORMAT, MANIFEST, OFFSETS, TOKENS  # noqa: E402
from bignlp_jax.data.store.shard_files import write_sharded_manifest  # noqa: E402
from bignlp_jax.data.store.shards import shard_entry  # noqa: E402


def make(root: Path, shards: int, docs: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    info = {"dataset": "synthetic", "split": "train", "text_key": None,
            "dataset_identity": None, "tokenizer_sha256": "0" * 64, "vocab_size": 32000,
            "dtype": "uint16"}
    zero_crc = zlib.crc32(bytes(2 * CHUNK_TOKENS))
    entries = []
    rng = np.random.default_rng(0)
    for j in range(shards):
        name = f"shard-{j:05d}"
        folder = root / name
        folder.mkdir(exist_ok=True)
        lengths = rng.integers(2, 4095, docs, dtype=np.int64)
        offsets = np.zeros(docs + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = int(offsets[-1])
        with open(folder / TOKENS, "wb") as f:
            f.truncate(2 * tokens)  # sparse: zeros, no blocks
        np.save(folder / OFFSETS, offsets)
        full, last = divmod(tokens, CHUNK_TOKENS)
        crcs = [zero_crc] * full + ([zlib.crc32(bytes(2 * last))] if last else [])
        manifest = {"format": FORMAT, **info, "documents": docs, "tokens": tokens,
                    "sha256": {TOKENS: hashlib.sha256(f"sparse {j} {tokens}".encode())
                               .hexdigest(),
                               OFFSETS: hashlib.sha256((folder / OFFSETS).read_bytes())
                               .hexdigest()},
                    "chunks": {"tokens": CHUNK_TOKENS, "crc32": crcs}}
        (folder / MANIFEST).write_text(json.dumps(manifest))
        entries.append(shard_entry(name, manifest))
    write_sharded_manifest(root, entries, info)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(root: Path, step: int, rows: int) -> dict:
    from bignlp_jax.data.store.batches import StoreBatches
    from bignlp_jax.data.store.sample_index import SampleIndex
    from bignlp_jax.data.store.shards import ShardedStore

    before = rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    store = ShardedStore(root)
    opened = time.perf_counter() - start
    table = tracemalloc.get_traced_memory()[0]
    index = SampleIndex(store, 2048, seed=0)
    source = StoreBatches({"d": index}, {"d": 1.0}, global_batch=256, rows=(0, rows))
    batch = source.batch(step)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(step + 1, step + 6):
        source.batch(k)
    per_batch = (time.perf_counter() - start) / 5
    heap_peak = tracemalloc.get_traced_memory()[1]
    return {"shards": len(store.shards), "documents": store.num_documents,
            "tokens": int(store.manifest["tokens"]), "step": step, "rows": rows,
            "open_s": round(opened, 3), "first_batch_s": round(first, 3),
            "next_batch_s": round(per_batch, 3), "shards_opened": len(store._open),
            "store_table_mib": round(table / 2**20, 1),
            "heap_peak_mib": round(heap_peak / 2**20, 1),
            "peak_rss_before_mib": round(before), "peak_rss_after_mib": round(rss_mib()),
            "rows_shape": list(batch["tokens"].shape), "pid": os.getpid()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=("make", "measure"))
    p.add_argument("dir", type=Path)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--rows", type=int, default=256)
    args = p.parse_args()
    if args.action == "make":
        start = time.perf_counter()
        make(args.dir, args.shards, args.docs)
        print(json.dumps({"made_s": round(time.perf_counter() - start, 1)}))
    else:
        print(json.dumps(measure(args.dir, args.step, args.rows)))


if __name__ == "__main__":
    main()
