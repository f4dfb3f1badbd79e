"""`bignlp-jax` command line: one sub-command per job, each a thin call into the library.

Bad input exits with code 2 and one readable message (add --verbose for the traceback); a bug
in bignlp-jax itself exits 1 with its traceback and a line asking for a bug report.
Start-up stays light: only the chosen sub-command's module is imported, and nothing here imports
jax, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import traceback

from bignlp_jax import outage
from bignlp_jax.errors import Preempted, UserError
from bignlp_jax.parallel.distributed import add_arguments as add_distributed_arguments
from bignlp_jax.parallel.peer_watch import (
    LOST_PEER_EXIT_CODE,
    announce_failure,
    wait_for_lost_peer,
)
from bignlp_jax.perf.hugepages import reexec_with_huge_pages

BUG_REPORT = ("this is a bug in bignlp-jax, not in your input: please report it with the "
              "command you ran and the traceback above")

EXAMPLES = """examples (from a source checkout, with the venv active: `source .venv/bin/activate`):
  bignlp-jax train configs/tiny.yaml                     # a 1-minute run (run.dir in the file)
  bignlp-jax train configs/tiny.yaml train.steps=200 optimizer.lr=1e-3 run.dir=runs/mine
  bignlp-jax describe configs/models/gpt3_175b.yaml --devices 512 mesh.fsdp=64 mesh.tensor=8
  bignlp-jax pipeline configs/pipelines/default.yaml     # tokenizer -> ... -> report.md
  bignlp-jax eval runs/tiny
  bignlp-jax generate --run runs/pipeline_default/pretrain --prompt "def main("
  bignlp-jax export --run runs/tiny --out exported/tiny
run `bignlp-jax COMMAND --help` for a command's options."""

# Sub-command -> (module with `register(subparsers)`, one-line help for the top-level listing).
# Only the module of the command being run is imported (jax and friends take ~1 s to import).
# tests/test_cli.py checks each module registers exactly these names with these help lines.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bignlp_jax.cli", "train (pretrain or finetune) a model from a config"),
    "describe": ("bignlp_jax.cli", "parameters, FLOPs/token and memory/device of a config"),
    "tokenizer": ("bignlp_jax.data.commands", "train SentencePiece tokenizers"),
    "data": ("bignlp_jax.data.commands", "prepare TFDS datasets, tokenize them, time the loader"),
    "eval": ("bignlp_jax.evaluate.commands",
             "evaluate a run's checkpoint on held-out data -> eval.json"),
    "lm-eval": ("bignlp_jax.evaluate.harness_commands",
                "run lm-evaluation-harness tasks on a run's checkpoint -> lm_eval.json"),
    "generate": ("bignlp_jax.infer.commands", "continue text prompts with a trained run"),
    "pipeline": ("bignlp_jax.pipeline.commands",
                 "tokenizer -> pretrain -> finetune -> evaluate -> export"),
    "bench": ("bignlp_jax.perf.bench_command", "time the train step: tokens/s, MFU, memory"),
    "plan": ("bignlp_jax.perf.plan_command",
             "compile the train step ahead of time for N devices: memory, mesh search"),
    "export": ("bignlp_jax.export.commands",
               "write a run's weights as a Hugging Face model or a params-only bundle"),
    "coordinator": ("bignlp_jax.parallel.coordination_host",
                    "host the coordination service of a multi-process job (for "
                    "--coordination-service external)"),
    "import": ("bignlp_jax.export.commands",
               "read a local Hugging Face model into a params-only run directory (use it "
               "with init_from=RUN_DIR)"),
}

# Function-level imports: a command loads its package only when run (a fast `--help`).


def cmd_train(args) -> int:
    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, allow_config_change=args.allow_config_change)
    return 0


def cmd_describe(args) -> int:
    import json

    from bignlp_jax.config import load_config
    from bignlp_jax.model.flops import describe, pipeline_text
    from bignlp_jax.parallel.mesh import MESH_AXES, dcn_axes, mesh_shape, mesh_text

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
    print(f"mesh                  {mesh_text(shape, cfg.mesh)}")
    info["dcn"] = dcn_axes(cfg.mesh)  # axes that cross slices/nodes, and over how many
    if info["pipeline"] is not None:
        print(f"pipeline              {pipeline_text(info['pipeline'])}")
    print(f"params / device       {info['param_bytes_per_device'] / gib:.3f} GiB (float32)")
    print(f"AdamW state / device  {info['optimizer_bytes_per_device'] / gib:.3f} GiB")
    print(f"total / device        {info['param_plus_optimizer_gib_per_device']:.3f} GiB")
    print(json.dumps(info))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """This module's own commands: train and describe."""
    from bignlp_jax.config.loader import add_config_arguments

    p = sub.add_parser("train", help=COMMANDS["train"][1],
                       usage="%(prog)s CONFIG [KEY=VALUE ...] [--allow-config-change]\n"
                       "  e.g. bignlp-jax train tiny train.steps=50",
                       description="Train from CONFIG (a YAML path or a name under configs/, "
                       "e.g. tiny) plus dotted overrides. Rerunning the same command resumes "
                       "the run in run.dir.",
                       epilog="example: bignlp-jax train tiny train.steps=200 run.dir=runs/mine")
    add_config_arguments(p, "train.steps=10 mesh.fsdp=4")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the run's config.yaml in keys "
                        "other than steps/time/cadence; the change is recorded in "
                        "RUN_DIR/config_history.jsonl (default: refuse and show the diff)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("describe", help=COMMANDS["describe"][1],
                       description="Print a config's parameter count, training FLOPs per token "
                       "and parameter + AdamW memory per device for a mesh, without allocating "
                       "or compiling anything (`plan` compiles the step for real).",
                       epilog="example: bignlp-jax describe configs/models/gpt3_175b.yaml "
                       "--devices 512 mesh.fsdp=64 mesh.tensor=8")
    add_config_arguments(p, "train.steps=10 mesh.fsdp=4")
    p.add_argument("--devices", type=int, default=None,
                   help="devices to lay the mesh over (default: the devices jax sees)")
    p.set_defaults(func=cmd_describe)


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is one), if any."""
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `argv`, only the module of the command it names is
    imported (the others get a placeholder that carries their help line)."""
    parser = argparse.ArgumentParser(
        prog="bignlp-jax", description=__doc__.splitlines()[0], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="print the traceback of errors too (default: one line)")
    add_distributed_arguments(parser)  # top-level: `bignlp-jax --coordinator H:P ... train ...`
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen_command(argv)
    registered: set[str] = set()
    for name, (module, summary) in COMMANDS.items():
        if name in registered:
            continue
        if argv is None or (chosen is not None and module == COMMANDS[chosen][0]):
            importlib.import_module(module).register(sub)
            registered |= {n for n, (m, _) in COMMANDS.items() if m == module}
        else:
            sub.add_parser(name, help=summary)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, but `key=value` overrides may also follow options
    (`describe C --devices 8 a=1`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def _one_line(command: str, error: BaseException) -> str:
    """The message without a repeated `command:` prefix (library messages carry their own)."""
    text = str(error)
    for prefix in (f"{command}: ", f"{command.split()[0]}: "):
        text = text.removeprefix(prefix)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(build_parser(argv), argv)
    command = args.command
    try:
        # imported here, like every command's modules: start-up stays light
        from bignlp_jax.config.loader import check_unique_overrides
        from bignlp_jax.parallel.distributed import maybe_initialize

        check_unique_overrides(getattr(args, "overrides", None) or [])
        maybe_initialize(args)  # joins a multi-process job (SLURM, Kubernetes, flags) first
        return args.func(args)
    except UserError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"bignlp-jax {command}: error: {_one_line(command, e)}", file=sys.stderr)
        announce_failure(_one_line(command, e), e.exit_code)  # to the job's other processes
        return e.exit_code
    except Preempted as e:  # checkpoint saved; exit 75 asks the launcher to run us again
        print(f"bignlp-jax {command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"bignlp-jax {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: the traceback is what a fix needs  # noqa: BLE001
        if isinstance(e, BrokenPipeError) and _stdout_closed():
            return 128 + signal.SIGPIPE  # the reader left (`| head`): end quietly, as cat does
        lost = outage.describe(e)  # not a bug: a bucket endpoint went away
        if lost is not None:
            outage.quiet_outage_tracebacks()  # Orbax's threads may still raise the same error
            print(f"bignlp-jax {command}: error: {lost}", file=sys.stderr)
            announce_failure(lost, UserError.exit_code)
            return UserError.exit_code
        if wait_for_lost_peer(e):  # not a bug: a peer process vanished mid-collective
            print(f"bignlp-jax {command}: error: lost a peer process during a collective",
                  file=sys.stderr)
            return LOST_PEER_EXIT_CODE
        traceback.print_exc()
        print(f"bignlp-jax {command}: internal error: {BUG_REPORT}", file=sys.stderr)
        announce_failure("an internal error (a traceback)", 1)
        return 1


def _stdout_closed() -> bool:
    """Whether our standard output's reader has gone; if so, stdout now writes to /dev/null so
    that the interpreter's final flush does not raise again."""
    try:
        sys.stdout.flush()
        poll = select.poll()  # a pipe whose reader closed polls as an error
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):
            return False
    except BrokenPipeError:
        pass
    except (OSError, ValueError):  # stdout closed or not a file: not a reader that left
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return True


def entry() -> int:
    """The `bignlp-jax` console script: huge-page malloc for XLA's CPU buffers, then `main`."""
    reexec_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
