"""Params-only bundles: a directory every params reader of ours already understands.

    OUT/config.yaml                     the resolved config (model, data.tokenizer -> OUT/tokenizer)
    OUT/checkpoints/<step>/state        {"params": ...} only, as an Orbax PyTree (sharded, no
                                        optimizer state, no data iterator state)
    OUT/tokenizer/                      the SentencePiece tokenizer, if the run had one

A bucket OUT (gs://, s3://) is written in place, as training checkpoints are: every process's
shards straight into OUT/checkpoints/<step> (which Orbax finalizes with its commit file, so a
half-written step never lists as complete), then config.yaml, the marker of a finished bundle.

It has the run-directory layout, so `bignlp_jax.checkpoint.load_params(OUT, ...)`,
`init_from=OUT`, `bignlp-jax generate --run OUT` and `bignlp-jax export --run OUT` read it with
no special case. Orbax writes each process's shards directly (into a directory all processes
share, as for training checkpoints): nothing is gathered to one host.
`bignlp-jax import` writes the same layout from a Hugging Face model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint.paths import STATE
from bignlp_jax.compat import orbax as orbax_compat  # noqa: F401 - applied on import: s3:// arrays
from bignlp_jax.config import Config, save_config
from bignlp_jax.hf.gather import check_on_writer
from bignlp_jax.hf.tokenizer import resolve_tokenizer
from bignlp_jax.hf.weights import check_out_dir, export_dtype
from bignlp_jax.owned import check_replaceable, seal
from bignlp_jax.rundir import RunDir

Params = dict[str, Any]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _partial_dir(out_dir: Path) -> Path:
    # the same name on every process (they all write into it), removed by process 0 first
    return out_dir.parent / f".{out_dir.name}.partial"


def save_params_bundle(params: Params, cfg: Config, out_dir: str | Path, *, step: int = 0,
                       dtype: str | None = None, tokenizer: Any = None,
                       overwrite: bool = False) -> Path:
    """Write a params-only bundle (all processes must call this).

    `dtype` (float32/bfloat16) casts the saved params; readers cast back to the model's float32
    parameters. `tokenizer`: a loaded tokenizer, .model file, tokenizer dir or run dir."""
    if dtype is not None:
        target = export_dtype(dtype)
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(target), p))(params)
    if storage.is_remote(out_dir):
        return _save_to_bucket(params, cfg, str(out_dir), step, tokenizer, overwrite)
    out_dir = Path(out_dir)
    tmp = _partial_dir(out_dir)
    tok = None

    def check() -> None:  # on process 0 only: the output and tokenizer paths may be local to it
        nonlocal tok
        check_out_dir(out_dir, overwrite)
        if tokenizer is not None:
            tok = resolve_tokenizer(tokenizer)

    check_on_writer(check)
    if jax.process_index() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _sync("bignlp_jax bundle start")
    staged = RunDir(tmp)
    ocp.PyTreeCheckpointer().save((staged.checkpoints / str(step) / STATE).absolute(),
                                  {"params": params})
    if jax.process_index() == 0:
        if tok is not None:
            tok.save(staged.tokenizer)
        # config.yaml names the bundle's final place (the staging folder is renamed to it)
        save_config(_bundle_config(cfg, RunDir(out_dir.resolve()), tok is not None),
                    staged.config_file)
        seal(tmp)  # the ledger of what we wrote: a later --overwrite replaces exactly that
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    _sync("bignlp_jax bundle done")
    return out_dir


def _bundle_config(cfg: Config, bundle: RunDir, tokenizer_saved: bool) -> Config:
    """`cfg` as the bundle records it: run.dir is the bundle, data.tokenizer its own copy."""
    data = cfg.data
    if tokenizer_saved:
        data = data.model_copy(update={"tokenizer": str(bundle.tokenizer)})
    return cfg.model_copy(update={"data": data, "init_from": None,
                                  "run": cfg.run.model_copy(update={"dir": str(bundle)})})


def _save_to_bucket(params: Params, cfg: Config, out_dir: str, step: int,
                    tokenizer: Any, overwrite: bool) -> storage.AnyPath:
    """`save_params_bundle` for a bucket OUT: no rename there, so written in place, marker last."""
    out = storage.path(out_dir)
    bundle = RunDir(out)
    tok = None

    def check() -> None:
        nonlocal tok
        if check_replaceable(out, overwrite):  # exactly an earlier bundle, and --overwrite
            storage.rmtree(out)
        if tokenizer is not None:
            tok = resolve_tokenizer(tokenizer)

    check_on_writer(check)
    _sync("bignlp_jax bundle start")
    # a step item written through Orbax's composite handler: on a bucket the step directory is
    # finalized by Orbax's commit file, which is what its step listing (and ours) looks for
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(bundle.checkpoints / str(step), ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": params})))
    if jax.process_index() == 0:
        if tok is not None:
            tok.save(bundle.tokenizer)
        save_config(_bundle_config(cfg, bundle, tok is not None), bundle.config_file)
        seal(out)
    _sync("bignlp_jax bundle done")
    return out
