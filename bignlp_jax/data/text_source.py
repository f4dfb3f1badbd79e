"""Config -> text batch source: the token stores of the datasets, splits and tokenizer that
dataset_choice.py picks, read as batches with the run's seed.

`data.source: tfds` reads `data.tfds_name` (or every dataset of `data.mixture`) from
`data.data_dir` (null: the user's cache, ~/.cache/bignlp_jax/datasets; a run records the resolved
directory). The embedded corpora
(`stdlib_docs`, `stdlib_modules`) are built there on first use; any other dataset must already
be prepared. Each split is tokenized once into a token store beside the dataset
(`store/token_store.py`, `store/build.py`: built on first use, or ahead with `data tokenize`),
read by index (`store/sample_index.py`, `store/batches.py`). A `data.data_dir` in a bucket (gs://, s3://)
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
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.config import Config
from bignlp_jax.data.dataset_choice import (
    data_dir,
    dataset_entries,
    dataset_name,
    probe_bucket,
    resolve_tokenizer,
    split_name,
)
from bignlp_jax.data.store.batches import StoreBatches
from bignlp_jax.data.store.build import build_store
from bignlp_jax.data.store.manifest import MANIFEST
from bignlp_jax.data.store.sample_index import SampleIndex
from bignlp_jax.data.store.shards import ShardedStore
from bignlp_jax.data.store.token_store import StoreSpec, dataset_identity, store_dir
from bignlp_jax.data.tfds.source import open_split, split_size
from bignlp_jax.data.tokenizer import MODEL_FILE, load_tokenizer
from bignlp_jax.errors import UserError
from bignlp_jax.rundir import RunDir


@functools.lru_cache(maxsize=16)
def _open(name: str, directory: str, split: str, text_key: str):
    return open_split(name, directory, split, required_keys=(text_key,))


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
        probe_bucket(str(path)[:5] + str(path).split("/")[2])
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
