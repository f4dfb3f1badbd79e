"""Config -> text batch source: which dataset, which tokenizer, which split, which seed.

`data.source: tfds` reads `data.tfds_name` from `data.data_dir` (null: `$BIGNLP_DATA_DIR` or
~/.cache/bignlp_jax/datasets). The embedded corpora (`stdlib_docs`, `stdlib_modules`) are built
there on first use; any other dataset must already be prepared. `data.tokenizer` names a
tokenizer (a `.model`, a tokenizer dir or a run dir); null means the default tokenizer trained
on `stdlib_docs` with `model.vocab_size` pieces (built on first use), allowed only for the
embedded corpora. The training stream is shuffled with `run.seed`; the held-out stream
(`data.eval_split`) is read in stored order, so every evaluation sees the same batches.
"""

from __future__ import annotations

import functools
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.config import Config
from bignlp_jax.data import embedded
from bignlp_jax.data.pipeline import PackedBatches, lm_encoder
from bignlp_jax.data.tfds_source import open_split, resolve_data_dir
from bignlp_jax.data.tokenizer import MODEL_FILE, Tokenizer, load_tokenizer
from bignlp_jax.errors import UserError


def dataset_name(cfg: Config) -> str:
    if not cfg.data.tfds_name:
        raise UserError("data.source=tfds needs data.tfds_name (e.g. stdlib_docs, or the name "
                        "given to `bignlp-jax data prepare --name`)")
    return cfg.data.tfds_name


def data_dir(cfg: Config) -> Path:
    """The data dir of the config; the embedded corpora are built into it when missing."""
    path = resolve_data_dir(cfg.data.data_dir)
    if cfg.data.tfds_name in embedded.EMBEDDED:
        embedded.ensure_embedded(path)
    return path


def tokenizer_path(cfg: Config) -> Path:
    """Where the config's tokenizer lives (training the default one if it is missing)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer).expanduser()
    if cfg.data.tfds_name not in embedded.EMBEDDED:
        raise UserError(
            f"data.tokenizer is not set, and dataset {cfg.data.tfds_name!r} is not one of the "
            f"embedded corpora ({', '.join(embedded.EMBEDDED)}) that have a default tokenizer\n"
            "  fix: train one with `bignlp-jax tokenizer train --input ... --vocab-size "
            f"{cfg.model.vocab_size} --out DIR` and set data.tokenizer=DIR"
        )
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


def make_text_source(cfg: Config, split: str, rows: tuple[int, int]) -> PackedBatches:
    """Packed language-modelling batches of the config's dataset, rows [lo, hi) per step."""
    name, directory = dataset_name(cfg), data_dir(cfg)
    split_ = split_name(cfg, split)
    source = _open(name, str(directory), split_, cfg.data.text_key)
    tokenizer = resolve_tokenizer(cfg)
    return PackedBatches(
        source, lm_encoder(tokenizer, cfg.data.text_key), seq_len=cfg.data.seq_len,
        global_batch=cfg.train.global_batch_size, rows=rows,
        seed=cfg.run.seed if split == "train" else None,
        num_threads=cfg.data.worker_threads, name=f"split {split_!r} of {name} in {directory}",
    )


def record_tokenizer(cfg: Config, run_dir: str | Path) -> Path | None:
    """Check the tokenizer against the model and copy it into RUN_DIR/tokenizer/.

    A run that already has checkpoints must keep its tokenizer: resuming with another one would
    silently change what every token id means.
    """
    if cfg.data.source != "tfds":
        return None
    tokenizer = resolve_tokenizer(cfg)
    out = storage.path(run_dir) / "tokenizer"
    if (out / MODEL_FILE).is_file():
        recorded = load_tokenizer(out).describe()
        if recorded == tokenizer.describe():
            return out
        if (storage.path(run_dir) / "checkpoints").is_dir():
            raise UserError(
                f"run {run_dir} was trained with tokenizer {recorded['model_sha256'][:12]} "
                f"(vocab {recorded['vocab_size']}) but the config now uses "
                f"{tokenizer.model_path} (vocab {tokenizer.vocab_size})\n"
                "  fix: use the run's own tokenizer (data.tokenizer=RUN_DIR) or a new run.dir"
            )
    tokenizer.save(out)
    return out
