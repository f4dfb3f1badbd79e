"""Build a sharded token store from raw input files, one task per input file.

`data tokenize --input GLOB --out STORE` expands the inputs (sorted) and plans one task per
file. A task tokenizes its file into shards of at most `shard_tokens` tokens, named
`shard-<sha256(input)[:16]>-NNNN`, each written complete (files, then its manifest) and moved
into the store, then records what it built in `parts/<sha256(input)[:16]>.json` (the shards'
entries, the input's size and the build settings). The store's manifest, listing every input's
shards in input order, is written last, once every task has its record:

- a rerun (after a crash, a lost worker, a preempted array job) finishes only the inputs
  without a record; a corpus that grows (more files) builds only the new files' shards;
- `--shard i/n` runs the tasks i, i+n, i+2n, ... (an array job of n); whichever slice finds all
  records present writes the manifest (the same bytes whichever writes it);
- tasks run in this process, or as Ray tasks (`ray_build.py`): the store is the same bytes,
  because a task's output depends only on its input, the tokenizer and the settings.

Inputs and the store may be local or in a bucket (gs://, s3://); with Ray and a local `--out`,
every node must see the same filesystem.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bignlp_jax import storage
from bignlp_jax.data.store.build import _with_specials
from bignlp_jax.data.store.chunks import check_stop
from bignlp_jax.data.store.manifest import MANIFEST, TOKENS
from bignlp_jax.data.store.raw_inputs import expand_inputs, read_texts
from bignlp_jax.data.store.shard_files import (
    finish_shard,
    shard_bounds,
    write_sharded_manifest,
)
from bignlp_jax.data.store.shards import shard_entry
from bignlp_jax.data.tokenizer import load_tokenizer
from bignlp_jax.errors import UserError

PARTS = "parts"
_BATCH = 1024  # documents per encode call


@dataclass(frozen=True)
class InputTask:
    """Tokenize one input file into shards of the store at `out`."""

    url: str
    out: str
    tokenizer_path: str
    text_key: str
    fmt: str | None
    text_unit: str
    shard_tokens: int
    info: dict  # what every shard's manifest records (dataset, tokenizer, vocabulary, dtype)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def record(self) -> storage.AnyPath:
        return storage.path(self.out) / PARTS / f"{self.key}.json"

    def settings(self) -> dict:
        """What a record must match to be reused: the input's size and the build settings."""
        return {"url": self.url, "size": storage.size(storage.path(self.url)),
                "text_key": self.text_key, "format": self.fmt, "text_unit": self.text_unit,
                "shard_tokens": self.shard_tokens, "info": self.info}


def done(task: InputTask) -> list[dict] | None:
    """The shard entries a finished task recorded, or None (not built, or other settings)."""
    try:
        record = json.loads(task.record().read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != task.settings():
        return None
    return record.get("shards")


def build_input(task: InputTask) -> list[dict]:
    """Tokenize `task.url` into its shards in the store; returns their manifest entries."""
    tok = load_tokenizer(task.tokenizer_path)
    dtype = np.dtype(task.info["dtype"])
    staging = Path(tempfile.mkdtemp(prefix="bignlp-shard-"))
    try:
        lengths: list[int] = []
        with open(staging / "all.bin", "wb") as out:
            texts: list[str] = []
            for text in read_texts(task.url, task.text_key, task.fmt, task.text_unit):
                texts.append(text)
                if len(texts) == _BATCH:
                    out.write(_encode(tok, texts, dtype, lengths))
                    texts = []
                    check_stop(f"tokenizing {task.url}")
            if texts:
                out.write(_encode(tok, texts, dtype, lengths))
        entries = _write_shards(task, staging, np.asarray(lengths, np.int64), dtype)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {"settings": task.settings(), "shards": entries}
    write_text(task.record(), json.dumps(record, indent=1) + "\n")
    return entries


def _encode(tok, texts: list[str], dtype, lengths: list) -> bytes:
    # one thread per task: tasks are the parallelism
    encoded = tok.sp.encode(texts, num_threads=1)
    return _with_specials(encoded, tok.bos_id, tok.eos_id, dtype, lengths).tobytes()


def _write_shards(task: InputTask, staging: Path, lengths: np.ndarray, dtype) -> list[dict]:
    if not len(lengths):
        return []
    tokens = np.memmap(staging / "all.bin", dtype=dtype, mode="r")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    entries = []
    for k, (a, b) in enumerate(shard_bounds(lengths, task.shard_tokens)):
        name = f"shard-{task.key}-{k:04d}"
        shard = staging / name
        shard.mkdir()
        tokens[offsets[a]:offsets[b]].tofile(shard / TOKENS)
        entries.append(shard_entry(name, finish_shard(shard, lengths[a:b], task.info)))
        _install(shard, storage.path(task.out) / name)
    del tokens
    return entries


def _install(local: Path, dest: storage.AnyPath) -> None:
    """Put a finished shard folder at `dest`, replacing what a lost task left there."""
    if storage.is_remote(dest):
        if dest.exists():
            storage.rmtree(dest)
        files = sorted(local.iterdir(), key=lambda f: f.name == MANIFEST)  # manifest last
        for f in files:
            storage.copy_file(f, dest / f.name)
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=Path(dest).parent))
    for f in local.iterdir():
        shutil.copyfile(f, tmp / f.name)
    if Path(dest).exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def write_text(path: storage.AnyPath, text: str) -> None:
    """Write a small file whole (a local one atomically; a bucket object is written whole)."""
    if storage.is_remote(path):
        path.write_text(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=f".{Path(path).name}-", dir=Path(path).parent)[1])
    tmp.write_text(text)
    tmp.replace(path)


def finish_store(tasks: list[InputTask], info: dict) -> dict | None:
    """Write the store's manifest if every task has its record; returns it (else None)."""
    entries: list[dict] = []
    for task in tasks:
        shards = done(task)
        if shards is None:
            return None
        entries += shards
    out = storage.path(tasks[0].out)
    if not entries:
        raise UserError(f"the inputs of {out} hold no documents: there is nothing to train on\n"
                        "  fix: check --input, --format and --text-key")
    if storage.is_remote(out):
        staged = Path(tempfile.mkdtemp(prefix="bignlp-manifest-"))
        try:
            manifest = write_sharded_manifest(staged, entries, {**info, "inputs": len(tasks)})
            storage.copy_file(staged / MANIFEST, out / MANIFEST)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return manifest
    return write_sharded_manifest(Path(out), entries, {**info, "inputs": len(tasks)})


OnDone = Callable[[InputTask, list[dict]], None]


def run_in_process(tasks: list[InputTask], on_done: OnDone) -> None:
    for task in tasks:
        on_done(task, build_input(task))


def plan(patterns: list[str], out: str, tokenizer_path: str, *, name: str, split: str,
         text_key: str, fmt: str | None, text_unit: str, shard_tokens: int
         ) -> tuple[list[InputTask], dict]:
    """(one task per input file, in input order; the store's info)."""
    tok = load_tokenizer(tokenizer_path)
    info = {"dataset": name, "split": split, "text_key": text_key,
            "tokenizer_sha256": tok.describe()["model_sha256"], "vocab_size": tok.vocab_size,
            "dtype": "uint16" if tok.vocab_size <= 2**16 else "uint32"}
    model = str(storage.absolute(tok.model_path))
    tasks = [InputTask(url, out, model, text_key, fmt, text_unit, shard_tokens, info)
             for url in expand_inputs(patterns)]
    return tasks, info


def tokenize_files(tasks: list[InputTask], info: dict, *, shard: tuple[int, int] = (0, 1),
                   runner: Callable[[list[InputTask], OnDone], None] = run_in_process,
                   log=print) -> dict:
    """Build this slice's missing shards, then the manifest if every slice is done.

    Returns a summary: inputs, built, reused, tokens and seconds of this run, and the
    manifest's counts once written."""
    i, n = shard
    mine = tasks[i::n]
    todo = [t for t in mine if done(t) is None]
    log(f"token store {tasks[0].out}: {len(tasks)} input(s), {len(mine)} in slice {i}/{n}, "
        f"{len(mine) - len(todo)} already built")
    built = {"tokens": 0, "shards": 0, "inputs": 0}

    def on_done(task: InputTask, entries: list[dict]) -> None:
        built["tokens"] += sum(e["tokens"] for e in entries)
        built["shards"] += len(entries)
        built["inputs"] += 1
        log(f"  {task.url}: {len(entries)} shard(s), {sum(e['tokens'] for e in entries)} tokens "
            f"({built['inputs']}/{len(todo)})")

    start = time.perf_counter()
    runner(todo, on_done)
    seconds = time.perf_counter() - start
    manifest = finish_store(tasks, info)
    summary = {"path": tasks[0].out, "inputs": len(tasks), "slice": f"{i}/{n}",
               "built_inputs": built["inputs"], "built_shards": built["shards"],
               "reused_inputs": len(mine) - len(todo), "tokens_built": built["tokens"],
               "seconds": round(seconds, 3),
               "tokens_per_sec": round(built["tokens"] / max(seconds, 1e-9))}
    if manifest is None:
        log("other slices are not finished: the manifest is written by the last one")
    else:
        summary.update(documents=manifest["documents"], tokens=manifest["tokens"],
                       shards=len(manifest["shards"]))
        log(f"token store {tasks[0].out}: {manifest['documents']} documents, "
            f"{manifest['tokens']} tokens in {len(manifest['shards'])} shards (manifest written)")
    return summary
