"""`bignlp-jax export` and `bignlp-jax import`: thin wrappers around hf/weights.py and bundle.py.

    bignlp-jax export --run RUN_DIR [--step S] --format hf|params|peft --out DIR [--dtype D]
                      [--merge]  (a LoRA run: hf/params need --merge; peft writes the adapters)
    bignlp-jax import --format hf --from HF_DIR --out RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.access import check_path
from bignlp_jax.containment import contained
from bignlp_jax.errors import UserError
from bignlp_jax.owned import LEDGER, check_replaceable

# Function-level imports: a command loads its package only when run (a fast `--help`).


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's weights as a Hugging Face model or a "
                                      "params-only bundle")
    p.add_argument("--run", required=True, help="run directory (or its checkpoints / a step dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--format", choices=("hf", "params", "peft"), default="hf",
                   help="hf: safetensors + config.json + tokenizer for transformers; params: "
                        "params-only Orbax bundle for init_from / generate; peft: a LoRA "
                        "run's adapters for peft.PeftModel.from_pretrained on the base model "
                        "(default: hf)")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA run: fold the adapters into the weights (W + alpha/rank * BA)")
    p.add_argument("--out", required=True, help="output directory (created; must be writable)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory to export with the weights (default: the run "
                        "directory's own tokenizer/; nothing outside the run is read unless "
                        "named here)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (only one that holds exactly the "
                        "files an export of ours wrote; anything else is never replaced)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="hf: split the weights into files of at most this size "
                        "(e.g. 2GB; default: 5GB)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read a local Hugging Face model into a params-only run "
                                      "directory (use it with init_from=RUN_DIR)")
    p.add_argument("--format", choices=("hf",), default="hf",
                   help="format of --from: hf, a transformers model directory (default: hf)")
    p.add_argument("--from", dest="source", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--dtype", default="float32", help="saved dtype: float32 (default) or bfloat16")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier import or export in --out (never other files)")
    p.set_defaults(func=cmd_import)


def run_shardings(cfg):
    """The run's own parameter shardings when its mesh fits these devices, else None (the
    checkpoint reader then puts each parameter whole on one local device)."""
    import jax

    from bignlp_jax.model import param_shardings
    from bignlp_jax.parallel.mesh import build_mesh
    from bignlp_jax.parallel.rules import rules_for

    try:
        return param_shardings(cfg.model, build_mesh(cfg.mesh), rules_for(cfg))
    except UserError:
        if jax.process_count() > 1:
            raise
        return None


def run_tokenizer(run: Path, cfg, given: str | None = None) -> Path | None:
    """The tokenizer to export: `given` (--tokenizer), else the run's own (RUN_DIR/tokenizer/,
    copied there by training), else None.

    Nothing else outside the run directory is read: `data.tokenizer` in its config.yaml may
    name any file, and a run directory can come from anyone."""
    from bignlp_jax.checkpoint import run_root
    from bignlp_jax.data.tokenizer import JSON_FILE, MODEL_FILE
    from bignlp_jax.rundir import TOKENIZER, RunDir

    if given is not None:
        return storage.path(given)  # the user's own choice
    root = run_root(run)
    for name in (f"{TOKENIZER}/{JSON_FILE}", TOKENIZER):
        contained(root, name)  # a symlink out of the run directory is refused
    if contained(root, f"{TOKENIZER}/{MODEL_FILE}").is_file():
        return RunDir(root).tokenizer
    if cfg.data.tokenizer:  # e.g. a run on synthetic data, which records no tokenizer
        raise UserError(f"{root} holds no tokenizer/ but its config.yaml names data.tokenizer="
                        f"{cfg.data.tokenizer}, outside the run directory, which export does "
                        "not read on a run's word; fix: pass --tokenizer DIR to export that one")
    return None


def cmd_export(args) -> int:
    from bignlp_jax.checkpoint import load_params, load_run_config, resolve_step_dir
    from bignlp_jax.export.bundle import save_params_bundle
    from bignlp_jax.hf.arch import architecture_of
    from bignlp_jax.hf.weights import export_dtype, export_hf

    export_dtype(args.dtype)  # refuse before reading anything
    # before any weights are read; a local output is written beside --out and renamed into
    # place: its parent must be writable
    check_path(args.out if storage.is_remote(args.out) else Path(args.out).absolute().parent,
               "--out", what=f"--out {args.out}: its parent directory", fix="--out DIR")
    if storage.is_remote(args.out):  # a bucket: before any weights are read (a local --out is
        check_replaceable(args.out, args.overwrite)  # checked by its writer process alone)
    run = storage.path(args.run)
    cfg = load_run_config(run)
    if args.format == "hf":
        architecture_of(cfg.model)
    step_dir = resolve_step_dir(run, args.step)
    step = int(step_dir.name) if step_dir.name.isdigit() else 0
    lora = cfg.lora.rank > 0
    if args.format == "peft" and not lora:
        raise UserError(f"{run} is not a LoRA run (lora.rank=0): --format peft writes adapters\n"
                        "  fix: use --format hf for its full weights")
    if lora and args.format != "peft" and not args.merge:
        raise UserError(f"{run} is a LoRA run: its weights are the base plus adapters\n"
                        f"  fix: add --merge for merged --format {args.format} weights, or use "
                        "--format peft for the adapters alone")
    tokenizer = run_tokenizer(run, cfg, args.tokenizer)  # refused before any weights are read
    params = load_params(step_dir, cfg.model, shardings=run_shardings(cfg), lora=cfg.lora,
                         merged=args.format != "peft")
    if args.format == "peft":
        from bignlp_jax.export.peft import export_peft

        out = export_peft(params["lora"], cfg.model, cfg.lora, storage.staging_dir(args.out),
                          args.dtype, overwrite=args.overwrite)
        out = storage.publish(out, args.out, LEDGER)  # bucket --out: upload
    elif args.format == "hf":
        out = export_hf(params, cfg.model, storage.staging_dir(args.out), args.dtype, tokenizer,
                        args.max_shard_size, overwrite=args.overwrite)
        out = storage.publish(out, args.out, LEDGER)  # bucket --out: upload the files
    else:  # merged weights: the bundle is a plain model (no init_from, no adapters)
        from bignlp_jax.config import LoraConfig

        if lora:
            cfg = cfg.model_copy(update={"lora": LoraConfig(), "init_from": None})
        out = save_params_bundle(params, cfg, args.out, step=step, dtype=args.dtype,
                                 tokenizer=tokenizer, overwrite=args.overwrite)
    import jax

    embedding = params["embed"]["embedding"]
    print(json.dumps({"format": args.format, "out": str(out), "step": step, "dtype": args.dtype,
                      "tokenizer": str(tokenizer) if tokenizer else None,
                      "processes": jax.process_count(),
                      "devices": len(embedding.sharding.device_set)}))
    return 0


def _hf_tokenizer(source: Path):
    """The Hugging Face model's SentencePiece tokenizer, if it has one we can load."""
    from bignlp_jax.data.tokenizer import load_tokenizer

    model = contained(source, "tokenizer.model")  # a symlink out of the folder is refused
    if not model.is_file():
        return None
    try:
        return load_tokenizer(model)
    except UserError:
        return None


def cmd_import(args) -> int:
    import jax

    from bignlp_jax.checkpoint.params import default_shardings
    from bignlp_jax.config import Config, DataConfig, RunConfig
    from bignlp_jax.export.bundle import save_params_bundle
    from bignlp_jax.hf.weights import export_dtype, hf_model_config, load_hf_params
    from bignlp_jax.rundir import RunDir

    export_dtype(args.dtype)
    if jax.process_count() > 1:
        raise UserError("`bignlp-jax import` runs as one process; start it without "
                        "--num-processes / a multi-process launcher")
    if storage.is_remote(args.out):  # before the model is read; a local --out is checked by
        check_path(args.out, "--out", fix="--out DIR")  # its writer, so a refused import
        # opens nothing outside the model folder
    check_replaceable(args.out, args.overwrite)
    source = storage.fetch_dir(args.source)  # safetensors needs local files: a bucket is copied
    model_cfg = hf_model_config(source)
    params = load_hf_params(source, model_cfg, shardings=default_shardings(model_cfg))
    seq_len = min(DataConfig().seq_len, model_cfg.max_seq_len)
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=seq_len),
                 run=RunConfig(dir=str(args.out), name=model_cfg.name))
    tokenizer = _hf_tokenizer(source)
    out = save_params_bundle(params, cfg, args.out, dtype=args.dtype, tokenizer=tokenizer,
                             overwrite=args.overwrite)
    print(f"imported {source} ({model_cfg.family}, {model_cfg.num_layers} layers, hidden "
          f"{model_cfg.hidden}) into {out}; finetune with init_from={out} and the model.* "
          f"fields of {RunDir(out).config_file}", file=sys.stderr)
    print(json.dumps({"out": str(out), "model": model_cfg.model_dump(),
                      "tokenizer": tokenizer is not None}))
    return 0
