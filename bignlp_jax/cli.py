"""`bignlp-jax` command line: one sub-command per job, each a thin call into the library.

Usage errors and bad input exit with code 2 and one readable message (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from bignlp_jax.errors import Preempted, UserError
from bignlp_jax.perf.hugepages import reexec_with_huge_pages


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (path, or name under configs/, e.g. tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 mesh.fsdp=4")


def cmd_train(args) -> int:
    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def cmd_describe(args) -> int:
    from bignlp_jax.config import load_config
    from bignlp_jax.model.flops import describe
    from bignlp_jax.parallel.mesh import MESH_AXES, mesh_shape

    cfg = load_config(args.config, args.overrides)
    if args.devices is None:
        import jax

        args.devices = jax.device_count()
    shape = dict(zip(MESH_AXES, mesh_shape(cfg.mesh, args.devices)))
    info = describe(cfg, shape)
    gib = 2**30
    print(f"model                 {info['model']}")
    print(f"parameters            {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)")
    print(f"non-embedding params  {info['non_embedding_parameters']:,}")
    if "lora_parameters" in info:
        print(f"LoRA adapter params   {info['lora_parameters']:,} (trained; the base is frozen)")
    print(f"train FLOPs / token   {info['flops_per_token']:.4g} (seq_len {info['seq_len']})")
    print(f"mesh                  {' x '.join(f'{k}={v}' for k, v in shape.items())}")
    print(f"params / device       {info['param_bytes_per_device'] / gib:.3f} GiB (float32)")
    print(f"AdamW state / device  {info['optimizer_bytes_per_device'] / gib:.3f} GiB")
    print(f"total / device        {info['param_plus_optimizer_gib_per_device']:.3f} GiB")
    print(json.dumps(info))
    return 0


# Modules that add their own sub-commands: each has `register(subparsers)` which adds parsers
# with `set_defaults(func=...)`. Keeps this file thin as commands grow.
COMMAND_MODULES: list[str] = [
    "bignlp_jax.data.commands",
    "bignlp_jax.evaluate.commands",
    "bignlp_jax.infer.commands",
    "bignlp_jax.pipeline.commands",
    "bignlp_jax.perf.bench",
    "bignlp_jax.perf.plan_command",
    "bignlp_jax.export.commands",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from bignlp_jax.parallel.distributed import add_arguments as add_distributed_arguments

    parser = argparse.ArgumentParser(prog="bignlp-jax", description=__doc__.splitlines()[0])
    add_distributed_arguments(parser)  # top-level: `bignlp-jax --coordinator H:P ... train ...`
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)

    p = sub.add_parser("train", help="train (pretrain or finetune) a model from a config")
    config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("describe", help="parameters, FLOPs/token and memory/device of a config")
    config_args(p)
    p.add_argument("--devices", type=int, default=None, help="devices to lay the mesh over")
    p.set_defaults(func=cmd_describe)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, but `key=value` overrides may also follow options (`describe C --devices 8 a=1`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        from bignlp_jax.parallel.distributed import maybe_initialize

        maybe_initialize(args)  # joins a multi-process job (SLURM, Kubernetes, flags) first
        return args.func(args)
    except UserError as e:
        print(f"bignlp-jax {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted as e:  # checkpoint saved; exit 75 asks the launcher to run us again
        print(f"bignlp-jax {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"bignlp-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The `bignlp-jax` console script: huge-page malloc for XLA's CPU buffers, then `main`."""
    reexec_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
