"""Config -> what a run reads: which datasets (weights, splits, text keys), from which data
dir, with which tokenizer. No token stores here (text_source.py builds and opens them), so task
data (data/tasks/) asks this module without pulling in the store.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from bignlp_jax import storage
from bignlp_jax.access import check_path
from bignlp_jax.config import Config
from bignlp_jax.data.corpora import embedded
from bignlp_jax.data.tfds.source import resolve_data_dir
from bignlp_jax.data.tokenizer import Tokenizer, load_tokenizer
from bignlp_jax.errors import UserError


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset a run reads: its weight in the mixture and its own split and text key."""

    name: str
    weight: float
    split: str
    eval_split: str | None
    text_key: str


def dataset_entries(cfg: Config) -> list[DatasetEntry]:
    """`data.mixture`'s datasets, or `data.tfds_name` alone with weight 1."""
    d = cfg.data
    if not d.mixture:
        return [DatasetEntry(dataset_name(cfg), 1.0, d.split, d.eval_split, d.text_key)]
    out = []
    for name, entry in d.mixture.items():
        if isinstance(entry, (int, float)):
            out.append(DatasetEntry(name, float(entry), d.split, d.eval_split, d.text_key))
        else:
            out.append(DatasetEntry(name, entry.weight, entry.split or d.split,
                                    entry.eval_split or d.eval_split,
                                    entry.text_key or d.text_key))
    return out


def dataset_name(cfg: Config) -> str:
    if cfg.data.store is not None and not cfg.data.tfds_name:
        return "store"  # a store built from raw files: no TFDS dataset
    if not cfg.data.tfds_name:
        raise UserError("data.source=tfds needs data.tfds_name (e.g. stdlib_docs, or the name "
                        "given to `bignlp-jax data prepare --name`)")
    return cfg.data.tfds_name


def data_dir(cfg: Config) -> storage.AnyPath:
    """The data dir of the config; the embedded corpora are built into it when missing (on a
    file system; a bucket must hold them already, like any other dataset)."""
    path = resolve_data_dir(cfg.data.data_dir)
    if storage.is_remote(path):
        probe_bucket(str(path)[:5] + str(path).split("/")[2])
    elif any(n in embedded.EMBEDDED for n in _names(cfg)):
        embedded.ensure_embedded(path)
    return path


@functools.cache
def probe_bucket(bucket: str) -> None:
    """A missing bucket, an unreachable endpoint, missing credentials: one line, once."""
    check_path(bucket, "data.data_dir", write=False)


def _names(cfg: Config) -> list[str]:
    return list(cfg.data.mixture) if cfg.data.mixture else [cfg.data.tfds_name or ""]


def tokenizer_path(cfg: Config) -> storage.AnyPath:
    """Where the config's tokenizer lives (training the default one if it is missing)."""
    if cfg.data.tokenizer:
        return storage.path(os.path.expanduser(cfg.data.tokenizer))
    other = [n for n in _names(cfg) if n not in embedded.EMBEDDED]
    if other:
        raise UserError(
            f"data.tokenizer is not set, and dataset {other[0]!r} is not one of the "
            f"embedded corpora ({', '.join(embedded.EMBEDDED)}) that have a default tokenizer\n"
            "  fix: train one with `bignlp-jax tokenizer train --input ... --vocab-size "
            f"{cfg.model.vocab_size} --out DIR` and set data.tokenizer=DIR"
        )
    if storage.is_remote(data_dir(cfg)):
        raise UserError(f"data.data_dir={cfg.data.data_dir} is a bucket and data.tokenizer is "
                        "not set; the default tokenizer is trained on local disk only\n"
                        "  fix: set data.tokenizer (a tokenizer dir or run dir, local or in a "
                        "bucket)")
    return embedded.embedded_tokenizer(data_dir(cfg), cfg.model.vocab_size)


def resolve_tokenizer(cfg: Config) -> Tokenizer:
    """The config's tokenizer; its vocabulary must be exactly `model.vocab_size`."""
    tokenizer = _load(str(tokenizer_path(cfg)))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer's vocabulary "
            f"of {tokenizer.vocab_size} pieces ({tokenizer.model_path})\n"
            f"  fix: set model.vocab_size={tokenizer.vocab_size}, or use a tokenizer trained "
            f"with --vocab-size {cfg.model.vocab_size}"
        )
    return tokenizer


@functools.lru_cache(maxsize=8)
def _load(path: str) -> Tokenizer:
    return load_tokenizer(path)


def split_name(cfg: Config, split: str) -> str:
    """The dataset split for a stream role: 'train' -> data.split, 'validation' -> eval_split."""
    if split == "train":
        return cfg.data.split
    if split == "validation":
        if cfg.data.eval_split is None:
            raise UserError("train.eval_every is set but data.eval_split is null\n"
                            "  fix: set data.eval_split (e.g. validation) or train.eval_every=0")
        return cfg.data.eval_split
    return split
