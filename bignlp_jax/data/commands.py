"""CLI: `bignlp-jax tokenizer train ...` and `bignlp-jax data prepare|embedded|bench ...` (and,
from store/commands.py, `data tokenize`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.data.store import commands as store_commands
from bignlp_jax.errors import UserError

# Function-level imports: a command loads its package only when run (a fast `--help`).


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def training_texts(args) -> tuple[list[str], str]:
    """Texts to train a tokenizer on, and a description of where they came from."""
    from bignlp_jax.data.corpora import embedded
    from bignlp_jax.data.tfds.local_files import expand_inputs, iter_documents
    from bignlp_jax.data.tfds.source import open_split, resolve_data_dir, text_of

    limit = args.max_documents
    as_dataset = args.data_dir is not None or (
        args.input in embedded.EMBEDDED and not Path(args.input).exists()
    )
    if as_dataset:
        data_dir = resolve_data_dir(args.data_dir)
        if args.input in embedded.EMBEDDED:
            embedded.ensure_embedded(data_dir)
        source = open_split(args.input, data_dir, args.split, required_keys=(args.text_key,))
        n = len(source) if limit is None else min(limit, len(source))
        texts = [text_of(source[i], args.text_key) for i in range(n)]
        return texts, f"tfds:{args.input}/{args.split} in {data_dir} ({n} documents)"
    files = expand_inputs([args.input])
    texts = []
    for _, doc in iter_documents(files, args.format, (args.text_key,)):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(doc[args.text_key])
    return texts, f"{args.input} ({len(files)} files, {len(texts)} documents)"


def cmd_tokenizer_train(args) -> int:
    from bignlp_jax.data.tokenizer import JSON_FILE, train_tokenizer

    texts, origin = training_texts(args)
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size, args.model_type)
    info = tokenizer.describe()
    info["trained_on"] = origin
    # The provenance goes into the JSON written next to the model as well.
    (Path(args.out) / JSON_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"tokenizer ({info['model_type']}, {info['vocab_size']} pieces) trained on {origin}")
    print(f"  written to {args.out}; use it with data.tokenizer={args.out} "
          f"model.vocab_size={info['vocab_size']}")
    print(json.dumps(info))
    return 0


def cmd_data_prepare(args) -> int:
    from bignlp_jax.data.tfds.local_files import prepare_local
    from bignlp_jax.data.tfds.source import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    remote = storage.path(data_dir) / args.name
    if storage.is_remote(data_dir) and remote.exists() and not args.overwrite:
        raise UserError(f"dataset {args.name} already exists at {remote}\n"
                        "  fix: pass --overwrite, or choose another --name")
    # a bucket: ArrayRecord writes local files, so the dataset is built locally, then uploaded
    staged = storage.staging_dir(data_dir)
    result = prepare_local(
        args.input, args.name, staged, fmt=args.format, text_key=args.text_key,
        fields=_csv(args.fields), text_unit=args.text_unit,
        validation_fraction=args.validation_fraction,
        validation_inputs=args.validation_input or (), overwrite=args.overwrite,
    )
    if storage.is_remote(data_dir):
        storage.publish(staged / args.name, remote, marker=Path(result["path"]).name)
        result["path"] = str(remote / Path(result["path"]).name)
    sizes = ", ".join(f"{k} {v}" for k, v in sorted(result["splits"].items()))
    print(f"dataset {args.name} ({sizes} documents) written to {result['path']}")
    print(f"  use it with data.source=tfds data.tfds_name={args.name} data.data_dir={data_dir} "
          f"data.text_key={args.text_key}")
    print(json.dumps(result))
    return 0


def cmd_data_embedded(args) -> int:
    from bignlp_jax.data.corpora import embedded
    from bignlp_jax.data.tfds.source import open_split, resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    embedded.ensure_embedded(data_dir)
    sizes = {name: {split: len(open_split(name, data_dir, split))
                    for split in ("train", "validation")} for name in embedded.EMBEDDED}
    for name, splits in sizes.items():
        print(f"{name}: {splits['train']} train, {splits['validation']} validation "
              f"in {data_dir / name}")
    if args.vocab_size:
        print(f"tokenizer: {embedded.embedded_tokenizer(data_dir, args.vocab_size)}")
    return 0


def cmd_data_bench(args) -> int:
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.data.sources import make_source

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


def register(sub: argparse._SubParsersAction) -> None:
    from bignlp_jax.config.loader import add_config_arguments
    from bignlp_jax.data.tfds.local_files import FORMATS, TEXT_UNITS
    from bignlp_jax.data.tokenizer import MODEL_TYPES

    tok = sub.add_parser("tokenizer", help="train SentencePiece tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a SentencePiece tokenizer (BPE or unigram)")
    p.add_argument("--input", required=True,
                   help="glob of local files, or a TFDS dataset name (with --data-dir; the "
                        "embedded stdlib_docs needs none)")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="pieces in the vocabulary (set model.vocab_size to the same)")
    p.add_argument("--out", required=True,
                   help="directory for tokenizer.model + tokenizer.json (our description: "
                        "vocab size, special ids, sha256)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe",
                   help="SentencePiece algorithm (default bpe)")
    p.add_argument("--data-dir", default=None, help="TFDS data dir: read --input as a dataset")
    p.add_argument("--split", default="train", help="dataset split to read (default train)")
    p.add_argument("--text-key", default="text",
                   help="text field (datasets, JSONL, Parquet; default text)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="format of local files (default: from the extension)")
    p.add_argument("--max-documents", type=int, default=200_000,
                   help="train on at most this many documents (default 200000)")
    p.set_defaults(func=cmd_tokenizer_train, command="tokenizer train")

    data = sub.add_parser("data", help="prepare TFDS datasets, tokenize them, time the loader")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="local text/JSONL/Parquet files -> TFDS dataset")
    p.add_argument("--input", required=True, action="append",
                   help="glob of input files (repeatable)")
    p.add_argument("--name", required=True, help="dataset name (lower snake_case)")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: the cache dir)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="input format (default: from each file's extension)")
    p.add_argument("--text-key", default="text", help="field holding the text (default text)")
    p.add_argument("--fields", default="",
                   help="extra string fields to keep, comma-separated (default: none)")
    p.add_argument("--text-unit", choices=TEXT_UNITS, default="file",
                   help="plain text: one document per file, paragraph or line (default file)")
    p.add_argument("--validation-fraction", type=float, default=0.05,
                   help="share of documents held out as the validation split (default 0.05)")
    p.add_argument("--validation-input", action="append",
                   help="glob of validation files (instead of --validation-fraction)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.set_defaults(func=cmd_data_prepare, command="data prepare")

    p = data_sub.add_parser("embedded", help="build the embedded stdlib corpora (no download)")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: the cache dir)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="also train the default tokenizer with this many pieces")
    p.set_defaults(func=cmd_data_embedded, command="data embedded")

    store_commands.register(data_sub)

    p = data_sub.add_parser("bench", help="time the data loader alone (last line: JSON)")
    add_config_arguments(p, "data.workers=4")
    p.add_argument("--steps", type=int, default=20, help="batches to time (default 20)")
    p.add_argument("--start-step", type=int, default=0,
                   help="first batch to read (time to the first batch of a resumed run)")
    p.set_defaults(func=cmd_data_bench, command="data bench")
