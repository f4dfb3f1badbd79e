"""Write the files of a store: one shard (tokens, offsets, manifest) or a set of shards.

`finish_shard` turns a directory holding `tokens.bin` into a complete shard: it writes the
offsets, then the manifest (sha256 of both files, crc32 of every chunk of tokens), last.
`split_into_shards` cuts a built stream of documents into shards of at most `shard_tokens`
tokens each (at document boundaries; a longer document is a shard of its own) and writes the
sharded manifest (`store/shards.py`) last. Cutting depends only on the documents and the bound,
so a store is the same whoever builds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bignlp_jax.data.store.chunks import CHUNK_TOKENS, chunk_crcs
from bignlp_jax.data.store.manifest import FORMAT, MANIFEST, OFFSETS, TOKENS, VERIFIED, sha256_file
from bignlp_jax.data.store.shards import SHARDED_FORMAT, shard_entry, shards_sha256


def finish_shard(tmp: Path, lengths: np.ndarray, info: dict) -> dict:
    """Write offsets.npy and, last, the manifest into `tmp` (which holds tokens.bin)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(tmp / OFFSETS, offsets)
    tokens = np.memmap(tmp / TOKENS, dtype=info["dtype"], mode="r") if offsets[-1] else (
        np.empty(0, info["dtype"]))
    manifest = {"format": FORMAT, **info, "documents": int(len(lengths)),
                "tokens": int(offsets[-1]),
                "sha256": {TOKENS: sha256_file(tmp / TOKENS), OFFSETS: sha256_file(tmp / OFFSETS)},
                "chunks": {"tokens": CHUNK_TOKENS, "crc32": chunk_crcs(tokens)}}
    del tokens
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def shard_bounds(lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """[(first document, end document)] of each shard: greedy, at most `shard_tokens` tokens
    (a single longer document makes a shard alone)."""
    bounds, start, size = [], 0, 0
    for d, n in enumerate(lengths.tolist()):
        if size and size + n > shard_tokens:
            bounds.append((start, d))
            start, size = d, 0
        size += n
    if start < len(lengths) or not bounds:
        bounds.append((start, len(lengths)))
    return bounds


def split_into_shards(tmp: Path, lengths: np.ndarray, info: dict, shard_tokens: int) -> dict:
    """Cut `tmp`/tokens.bin (documents of `lengths`) into shard-NNNNN/ folders of at most
    `shard_tokens` tokens; remove the flat files; write the sharded manifest last."""
    tokens = np.memmap(tmp / TOKENS, dtype=info["dtype"], mode="r") if lengths.sum() else (
        np.empty(0, info["dtype"]))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    entries = []
    for i, (a, b) in enumerate(shard_bounds(lengths, shard_tokens)):
        name = f"shard-{i:05d}"
        (tmp / name).mkdir()
        tokens[offsets[a]:offsets[b]].tofile(tmp / name / TOKENS)
        entries.append(shard_entry(name, finish_shard(tmp / name, lengths[a:b], info)))
    del tokens
    for name in (TOKENS, OFFSETS, VERIFIED):
        if (tmp / name).exists():
            os.remove(tmp / name)
    return write_sharded_manifest(tmp, entries, info)


def write_sharded_manifest(path: Path, entries: list[dict], info: dict) -> dict:
    """The manifest of a sharded store (atomically: a reader sees the old or the new one)."""
    manifest = {"format": SHARDED_FORMAT, **info,
                "documents": sum(e["documents"] for e in entries),
                "tokens": sum(e["tokens"] for e in entries), "shards": entries,
                "shards_sha256": shards_sha256(entries)}
    tmp = path / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path / MANIFEST)
    return manifest
