"""Token store: a split of a prepared dataset tokenized once into flat, memory-mapped arrays.

Layout of a store directory (DATA_DIR/token_stores/NAME/SPLIT-TOKENIZERSHA[:16]-DATASETID[:12]):

    tokens.bin     every document as <s> ids </s>, back to back (uint16, or uint32 for
                   vocabularies over 65,536 pieces)
    offsets.npy    int64 [documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    manifest.json  tokenizer sha256, dataset identity, counts, sha256 of both files and the
                   crc32 of every chunk of tokens.bin; written last
    verified.json  (size, mtime, sha256) of the files when their sha256 was last checked (only
                   stores without chunk checksums)

This module names and opens stores (`build.py` writes them); a store may also be a set of
such stores, its shards (`shards.py`). Opening checks the manifest (manifest.py: tokenizer,
format, the files it names: only the two above, inside the store's folder), the file sizes,
the offsets and their sha256, so it costs O(documents), not O(tokens). The tokens are checked
chunk by chunk as a process first reads them (`chunks.py`): crc32 and ids below the vocabulary
size. A store written before chunk checksums existed has its tokens' sha256 checked when the
file's size or mtime differs from `verified.json`. A damaged store is one message naming the
file and the command that rebuilds it.

A store in a bucket (gs://, s3://: `data.data_dir` there) is opened the same way, but its
tokens are read by byte ranges as batches need them (`remote.RemoteTokens`), never
copied whole; opening it checks the manifest, the sizes and the offsets (and their sha256),
and `data tokenize` hashes its tokens too (a training run does not read a whole corpus to
open it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bignlp_jax import storage
from bignlp_jax.data.store.chunks import ChunkChecker
from bignlp_jax.data.store.manifest import (
    FORMAT,
    OFFSETS,
    TOKENS,
    check_contained,
    corrupt,
    read_manifest,
    verify_files,
    verify_remote,
)
from bignlp_jax.data.store.remote import RemoteTokens
from bignlp_jax.errors import UserError

STORES_DIR = "token_stores"


@dataclass(frozen=True)
class StoreSpec:
    """What a store is made from: a split of a prepared dataset and a tokenizer."""

    name: str
    data_dir: str
    split: str
    text_key: str
    tokenizer_path: str
    tokenizer_sha256: str

    def rebuild_command(self) -> str:
        return (f"bignlp-jax data tokenize --name {self.name} --data-dir {self.data_dir} "
                f"--tokenizer {self.tokenizer_path} --split {self.split} --text-key "
                f"{self.text_key} --overwrite")


def dataset_identity(name: str, data_dir: str | Path, split: str, text_key: str,
                     num_records: int) -> str:
    """sha256 of what identifies the dataset's content: its TFDS info (file shards, lengths),
    the split, the text key and the record count."""
    base = storage.path(data_dir) / name.split(":")[0]
    # (a bucket refuses a recursive glob: files_under walks it, the same files either way)
    infos = [f for f in storage.files_under(base) if f.name == "dataset_info.json"]
    h = hashlib.sha256(json.dumps([name, split, text_key, num_records]).encode())
    for info in infos:
        h.update(info.read_bytes())
    return h.hexdigest()


def store_dir(spec: StoreSpec, identity: str) -> storage.AnyPath:
    safe = spec.name.replace("/", "__").replace(":", "_")
    split = spec.split.replace("/", "_")
    return (storage.path(spec.data_dir) / STORES_DIR / safe
            / f"{split}-{spec.tokenizer_sha256[:16]}-{identity[:12]}")


class TokenStore:
    """An opened store: `tokens` (memory-mapped; read by ranges in a bucket), `offsets`, and
    its `manifest`. `verify_tokens` hashes a bucket store's tokens too (`data tokenize`)."""

    def __init__(self, path: str | os.PathLike, tokenizer_sha256: str | None = None,
                 rebuild: str = "bignlp-jax data tokenize ...", verify_tokens: bool = False):
        self.path = storage.path(path)
        self.remote = storage.is_remote(path)
        self.rebuild = rebuild
        self.manifest = read_manifest(self.path, rebuild, (FORMAT,))
        ours = self.manifest.get("tokenizer_sha256")
        if tokenizer_sha256 is not None and ours != tokenizer_sha256:
            self._refuse_tokenizer(self.path, ours, tokenizer_sha256, rebuild)
        self.tokens: np.ndarray | RemoteTokens
        self.checker: ChunkChecker | None = None
        if self.remote:
            # a bucket's objects carry their own checksums; reading whole chunks to check
            # them would defeat reading by byte ranges
            self.offsets = verify_remote(self.path, self.manifest, rebuild, verify_tokens)
            self.tokens = RemoteTokens(str(self.path / TOKENS), self.manifest["dtype"],
                                       int(self.manifest["tokens"]), rebuild)
        else:
            check_contained(self.path, rebuild)
            verify_files(self.path, self.manifest, rebuild)
            self.tokens = np.memmap(self.path / TOKENS, dtype=self.manifest["dtype"], mode="r")
            self.offsets = np.load(self.path / OFFSETS, mmap_mode="r")
            chunks = self.manifest.get("chunks")
            if chunks is not None:
                self.checker = ChunkChecker(str(self.path / TOKENS), chunks["crc32"],
                                            int(chunks["tokens"]),
                                            int(self.manifest["vocab_size"]), rebuild)
                if verify_tokens:
                    self.checker.check_all(self.tokens, f"verifying token store {self.path}")
        self.identity = hashlib.sha256(
            json.dumps(self.manifest["sha256"], sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _refuse_tokenizer(path, ours: str | None, theirs: str, rebuild: str):
        raise UserError(
            f"token store {path} was made with tokenizer sha256 {ours} but this run's "
            f"tokenizer has sha256 {theirs}; it is never read with another one\n"
            f"  fix: build the store for this tokenizer: {rebuild}")

    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens[idx], tokens[idx + 1]): the inputs and targets at token positions `idx`
        (from a bucket: one round of ranged reads)."""
        if isinstance(self.tokens, RemoteTokens):
            inputs, targets = self.tokens.pairs(idx)
            if inputs.size and max(int(inputs.max()), int(targets.max())) >= self.vocab_size:
                raise corrupt(self.path / TOKENS, "corrupt (a token id is not below the "
                               f"vocabulary size {self.vocab_size})", self.rebuild)
            return inputs, targets
        if self.checker is not None:
            self.checker.check_positions(self.tokens, np.asarray(idx).ravel())
        return self.tokens[idx], self.tokens[idx + 1]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def __getstate__(self) -> dict:
        # Grain worker processes get the path, not a copy of the mapped arrays.
        return {"path": str(self.path), "rebuild": self.rebuild}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["path"], rebuild=state.get("rebuild", "bignlp-jax data "
                                                                              "tokenize ..."))

    @property
    def num_documents(self) -> int:
        return int(self.manifest["documents"])

    def describe(self) -> dict:
        """What a run records about the store it read."""
        m = self.manifest
        return {"path": str(self.path), "identity": self.identity, "dataset": m["dataset"],
                "split": m["split"], "tokenizer_sha256": m["tokenizer_sha256"],
                "documents": m["documents"], "tokens": m["tokens"]}
