"""Hugging Face export and import: safetensors weights, config.json, tokenizer, in both directions.

    export_hf(params, model_cfg, out_dir, dtype)     -> a directory transformers loads offline
    load_hf_params(hf_dir, model_cfg, shardings)     -> our params from such a directory
    hf_model_config(hf_dir)                          -> the ModelConfig that matches it

Both directions go through `layout.hf_layout`, the single name/layout map.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax.config import ModelConfig
from bignlp_jax.errors import UserError
from bignlp_jax.hf.arch import (
    GPT2,
    architecture_of,
    check_matches,
    hf_architecture,
    hf_model_config,
    read_hf_config,
    to_hf_config,
)
from bignlp_jax.hf.gather import check_on_writer, is_writer, to_host
from bignlp_jax.hf.layout import Entry, hf_layout, layer_shape, tensor_order
from bignlp_jax.hf.st_files import DTYPES, SafetensorsDir, ShardedWriter, Spec, parse_size
from bignlp_jax.hf.tokenizer import resolve_tokenizer, write_hf_tokenizer
from bignlp_jax.model import abstract_params
from bignlp_jax.owned import check_replaceable, seal

__all__ = ["EXPORT_DTYPES", "export_hf", "hf_model_config", "load_hf_params"]

Params = dict[str, Any]
EXPORT_DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD = "5GB"  # what transformers' save_pretrained used for years
# Tensors some Hugging Face checkpoints carry that are not parameters (old causal-mask buffers,
# cached RoPE frequencies); transformers ignores them on load, and so do we.
IGNORED = {GPT2: re.compile(r"\.attn\.(bias|masked_bias)$"),
           "LlamaForCausalLM": re.compile(r"rotary_emb\.inv_freq$")}
BASE_PREFIX = {GPT2: "transformer.", "LlamaForCausalLM": "model."}


def export_dtype(dtype: str) -> np.dtype:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not allowed; choose one of "
                        f"{', '.join(EXPORT_DTYPES)} (float16 can overflow weights trained in "
                        "bfloat16/float32)")
    return np.dtype(jax.numpy.dtype(dtype))


def get_path(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: Params, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flat_paths(tree: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        out += _flat_paths(value, prefix + (key,)) if isinstance(value, dict) else [prefix + (key,)]
    return out


def _checked_layout(cfg: ModelConfig) -> tuple[list[Entry], Params]:
    """The map for `cfg`, checked to cover every parameter exactly once (guards the map
    against changes to the parameter tree)."""
    entries = hf_layout(cfg)
    shapes = abstract_params(cfg)
    mapped = {e.path for e in entries}
    params = set(_flat_paths(shapes))
    if mapped != params:
        raise AssertionError(f"export map out of date: unmapped {sorted(params - mapped)}, "
                             f"unknown {sorted(mapped - params)}")
    return entries, shapes


def hf_specs(cfg: ModelConfig, dtype: np.dtype) -> list[Spec]:
    """Every Hugging Face tensor of `cfg`, in file order, with its shape."""
    entries, shapes = _checked_layout(cfg)
    specs = []
    for entry, layer in tensor_order(entries, cfg.num_layers):
        ours = layer_shape(entry, get_path(shapes, entry.path).shape)
        for piece, name in zip(entry.pieces, entry.hf_names(layer)):
            specs.append(Spec(name, piece.shapes(ours)[-1], dtype))
    return specs


def check_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """An existing `out_dir` may be replaced only if it holds exactly an earlier export of ours
    and `overwrite` is set (owned.py), so a mistyped --out never deletes someone's files."""
    check_replaceable(out_dir, overwrite)


def prepare_out_dir(out_dir: Path) -> Path:
    """A fresh temporary sibling of `out_dir`, renamed into place by `finish_out_dir`, so a
    half-written export never looks complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def finish_out_dir(tmp: Path, out_dir: Path) -> None:
    seal(tmp)  # the ledger of what we wrote: the next export may replace exactly that
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_hf(params: Params, model_cfg: ModelConfig, out_dir: str | Path,
              dtype: str = "float32", tokenizer: Any = None,
              max_shard_size: str | int = DEFAULT_MAX_SHARD, overwrite: bool = False) -> Path:
    """Write `params` as a Hugging Face model directory (all processes must call this).

    Tensors are gathered and written one at a time (a stacked parameter one layer at a time),
    so host memory stays near the largest single tensor. `tokenizer`: a loaded tokenizer, a
    .model file, a tokenizer dir or a run dir (None: no tokenizer files)."""
    architecture_of(model_cfg)  # refuses configs with no exact equivalent, naming the field
    np_dtype = export_dtype(dtype)
    out_dir = Path(out_dir)
    entries, _ = _checked_layout(model_cfg)
    specs = hf_specs(model_cfg, np_dtype)
    max_shard_bytes = parse_size(max_shard_size)
    tok = None

    def check() -> None:  # on process 0 only: the output and tokenizer paths may be local to it
        nonlocal tok
        check_out_dir(out_dir, overwrite)
        tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
        if tok is not None and tok.vocab_size > model_cfg.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size "
                            f"is {model_cfg.vocab_size}: it is not this model's tokenizer")

    check_on_writer(check)
    writer = None
    if is_writer():
        writer = ShardedWriter(prepare_out_dir(out_dir), specs, max_shard_bytes)
    for entry, layer in tensor_order(entries, model_cfg.num_layers):
        x = to_host(get_path(params, entry.path), np_dtype, layer)  # a collective: all processes
        for piece, name in zip(entry.pieces, entry.hf_names(layer)):
            if writer is not None:
                writer.add(name, piece.to_hf(x))
        del x  # keep one tensor on the host at a time
    if writer is not None:
        writer.close()
        tmp = writer.out_dir  # the temporary dir from prepare_out_dir
        ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
        if tok is not None:
            ids = write_hf_tokenizer(tok, tmp, model_cfg.max_seq_len)
        hf_config = to_hf_config(model_cfg, dtype, ids)
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        finish_out_dir(tmp, out_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bignlp_jax export_hf")
    return out_dir


def _hf_names(files: SafetensorsDir, arch: str) -> dict[str, str]:
    """Full Hugging Face name -> name in the files (base-model files lack the prefix)."""
    prefix = BASE_PREFIX[arch]
    names = [n for n in files.names() if not IGNORED[arch].search(n)]
    if any(n.startswith(prefix) for n in names):
        return {n: n for n in names}
    return {(n if n.startswith("lm_head.") else prefix + n): n for n in names}


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_hf_params(hf_dir: str | Path, model_cfg: ModelConfig,
                   shardings: Params | None = None) -> Params:
    """Read a local Hugging Face model (safetensors) into our params (float32).

    Refuses an unsupported architecture, a config that does not match `model_cfg`, missing or
    unexpected tensors, wrong shapes and non-float dtypes, naming them. With `shardings`, each
    parameter is placed as it is read (host memory: one parameter); otherwise numpy arrays."""
    hf_dir = Path(hf_dir)
    arch = hf_architecture(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    check_matches(hf_model_config(hf_dir), model_cfg, str(hf_dir))
    entries, shapes = _checked_layout(model_cfg)
    want = {s.name: s.shape for s in hf_specs(model_cfg, np.dtype(np.float32))}
    with SafetensorsDir(hf_dir) as files:
        names = _hf_names(files, arch)
        if model_cfg.tie_embeddings:  # a tied head may be saved too; transformers re-ties it
            names.pop("lm_head.weight", None)
        missing, extra = set(want) - set(names), set(names) - set(want)
        if missing or extra:
            raise UserError(
                f"the tensors in {hf_dir} do not match {arch} with this config:\n"
                + (f"  missing: {_listing(missing)}\n" if missing else "")
                + (f"  unexpected: {_listing(extra)}\n" if extra else "")
                + "  fix: check the model's config.json matches its weights"
            )
        bad_dtype = [f"{n} ({files.dtype_tag(names[n])})" for n in want
                     if files.dtype_tag(names[n]) not in DTYPES]
        if bad_dtype:
            raise UserError(f"dtype not allowed in {hf_dir}: {_listing(bad_dtype)}; only "
                            f"{', '.join(DTYPES)} weights can be imported (no quantized models)")
        bad_shape = [f"{n}: file {files.shape(names[n])}, expected {want[n]}" for n in want
                     if files.shape(names[n]) != tuple(want[n])]
        if bad_shape:
            raise UserError(f"wrong tensor shapes in {hf_dir}:\n  " + "\n  ".join(bad_shape[:12]))
        params: Params = {}
        for entry in entries:
            shape = get_path(shapes, entry.path).shape
            ours = np.empty(shape, np.float32)
            value: np.ndarray | jax.Array = ours
            for layer in range(shape[0]) if entry.stacked else [None]:
                view = ours[layer] if entry.stacked else ours
                for piece, name in zip(entry.pieces, entry.hf_names(layer)):
                    piece.into_ours(files.get(names[name]).astype(np.float32), view)
            if shardings is not None:
                sharding = get_path(shardings, entry.path)
                value = jax.make_array_from_callback(shape, sharding, ours.__getitem__)
            set_path(params, entry.path, value)
    return params
