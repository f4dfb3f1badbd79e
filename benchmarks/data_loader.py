"""Token-store loader vs the old per-row "lanes" loader, interleaved in one process.

    PYTHONPATH=. python benchmarks/data_loader.py --data-dir /tmp/bench_data [--rounds 3]

Both read `stdlib_docs` train with the default 1024-piece tokenizer at seq_len 2048, global
batch 256 (all rows in this process), seed 0. The new loader is `make_source` (token store built
before timing); the old one is the lanes pipeline as it was before the token store
(`legacy_lanes_loader.py`, a verbatim copy, with one Grain read thread per lane as
`data.worker_threads=1` gave). Each round times `--batches` batches of each, alternating, so
machine load hits both alike. Last line: JSON with the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from legacy_lanes_loader import PackedBatches, lm_encoder  # noqa: E402

from bignlp_jax.config import load_config  # noqa: E402
from bignlp_jax.data import make_source  # noqa: E402
from bignlp_jax.data.dataset_choice import resolve_tokenizer  # noqa: E402
from bignlp_jax.data.text_source import _open  # noqa: E402


def timed(source, batches: int) -> float:
    next(source)  # the first batch includes start-up; both are timed from the second
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    cfg = load_config("tiny", [f"data.data_dir={args.data_dir}", f"data.seq_len={args.seq_len}",
                               f"train.global_batch_size={args.batch}", "run.seed=0",
                               f"model.max_seq_len={args.seq_len}"])
    rows = (0, args.batch)
    make_source(cfg, "train", rows)  # builds the store outside the timing
    tokens = args.batch * args.seq_len * args.batches
    new, old = [], []
    for _ in range(args.rounds):
        new.append(tokens / timed(make_source(cfg, "train", rows), args.batches))
        legacy = PackedBatches(
            _open("stdlib_docs", str(Path(args.data_dir).absolute()), "train", "text"),
            lm_encoder(resolve_tokenizer(cfg), "text"), seq_len=args.seq_len,
            global_batch=args.batch, rows=rows, seed=0, num_threads=1)
        old.append(tokens / timed(legacy, args.batches))
        print(f"round: new {new[-1]:,.0f} tokens/s, old {old[-1]:,.0f} tokens/s", flush=True)
    result = {"new_tokens_per_sec": statistics.median(new),
              "old_tokens_per_sec": statistics.median(old),
              "speedup": statistics.median(new) / statistics.median(old),
              "seq_len": args.seq_len, "global_batch": args.batch, "rounds": args.rounds,
              "batches_per_round": args.batches}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
