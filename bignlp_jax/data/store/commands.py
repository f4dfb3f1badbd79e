"""CLI: `bignlp-jax data tokenize ...`: build token stores."""

from __future__ import annotations

import argparse
import json
import os
import time

from bignlp_jax.errors import UserError

# Function-level imports: a command loads its package only when run (a fast `--help`).

# Shard size of raw-file builds: ~256 MiB of uint16 ids, a few minutes of one tokenizer process.
DEFAULT_SHARD_TOKENS = 2**27


def cmd_data_tokenize(args) -> int:
    if args.input:
        return _tokenize_files(args)
    if args.out or args.ray or args.shard:
        raise UserError("--out, --ray and --shard build a store from raw files: they need "
                        "--input\n  fix: pass --input 'FILES' --out STORE, or leave them out "
                        "to tokenize the prepared dataset --name")
    from bignlp_jax import storage
    from bignlp_jax.access import check_path
    from bignlp_jax.data.corpora import embedded
    from bignlp_jax.data.store.build import build_store
    from bignlp_jax.data.store.manifest import MANIFEST
    from bignlp_jax.data.store.shards import ShardedStore
    from bignlp_jax.data.store.token_store import StoreSpec, dataset_identity, store_dir
    from bignlp_jax.data.tfds.source import resolve_data_dir, split_size
    from bignlp_jax.data.tokenizer import load_tokenizer

    data_dir = resolve_data_dir(args.data_dir)
    remote = storage.is_remote(data_dir)
    check_path(data_dir, "--data-dir", fix="--data-dir DIR")  # fail fast, in one line
    if not remote and args.name in embedded.EMBEDDED:
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


def _tokenize_files(args) -> int:
    from bignlp_jax.data.store import raw_build

    if not args.out:
        raise UserError("--input needs --out STORE (a folder, gs:// or s3://) for the store\n"
                        "  fix: add --out, e.g. --out gs://bucket/stores/corpus")
    tasks, info = raw_build.plan(args.input, args.out, args.tokenizer, name=args.name,
                                 split=args.split[0] if args.split else "train",
                                 text_key=args.text_key, fmt=args.format,
                                 text_unit=args.text_unit,
                                 shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS)
    runner = raw_build.run_in_process
    if args.ray:
        from bignlp_jax.data.store import ray_build  # ray: only with --ray

        runner = ray_build.runner(args.ray)
    summary = raw_build.tokenize_files(tasks, info, shard=args.shard or (0, 1), runner=runner)
    print(json.dumps({"store": summary}))
    return 0


def _slice(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 3/16), not {text}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text}: I must be in 0..N-1")
    return i, n


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def register(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("tokenize", help="tokenize a prepared dataset, or raw files (--input), "
                                             "once into token stores")
    p.add_argument("--name", required=True, help="prepared TFDS dataset (e.g. stdlib_docs); "
                   "with --input, the name recorded in the store")
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
                        f"file; with --input {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--input", action="append",
                   help="raw input files (glob, repeatable; local, gs://, s3://): JSON lines, "
                        "Parquet, text, optionally .gz/.bz2/.xz/.zst; one task per file")
    p.add_argument("--out", help="with --input: the store's folder (local, gs://, s3://)")
    p.add_argument("--format", choices=("text", "jsonl", "parquet"),
                   help="with --input: the inputs' format (default: from their names)")
    p.add_argument("--text-unit", choices=("file", "paragraph", "line"), default="file",
                   help="with --input: a text file's documents (default: the whole file)")
    p.add_argument("--ray", metavar="ADDRESS|local",
                   help="with --input: run the tasks on the Ray cluster at ADDRESS (or a "
                        "local one); default: in this process")
    p.add_argument("--shard", type=_slice, metavar="I/N",
                   help="with --input: build only tasks I, I+N, ... (an array job of N); the "
                        "last slice to finish writes the manifest")
    p.set_defaults(func=cmd_data_tokenize, command="data tokenize")
