"""Config -> text batch source: which datasets, which tokenizer, which split, which seed.

`data.source: tfds` reads `data.tfds_name` (or every dataset of `data.mixture`) from
`data.data_dir` (null: the user's cache, ~/.cache/bignlp_jax/datasets; a run records the resolved
directory). The embedded corpora
(`stdlib_docs`, `stdlib_modules`) are built there on first use; any other dataset must already
be prepared. Each split is tokenized once into a token store beside the dataset
(`token_store.py`, `token_build.py`: built on first use, or ahead with `data tokenize`), read by
index (`sample_index.py`, `store_batches.py`). A `data.data_dir` in a bucket (gs://, s3://)
is read from there: the token stores by byte ranges (tokenize them ahead with `data tokenize
--data-dir gs://...`: a run does not build a store in a bucket), the records of task datasets
from a local copy. `data.tokenizer` names a tokenizer (a `.model`,
a tokenizer dir or a run dir); null means the default tokenizer trained on `stdlib_docs` with
`model.vocab_size` pieces (built on first use), allowed only for the embedded corpora. The
training stream is shuffled with `run.seed`; held-out streams (`data.eval_split`) are read in
stored order, so every evaluation sees the same batches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.access import check_path
from bignlp_jax.config import Config
from bignlp_jax.data.corpora import embedded
from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import build_store
from bignlp_jax.data.store.manifest import MANIFEST
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.shards import ShardedStore
from bignlp_jax.data.store.token_store import StoreSpec, dataset_identity, store_dir
from bignlp_jax.data.tfds.source import open_split, resolve_data_dir, split_size
from bignlp_jax.data.tokenizer import MODEL_FILE, Tokenizer, load_tokenizer
from bignlp_jax.errors import UserError
from bignlp_jax.rundir import RunDir


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
        _probe_bucket(str(path)[:5] + str(path).split("/")[2])
    elif any(n in embedded.EMBEDDED for n in _names(cfg)):
        embedded.ensure_embedded(path)
    return path


@functools.cache
def _probe_bucket(bucket: str) -> None:
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


@functools.lru_cache(maxsize=16)
def _open(name: str, directory: str, split: str, text_key: str):
    return open_split(name, directory, split, required_keys=(text_key,))


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


def open_store(cfg: Config, name: str, split: str, text_key: str,
               build: bool = True) -> ShardedStore:
    """The token store of `split` of dataset `name` with the config's tokenizer, built on first
    use (with data.workers processes) unless `build` is False. A store in a bucket is never
    built here: every host of a run would build it; `data tokenize` builds it once.
    With data.store, the training split (and with data.eval_store the held-out one) is read
    from that store."""
    if cfg.data.store is not None:
        return _given_store(cfg, split)
    directory = data_dir(cfg)
    remote = storage.is_remote(directory)
    if remote:  # records are not read: their count is in dataset_info.json
        count = split_size(name, directory, split, required_keys=(text_key,))
    else:
        count = len(_open(name, str(directory), split, text_key))  # data errors first
    tokenizer = resolve_tokenizer(cfg)
    sha = tokenizer.describe()["model_sha256"]
    spec = StoreSpec(name, str(directory), split, text_key, str(tokenizer.model_path), sha)
    path = store_dir(spec, dataset_identity(name, directory, split, text_key, count))
    if not (path / MANIFEST).is_file() and build:
        if remote:
            raise UserError(f"no token store for split {split!r} of {name} with this "
                            f"tokenizer in {directory} (looked for {path})\n"
                            "  fix: tokenize it into the bucket first: "
                            + spec.rebuild_command().replace(" --overwrite", ""))
        if count == 0:
            raise UserError(f"split {split!r} of {name} in {directory} has no records: "
                            "nothing to train or evaluate on")
        build_store(spec, count, tokenizer.vocab_size, max(1, cfg.data.workers))
    return ShardedStore(path, sha, spec.rebuild_command())


def _given_store(cfg: Config, split: str) -> ShardedStore:
    d = cfg.data
    path = d.store if split == d.split else d.eval_store if split == d.eval_split else None
    if path is None:
        raise UserError(f"data.store is set but split {split!r} has no store: a held-out stream "
                        "needs data.eval_store\n  fix: set data.eval_store=STORE (built with "
                        "`data tokenize --input ... --out STORE`), or train.eval_every=0")
    tokenizer = resolve_tokenizer(cfg)
    if storage.is_remote(path):
        _probe_bucket(str(path)[:5] + str(path).split("/")[2])
    rebuild = (f"bignlp-jax data tokenize --name {dataset_name(cfg)} --input 'FILES' --out "
               f"{path} --tokenizer {tokenizer.model_path}")
    return ShardedStore(os.path.expanduser(path), tokenizer.describe()["model_sha256"], rebuild)


def make_text_source(cfg: Config, split: str, rows: tuple[int, int]) -> StoreBatches:
    """Packed language-modelling batches, rows [lo, hi) per step: the training mixture, or
    (split 'validation') the held-out stream of data.tfds_name."""
    if split == "train":
        entries = dataset_entries(cfg)
        indexes = {e.name: SampleIndex(open_store(cfg, e.name, e.split, e.text_key),
                                       cfg.data.seq_len, cfg.run.seed) for e in entries}
        weights = {e.name: e.weight for e in entries}
        return StoreBatches(indexes, weights, global_batch=cfg.train.global_batch_size,
                            rows=rows, workers=cfg.data.workers, threads=cfg.data.worker_threads)
    sources = make_eval_sources(cfg, rows, split)
    if len(sources) != 1:
        raise UserError("data.mixture has several held-out sets; evaluate each of them "
                        "(make_eval_sources)")
    return next(iter(sources.values()))


def make_eval_sources(cfg: Config, rows: tuple[int, int],
                      split: str = "validation") -> dict[str, StoreBatches]:
    """{dataset: held-out stream in stored order} for every dataset with an eval split."""
    out = {}
    for e in dataset_entries(cfg):
        name_split = split_name(cfg, split) if split != "validation" else e.eval_split
        if name_split is None:
            continue
        index = SampleIndex(open_store(cfg, e.name, name_split, e.text_key), cfg.data.seq_len,
                            seed=None)
        out[e.name] = StoreBatches({e.name: index}, {e.name: 1.0},
                                   global_batch=cfg.train.global_batch_size, rows=rows)
    if not out:
        split_name(cfg, "validation")  # raises the message about data.eval_split
    return out


def store_identities(cfg: Config) -> dict[str, str]:
    """{dataset/split: store identity} of every store the run reads (built if missing): the
    training splits, and the held-out ones when the run evaluates."""
    out = {}
    for e in dataset_entries(cfg):
        for split in (e.split, e.eval_split if cfg.train.eval_every else None):
            if split is not None:
                out[f"{e.name}/{split}"] = open_store(cfg, e.name, split, e.text_key).identity
    return out


def record_tokenizer(cfg: Config, run_dir: str | Path, locked: bool = True) -> Path | None:
    """Check the tokenizer against the model and copy it into the run's tokenizer folder.

    `locked`: the run holds trained state (train/identity.py decides) and must keep its
    tokenizer: resuming with another one would silently change what every token id means.
    """
    if cfg.data.source != "tfds":
        return None
    tokenizer = resolve_tokenizer(cfg)
    out = RunDir(run_dir).tokenizer
    if (out / MODEL_FILE).is_file():
        recorded = load_tokenizer(out).describe()
        if recorded == tokenizer.describe():
            return out
        if locked:
            raise UserError(
                f"run {run_dir} was trained with tokenizer {recorded['model_sha256'][:12]} "
                f"(vocab {recorded['vocab_size']}) but the config now uses "
                f"{tokenizer.model_path} (vocab {tokenizer.vocab_size})\n"
                "  fix: use the run's own tokenizer (data.tokenizer=RUN_DIR) or a new run.dir"
            )
    tokenizer.save(out)
    return out
