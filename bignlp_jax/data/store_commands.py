"""CLI: `bignlp-jax data tokenize ...` (build token stores), `data bench CONFIG` (loader alone)."""

from __future__ import annotations

import argparse
import json
import os
import time

# Function-level imports: a command loads its package only when run (a fast `--help`).


def cmd_data_tokenize(args) -> int:
    from bignlp_jax import storage
    from bignlp_jax.data import embedded
    from bignlp_jax.data.store.shards import ShardedStore
    from bignlp_jax.data.tfds_source import resolve_data_dir, split_size
    from bignlp_jax.data.token_build import build_store
    from bignlp_jax.data.token_store import MANIFEST, StoreSpec, dataset_identity, store_dir
    from bignlp_jax.data.tokenizer import load_tokenizer

    data_dir = resolve_data_dir(args.data_dir)
    remote = storage.is_remote(data_dir)
    if remote:  # a bucket: fail fast, in one line, if it cannot be written
        storage.check_access(data_dir, "--data-dir")
    elif args.name in embedded.EMBEDDED:
        embedded.ensure_embedded(data_dir)
    tokenizer = load_tokenizer(args.tokenizer)
    sha = tokenizer.describe()["model_sha256"]
    model = str(storage.absolute(tokenizer.model_path))
    results = []
    for split in args.split or ["train", "validation"]:
        count = split_size(args.name, data_dir, split, required_keys=(args.text_key,))
        spec = StoreSpec(args.name, str(data_dir), split, args.text_key, model, sha)
        path = store_dir(spec, dataset_identity(args.name, data_dir, split, args.text_key,
                                                count))
        start = time.perf_counter()
        if (path / MANIFEST).is_file() and not args.overwrite:
            # verifies sizes and sha256 (in a bucket: reads the whole store once)
            store = ShardedStore(path, sha, spec.rebuild_command(), verify_tokens=True)
            for j in range(len(store.shards)):
                store.shard(j)
            print(f"token store {path} already built and verified (--overwrite rebuilds it)")
        else:
            path = build_store(spec, count, tokenizer.vocab_size, args.workers,
                               overwrite=args.overwrite, shard_tokens=args.shard_tokens)
            store = ShardedStore(path, sha, spec.rebuild_command())
        seconds = time.perf_counter() - start
        info = store.describe()
        info["tokens_per_sec"] = store.manifest["tokens"] / max(
            store.manifest["build_seconds"], 1e-9)
        info["seconds"] = round(seconds, 3)
        results.append(info)
    print(json.dumps({"stores": results}))
    return 0


def cmd_data_bench(args) -> int:
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.data import make_source

    cfg = load_config(args.config, args.overrides or [])
    B, T = cfg.train.global_batch_size, cfg.data.seq_len
    n, i = jax.process_count(), jax.process_index()
    rows = (i * B // n, (i + 1) * B // n)
    start = time.perf_counter()
    source = make_source(cfg, "train", rows)
    if args.start_step:
        source.set_state({**source.get_state(), "step": args.start_step})
    next(source)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(source)
    seconds = time.perf_counter() - start
    local_rows = rows[1] - rows[0]
    result = {"tokens_per_sec": args.steps * local_rows * T / seconds,
              "rows_per_sec": args.steps * local_rows / seconds, "first_batch_s": first,
              "steps": args.steps, "seq_len": T, "global_batch": B, "rows": list(rows),
              "start_step": args.start_step, "workers": cfg.data.workers,
              "threads": cfg.data.worker_threads, "keys": sorted(batch)}
    print(f"loader: {result['tokens_per_sec']:,.0f} tokens/s, {result['rows_per_sec']:,.1f} "
          f"rows/s, first batch {first:.2f} s ({args.steps} batches of {local_rows} x {T})")
    print(json.dumps(result))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def register(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("tokenize", help="tokenize a prepared dataset once into token stores")
    p.add_argument("--name", required=True, help="prepared TFDS dataset (e.g. stdlib_docs)")
    p.add_argument("--data-dir", default=None,
                   help="TFDS data dir, or gs:// / s3:// (default: the cache dir)")
    p.add_argument("--tokenizer", required=True, help="a .model file, tokenizer dir or run dir")
    p.add_argument("--split", action="append",
                   help="split to tokenize (repeatable; default train and validation)")
    p.add_argument("--text-key", default="text", help="text field (default text)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing store")
    p.add_argument("--shard-tokens", type=_positive, default=None,
                   help="write the store as shards of at most this many tokens (default: one "
                        "file)")
    p.set_defaults(func=cmd_data_tokenize, command="data tokenize")

    p = data_sub.add_parser("bench", help="time the data loader alone (last line: JSON)")
    p.add_argument("config", help="run config (path, or name under configs/, e.g. tiny)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--steps", type=int, default=20, help="batches to time (default 20)")
    p.add_argument("--start-step", type=int, default=0,
                   help="first batch to read (time to the first batch of a resumed run)")
    p.set_defaults(func=cmd_data_bench, command="data bench")
