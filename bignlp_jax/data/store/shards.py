"""Sharded token stores: one manifest listing shards, each shard a complete store of its own.

Layout of a sharded store directory:

    manifest.json   format bignlp_token_store/sharded-1: dataset, tokenizer sha256, vocabulary,
                    dtype, counts, and the list of shards with their documents, tokens and
                    identity (the sha256 of the shard's file checksums); written last
    shard-NNNNN/    tokens.bin, offsets.npy, manifest.json: a store in the single-store format
                    (`token_store.py`), with its own checksums

A shard is bounded (`--shard-tokens`), built on its own (a task of a Ray build, an array job) and
opened only when a reader first needs it, so opening a corpus of thousands of shards reads one
manifest, and a process that reads a few shards verifies only those. Adding shards (a corpus that
grows) writes new shard folders and a new manifest; the others are not rebuilt. The store's
identity is the sha256 of its shards' identities in manifest order: the `data.stores` record of a
run names exactly the shards it read. A directory in the single-store format reads as a store of
one shard (the directory itself), with that store's identity.

A manifest may name only shard folders of the format (`shard-` and letters, digits, `.`, `_`,
`-`, no `..`) that lie inside the store's folder; anything else is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.data.store.manifest import FORMAT, MANIFEST, read_manifest
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.errors import UserError

SHARDED_FORMAT = "bignlp_token_store/sharded-1"
SHARD_NAME = re.compile(r"shard-[A-Za-z0-9_.-]{1,120}")


def store_identity(sha256: dict) -> str:
    """Identity of one shard (or single store): the sha256 of its files' checksums."""
    return hashlib.sha256(json.dumps(sha256, sort_keys=True).encode()).hexdigest()


def shards_sha256(entries: list) -> str:
    """Checksum of a sharded manifest's list of shards (their names, counts, identities): the
    index is laid out from the counts before any shard is opened."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def shard_entry(name: str, manifest: dict) -> dict:
    """The sharded manifest's entry for shard `name` with the shard's own `manifest`."""
    return {"name": name, "documents": int(manifest["documents"]),
            "tokens": int(manifest["tokens"]), "identity": store_identity(manifest["sha256"])}


@dataclass(frozen=True)
class Shard:
    name: str  # folder inside the store ("." for a single-store directory)
    documents: int
    tokens: int
    identity: str

    @property
    def pairs(self) -> int:
        """(input, target) pairs: L - 1 per document of L tokens."""
        return self.tokens - self.documents


class ShardedStore:
    """A store as a list of shards; `shard(j)` opens (and verifies) shard j on first use."""

    def __init__(self, path: str | os.PathLike, tokenizer_sha256: str | None = None,
                 rebuild: str = "bignlp-jax data tokenize ...", verify_tokens: bool = False):
        self.path = storage.path(path)
        self.remote = storage.is_remote(path)
        self.rebuild, self.tokenizer_sha256 = rebuild, tokenizer_sha256
        self.verify_tokens = verify_tokens
        self._open: dict[int, TokenStore] = {}
        self._lock = threading.Lock()
        manifest = read_manifest(self.path, rebuild, (FORMAT, SHARDED_FORMAT))
        if manifest["format"] == FORMAT:  # the single-store layout: one shard, opened now
            single = TokenStore(self.path, tokenizer_sha256, rebuild, verify_tokens)
            self._open[0] = single
            self.manifest = single.manifest
            self.shards = [Shard(".", single.num_documents, int(single.manifest["tokens"]),
                                 single.identity)]
            self.identity = single.identity
            return
        self.manifest = manifest
        self.shards = _shards(self.path, manifest, rebuild)
        ours = manifest.get("tokenizer_sha256")
        if tokenizer_sha256 is not None and ours != tokenizer_sha256:
            TokenStore._refuse_tokenizer(self.path, ours, tokenizer_sha256, rebuild)
        self.identity = hashlib.sha256(
            json.dumps([s.identity for s in self.shards]).encode()).hexdigest()

    @classmethod
    def of(cls, store: TokenStore | ShardedStore) -> ShardedStore:
        """`store` as a sharded store (an opened single store is its one shard)."""
        if isinstance(store, ShardedStore):
            return store
        self = cls.__new__(cls)
        self.path, self.remote, self.rebuild = store.path, store.remote, store.rebuild
        self.tokenizer_sha256, self.verify_tokens = None, False
        self._open, self._lock = {0: store}, threading.Lock()
        self.manifest, self.identity = store.manifest, store.identity
        self.shards = [Shard(".", store.num_documents, int(store.manifest["tokens"]),
                             store.identity)]
        return self

    def shard(self, j: int) -> TokenStore:
        store = self._open.get(j)
        if store is None:
            with self._lock:
                store = self._open.get(j)
                if store is None:
                    store = self._open[j] = self._open_shard(j)
        return store

    def _open_shard(self, j: int) -> TokenStore:
        entry = self.shards[j]
        store = TokenStore(self.path / entry.name, self.tokenizer_sha256, self.rebuild,
                           self.verify_tokens)
        if (store.identity != entry.identity or store.num_documents != entry.documents
                or int(store.manifest["tokens"]) != entry.tokens):
            raise UserError(f"token store shard {self.path / entry.name} is not the shard its "
                            f"store's manifest {self.path / MANIFEST} lists (identity "
                            f"{store.identity[:12]}, listed {entry.identity[:12]})\n"
                            f"  fix: rebuild it: {self.rebuild}")
        return store

    def __getstate__(self) -> dict:
        # Grain worker processes get the path and open the shards they read themselves.
        return {"path": str(self.path), "rebuild": self.rebuild}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["path"], rebuild=state["rebuild"])

    @property
    def num_documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def describe(self) -> dict:
        """What a run records about the store it read."""
        m = self.manifest
        return {"path": str(self.path), "identity": self.identity, "dataset": m["dataset"],
                "split": m["split"], "tokenizer_sha256": m["tokenizer_sha256"],
                "documents": m["documents"], "tokens": m["tokens"], "shards": len(self.shards)}


def _shards(path: storage.AnyPath, m: dict, rebuild: str) -> list[Shard]:
    file = path / MANIFEST
    entries = m.get("shards")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"token store file {file} is corrupt (no list of shards)\n"
                        f"  fix: rebuild it: {rebuild}")
    if shards_sha256(entries) != m.get("shards_sha256"):
        bad = next((e.get("name") for e in entries if isinstance(e, dict) and not (
            isinstance(e.get("name"), str) and SHARD_NAME.fullmatch(e["name"])
            and ".." not in e["name"])), None)
        if bad is None:  # (a name outside the format is named as such below)
            raise UserError(f"token store file {file} is corrupt (its list of shards differs "
                            f"from its checksum)\n  fix: rebuild it: {rebuild}")
    out = []
    for e in entries:
        name = e.get("name") if isinstance(e, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or ".." in name:
            raise UserError(f"token store manifest {file} names {name!r}, not a shard folder "
                            "of the store (shard-NAME inside its folder); nothing outside a "
                            f"store is read\n  fix: rebuild it: {rebuild}")
        if not storage.is_remote(path):
            root, target = Path(path).resolve(), (Path(path) / name).resolve()
            if target.parent != root:
                raise UserError(f"token store shard {Path(path) / name} leads outside its "
                                f"folder {root} (to {target}); nothing outside a store is "
                                f"read\n  fix: rebuild it: {rebuild}")
        try:
            out.append(Shard(name, int(e["documents"]), int(e["tokens"]), str(e["identity"])))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"token store file {file} is corrupt (shard {name} has no counts "
                            f"or identity)\n  fix: rebuild it: {rebuild}") from None
    if len({s.name for s in out}) != len(out):
        raise UserError(f"token store file {file} is corrupt (a shard is listed twice)\n"
                        f"  fix: rebuild it: {rebuild}")
    return out


def open_store(path: str | os.PathLike, tokenizer_sha256: str | None = None,
               rebuild: str = "bignlp-jax data tokenize ...",
               verify_tokens: bool = False) -> ShardedStore:
    """Open the store at `path` in either layout."""
    return ShardedStore(path, tokenizer_sha256, rebuild, verify_tokens)
