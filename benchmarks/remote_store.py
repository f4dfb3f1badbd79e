"""Token-store read throughput: local disk (np.memmap) vs the GCS emulator (ranged reads).

    PYTHONPATH=. python benchmarks/remote_store.py [--rounds 3] [--batches 8] [--threads 0,4]

Builds the `stdlib_docs` train store (default 1024-piece tokenizer) in a temporary data dir,
uploads it to fake-gcs-server (in memory, tests/storage_emulators.py), and reads the same
shuffled batches (seed 0) from both through `StoreBatches`, the loader training uses: first
the local store, then the bucket store with each `--threads` setting (Grain prefetch threads,
`data.worker_threads`), and once more with no merging of nearby ranges (one request per
document piece: what a corpus much larger than this one gets), interleaved per round so
machine load hits all alike. Every batch from
the bucket is checked bitwise against the local one. The emulator answers on loopback, so
these figures are the cost of the ranged-read path (HTTP, gcsfs), not of a real network: a
real bucket adds tens of milliseconds per round of requests, which the prefetch threads hide.
Last line: JSON with the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=32, help="rows per batch (one host's)")
    parser.add_argument("--threads", default="0,4")
    args = parser.parse_args()

    import numpy as np
    import storage_emulators  # the tests' emulator start-up

    gen = storage_emulators.gcs_server()
    next(gen)  # emulator up, env set

    from bignlp_jax import storage
    from bignlp_jax.config import load_config
    from bignlp_jax.data.store import remote as remote_store
    from bignlp_jax.data.store.batches import StoreBatches
    from bignlp_jax.data.store.manifest import MANIFEST
    from bignlp_jax.data.store.sample_index import SampleIndex
    from bignlp_jax.data.store.token_store import TokenStore
    from bignlp_jax.data.text_source import open_store

    data_dir = tempfile.mkdtemp(prefix="bignlp-bench-data-")
    cfg = load_config("tiny", [f"data.data_dir={data_dir}", "model.vocab_size=1024"])
    local = open_store(cfg, "stdlib_docs", "train", "text")  # builds it (not timed)
    bucket = storage_emulators.new_bucket("gs")
    remote_path = f"{bucket}/token_stores/stdlib_docs"
    remote_store.publish_store(local.path, storage.path(remote_path), MANIFEST)
    remote = TokenStore(remote_path)
    threads = [int(t) for t in args.threads.split(",")]
    B, T = args.rows, args.seq_len

    def loader(store, n_threads):
        index = SampleIndex(store, T, seed=0)
        return StoreBatches({"d": index}, {"d": 1.0}, global_batch=B, rows=(0, B),
                            threads=n_threads)

    # count the requests and bytes of one batch (rows of 2048 tokens hit 1-3 documents each)
    calls: list[tuple[int, int]] = []
    read = remote.tokens._read

    def counting(starts, ends):
        calls.append((len(starts), int((ends - starts).sum()) * remote.tokens.dtype.itemsize))
        return read(starts, ends)

    remote.tokens._read = counting
    loader(remote, 0).batch(5)
    merge_gap, remote_store.MERGE_GAP_BYTES = remote_store.MERGE_GAP_BYTES, 0
    loader(remote, 0).batch(5)
    remote_store.MERGE_GAP_BYTES = merge_gap
    remote.tokens._read = read
    (requests, fetched), (requests_unmerged, fetched_unmerged) = calls

    reference = [loader(local, 0).batch(k) for k in range(args.batches + 1)]
    rates: dict[str, list[float]] = {"local": [], **{f"gcs_threads{t}": [] for t in threads},
                                     f"gcs_threads{threads[-1]}_unmerged": []}
    for _ in range(args.rounds):
        for name in rates:
            store = local if name == "local" else remote
            remote_store.MERGE_GAP_BYTES = 0 if name.endswith("unmerged") else merge_gap
            n_threads = 0 if name == "local" else int(name.split("threads")[1].split("_")[0])
            source = loader(store, n_threads)
            first = next(source)  # start-up (and the prefetch threads' fill) not timed
            start = time.perf_counter()
            batches = [next(source) for _ in range(args.batches)]
            rates[name].append(B * T * args.batches / (time.perf_counter() - start))
            source._iter.close()  # stop its prefetch threads before the next one is timed
            for got, want in zip([first, *batches], reference):
                assert all(np.array_equal(got[k], want[k]) for k in want), name
        print("round: " + ", ".join(f"{n} {r[-1]:,.0f} tokens/s" for n, r in rates.items()),
              flush=True)
    medians = {n: statistics.median(r) for n, r in rates.items()}
    print(json.dumps({
        "tokens_per_sec": medians,
        "vs_local": {n: medians[n] / medians["local"] for n in medians if n != "local"},
        "requests_per_batch": requests, "bytes_fetched_per_batch": fetched,
        "unmerged_requests_per_batch": requests_unmerged,
        "unmerged_bytes_fetched_per_batch": fetched_unmerged,
        "bytes_used_per_batch": B * T * 2, "rows": B, "seq_len": T,
        "batches_per_round": args.batches, "rounds": args.rounds}))
    time.sleep(2)  # prefetches still in flight in closed iterators finish before the emulator stops
    gen.close()
    shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
