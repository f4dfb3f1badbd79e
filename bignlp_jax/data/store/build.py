"""Build token stores: tokenize a split once, in parallel, and write it atomically.

A store is built in a temporary directory beside its final place and renamed into it, so an
interrupted build leaves a `.tmp-*` directory (removed by the next build) and never a directory
with a manifest. Tokenizing runs in `workers` processes (spawned: the caller may hold JAX
threads) over contiguous ranges of records, each range writing its own part; the parts are
concatenated in order, so the store is the same for any number of workers. Processes sharing a
data dir take a file lock: one builds, the others then find the store.

A store bound for a bucket is built the same way in a local staging directory (from a local
copy of the dataset's records: ArrayRecord reads local files) and then uploaded, manifest last
(`remote_store.publish_store`). Building into a bucket is what `data tokenize` does, once,
ahead of the training hosts that read the store.
"""

from __future__ import annotations

import fcntl
import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bignlp_jax import storage
from bignlp_jax.data.store.manifest import MANIFEST, TOKENS, VERIFIED
from bignlp_jax.data.store.remote import publish_store
from bignlp_jax.data.store.shard_files import finish_shard, split_into_shards
from bignlp_jax.data.store.token_store import StoreSpec, dataset_identity, store_dir
from bignlp_jax.data.tfds.source import local_dataset_dir

# Records per encode call: big enough to amortise the call, small enough to stream.
_CHUNK = 1024


def _with_specials(encoded: list[list[int]], bos: int, eos: int, dtype,
                   lengths: list) -> np.ndarray:
    """<s> ids </s> of every document, flat (vectorised: the ids are copied once)."""
    lens = np.asarray([len(ids) + 2 for ids in encoded], dtype=np.int64)
    ends = np.cumsum(lens)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    body = np.ones(len(flat), dtype=bool)
    body[ends - lens] = body[ends - 1] = False
    flat[ends - lens], flat[ends - 1] = bos, eos
    flat[body] = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                             count=int(body.sum()))
    lengths.extend(lens.tolist())
    return flat


def _encode_range(args: tuple) -> tuple[int, int]:
    """Worker: tokenize records [lo, hi) into `part` (tokens) and `part`.len (int64 lengths)."""
    name, data_dir, split, text_key, tokenizer_path, lo, hi, part, dtype = args
    # a spawned worker process: imports what it needs itself (tfds is slow to import)
    from bignlp_jax.data.tfds.source import open_split, text_of
    from bignlp_jax.data.tokenizer import load_tokenizer

    source = open_split(name, data_dir, split)
    tok = load_tokenizer(tokenizer_path)
    bos, eos = tok.bos_id, tok.eos_id
    lengths: list[int] = []
    with open(part, "wb") as out:
        for a in range(lo, hi, _CHUNK):
            texts = [text_of(source[i], text_key) for i in range(a, min(hi, a + _CHUNK))]
            # one thread per worker: the workers are the parallelism (and 1 vs N is honest)
            encoded = tok.sp.encode(texts, num_threads=1)
            out.write(_with_specials(encoded, bos, eos, dtype, lengths).tobytes())
    np.asarray(lengths, dtype=np.int64).tofile(f"{part}.len")
    return hi - lo, int(sum(lengths))


def build_store(spec: StoreSpec, num_records: int, vocab_size: int, workers: int = 1,
                overwrite: bool = False, log=print,
                shard_tokens: int | None = None) -> storage.AnyPath:
    """Tokenize the split into its store (atomically) unless it is there; returns its path.

    Processes sharing the data dir (the hosts of a run, a `data tokenize` beside a training
    run) take a file lock: one builds, the others then find the store."""
    identity = dataset_identity(spec.name, spec.data_dir, spec.split, spec.text_key, num_records)
    final = store_dir(spec, identity)
    if storage.is_remote(final):
        if (final / MANIFEST).is_file() and not overwrite:
            return final
        staging = Path(tempfile.mkdtemp(prefix="bignlp-store-"))
        try:
            local = _build(spec, identity, staging / final.name, num_records, vocab_size,
                           workers, log, str(local_dataset_dir(spec.name, spec.data_dir)),
                           shard_tokens)
            (local / VERIFIED).unlink(missing_ok=True)  # stamps of local files: not remote
            publish_store(local, final, MANIFEST)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"token store: uploaded to {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".bignlp_store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file() and not overwrite:
            return final
        return _build(spec, identity, Path(final), num_records, vocab_size, workers, log,
                      spec.data_dir, shard_tokens)


def _build(spec: StoreSpec, identity: str, final: Path, num_records: int, vocab_size: int,
           workers: int, log, records_dir: str, shard_tokens: int | None = None) -> Path:
    """Build the store in `final` (local), reading the records from `records_dir`."""
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a build that was interrupted
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    start = time.perf_counter()
    try:
        workers = max(1, min(workers, num_records))
        # Several ranges per worker: documents differ in length, so equal record counts are
        # not equal work; the pool hands the next range to whichever worker is free.
        parts = 1 if workers == 1 else min(num_records, 4 * workers)
        bounds = np.linspace(0, num_records, parts + 1).astype(int)
        jobs = [(spec.name, records_dir, spec.split, spec.text_key, spec.tokenizer_path,
                 int(a), int(b), str(tmp / f"part{i:05d}"), dtype)
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        if workers == 1:
            results = [_encode_range(jobs[0])]
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.map(_encode_range, jobs, chunksize=1)
        lengths = np.concatenate([np.fromfile(f"{j[7]}.len", dtype=np.int64) for j in jobs])
        with open(tmp / TOKENS, "wb") as out:
            for job in jobs:
                with open(job[7], "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
                os.remove(job[7])
                os.remove(f"{job[7]}.len")
        seconds = time.perf_counter() - start
        info = {"dataset": spec.name, "split": spec.split, "text_key": spec.text_key,
                "dataset_identity": identity, "tokenizer_sha256": spec.tokenizer_sha256,
                "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "workers": workers,
                "build_seconds": round(seconds, 3)}
        if shard_tokens:
            manifest = split_into_shards(tmp, lengths, info, shard_tokens)
        else:
            manifest = finish_shard(tmp, lengths, info)
        assert sum(r[1] for r in results) == manifest["tokens"]
        storage.install_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"token store: {spec.name}/{spec.split} -> {final} ({manifest['documents']} documents, "
        f"{manifest['tokens']} tokens, {seconds:.1f} s with {workers} worker(s), "
        f"{manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)")
    return final


def write_store(path: str | Path, documents: list, *, dataset: str, split: str,
                tokenizer_sha256: str, vocab_size: int, shard_tokens: int | None = None) -> Path:
    """A store of already tokenized documents (each <s> ids </s>), written atomically; in
    shards of at most `shard_tokens` tokens if given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    np.concatenate([np.asarray(d, dtype) for d in documents]).tofile(tmp / TOKENS)
    info = {"dataset": dataset, "split": split, "text_key": None, "dataset_identity": None,
            "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name}
    lengths = np.asarray([len(d) for d in documents], np.int64)
    if shard_tokens:
        split_into_shards(tmp, lengths, info, shard_tokens)
    else:
        finish_shard(tmp, lengths, info)
    os.replace(tmp, path)
    return path
