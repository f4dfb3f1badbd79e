"""`bignlp-jax plan CONFIG --devices N [--device-memory-gb M] [--search]`.

Needs N devices to compile for, so the command re-executes itself with N simulated CPU devices
(`--xla_force_host_platform_device_count=N`); nothing is allocated on them. Without `--search` it
compiles the config as given and prints its memory, collectives and estimated step time
(`plan.py`); `--search` tries mesh shapes (pipeline stages included), DCN splits, remat policies and
schedules (microbatches, pipeline microbatches, when fsdp weights are gathered)
(plan_search.py, whose names this module re-exports) and ranks the ones that fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from bignlp_jax.errors import UserError
from bignlp_jax.parallel.devices import DEVICES as DEVICE_KINDS
from bignlp_jax.perf.budget_command import add_arguments as add_budget_arguments
from bignlp_jax.perf.budget_command import cmd_budget
from bignlp_jax.perf.plan_search import (
    REMATS,
    _mesh_text,
    analytic_bytes,
    analytic_step_s,
    dcn_candidates,
    mesh_candidates,
    microbatch_choices,
    search,
)

__all__ = [
    "DEVICE_COUNT_FLAG", "REMATS", "analytic_bytes", "analytic_step_s", "cmd_plan",
    "dcn_candidates", "mesh_candidates", "microbatch_choices", "register", "search",
]

# Function-level imports: jax may be imported only after the re-exec gives the process its devices.

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # XLA's simulated CPU devices
# XLA's SPMD partitioner logs a C++ WARNING ("Involuntary full rematerialization", a few per
# compiled mesh) where it reshards inefficiently. plan compiles candidate meshes only to measure
# them: that cost already shows in their memory and collective figures, and the user cannot act
# on the line. Level 2 drops XLA's C++ INFO and WARNING records of the plan process only and keeps
# its ERROR and FATAL ones; a TF_CPP_MIN_LOG_LEVEL the user set wins. Read when jax initialises.
XLA_LOG_LEVEL = ("TF_CPP_MIN_LOG_LEVEL", "2")


def _child_argv(args) -> list[str]:
    argv = [sys.executable, "-m", "bignlp_jax.cli", "plan", args.config, *args.overrides,
            "--devices", str(args.devices), "--device", args.device,
            "--time-budget", str(args.time_budget), "--max-compiles", str(args.max_compiles)]
    if args.device_memory_gb is not None:
        argv += ["--device-memory-gb", str(args.device_memory_gb)]
    if args.search:
        argv.append("--search")
    if args.json:
        argv.append("--json")
    return argv


def _reexec(args) -> int:
    """Run this command again in a process that has `args.devices` simulated CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={args.devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault(*XLA_LOG_LEVEL)
    return subprocess.run(_child_argv(args), env=env).returncode


def _has_devices(n: int) -> bool:
    """Whether this process was started with n simulated CPU devices (JAX's own settings;
    after a re-exec, or when the caller set them up already)."""
    return (os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
            and f"{DEVICE_COUNT_FLAG}={n}" in os.environ.get("XLA_FLAGS", "").split())


def _axis_text(comm: dict) -> str:
    """'data 1.2 GiB, fsdp 30.1 GiB, ...': collective bytes per device by mesh axis."""
    gib = 2**30
    return ", ".join(f"{axes} {v / gib:.3g}" for axes, v in sorted(
        comm.get("by_axis", {}).items(), key=lambda kv: -kv[1])) + " GiB"


def _shape(plan: dict) -> dict[str, Any]:
    """A compiled plan's mesh sizes, DCN splits and pipeline schedule (what `_mesh_text`
    shows)."""
    pipeline = plan.get("pipeline") or {}
    return {**plan["mesh"], **{f"dcn_{k}": v for k, v in plan["dcn"].items()},
            "repeats": pipeline.get("repeats", 1),
            "pipeline_microbatches": pipeline.get("microbatches"),
            "gather": plan.get("pipeline_fsdp_gather", "step")}


def _print_plan(cfg, plan: dict, analytic: float) -> None:
    from bignlp_jax.perf.plan import COLLECTIVES

    gib = 2**30
    compiled_static = plan["param_bytes_per_device"] + plan["optimizer_bytes_per_device"]
    shape = _shape(plan)
    print(f"mesh d x f x seq x t        {_mesh_text(shape)} ({plan['devices']} devices),"
          f" remat={plan['remat']}")
    if plan.get("pipeline"):
        from bignlp_jax.model.flops import pipeline_text

        print(f"pipeline                    {pipeline_text(plan['pipeline'])}")
    print(f"parameters / device         {plan['param_bytes_per_device'] / gib:10.3f} GiB")
    print(f"optimizer state / device    {plan['optimizer_bytes_per_device'] / gib:10.3f} GiB")
    print(f"temporaries / device        {plan['temp_bytes_per_device'] / gib:10.3f} GiB")
    print(f"total / device              {plan['total_gib_per_device']:10.3f} GiB of "
          f"{plan['device_memory_gib']:g}: {'fits' if plan['fits'] else 'DOES NOT FIT'}")
    print(f"analytic params+optimizer   {analytic / gib:10.3f} GiB (compiled/analytic "
          f"{compiled_static / analytic:.3f})")
    comm = plan["collective_bytes_per_device"]
    print(f"collectives / device / step {sum(comm[k] for k in COLLECTIVES) / gib:10.3f}"
          f" GiB ({comm['cross_host'] / gib:.3f} across hosts"
          + (f", over DCN: {', '.join(plan['dcn'])}" if plan["dcn"] else "") + ")")
    print(f"  by mesh axis              {_axis_text(comm)} (from the compiled program)")
    print(f"estimated step              {plan['est_step_s']:10.3f} s (compute "
          f"{plan['compute_s']:.3f} + comm {plan['comm_s']:.3f}), est. MFU "
          f"{plan['est_mfu']:.1%}; compiled in {plan['compile_s']:.1f}s")
    if not plan["fits"]:
        print("  fix: let `--search` find a mesh, remat and microbatches that fit; or plan for "
              "more devices (--devices), shard the state further (mesh.fsdp), recompute "
              "activations (model.remat=full) or split the batch (train.microbatches)")


def cmd_plan(args) -> int:
    if args.budget:
        return cmd_budget(args)
    if args.config is None or args.devices is None:
        raise UserError("plan needs a CONFIG and --devices N (or --budget, see plan --help)")
    if args.device not in DEVICE_KINDS:
        raise UserError(f"--device {args.device!r} is not a device kind we know; use one of "
                        f"{', '.join(sorted(DEVICE_KINDS))}")
    args.time_budget = 480.0 if args.time_budget is None else args.time_budget
    args.max_compiles = 8 if args.max_compiles is None else args.max_compiles
    if args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    if not _has_devices(args.devices):
        return _reexec(args)
    if "jax" not in sys.modules:  # devices set up by the caller: not too late for the level
        os.environ.setdefault(*XLA_LOG_LEVEL)

    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.perf.plan import DEVICES, compile_plan

    if jax.device_count() != args.devices:
        raise UserError(f"plan expected {args.devices} simulated devices, jax sees "
                        f"{jax.device_count()}; is XLA_FLAGS overridden?")
    spec = DEVICES[args.device]
    memory_gb = args.device_memory_gb if args.device_memory_gb is not None else spec.memory_gb
    cfg = load_config(args.config, args.overrides)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (
        lambda s: print(s, flush=True))
    if not args.search:
        plan = compile_plan(cfg, spec=spec, memory_gb=memory_gb)
        analytic = analytic_bytes(cfg, plan["mesh"])
        plan["analytic_param_optimizer_bytes_per_device"] = analytic
        if not args.json:
            _print_plan(cfg, plan, analytic)
        print(json.dumps(plan))
        return 0

    fitting, too_big, skipped = search(cfg, args.devices, spec, memory_gb, args.time_budget,
                                       args.max_compiles, log)
    if not args.json:
        print(f"\n{len(fitting)} plan(s) fit in {memory_gb:g} GiB on {args.devices} x "
              f"{spec.name}, fastest first:")
        print(f"{'mesh d x f x seq x t':>44} {'remat':>5} {'micro':>5} {'GiB/dev':>8} "
              f"{'est s/step':>10} {'est MFU':>8}  collective GiB/device by mesh axis")
        for r in [*fitting, *too_big]:
            shape = _shape(r)
            tail = (f" {r['est_step_s']:10.3f} {r['est_mfu']:8.1%}" if r["fits"]
                    else "  does not fit       ")
            print(f"{_mesh_text(shape):>44} {r['remat']:>5} {r['microbatches']:>5} "
                  f"{r['total_gib_per_device']:8.1f}{tail}  "
                  f"{_axis_text(r['collective_bytes_per_device'])}")
        print(f"({len(skipped)} candidates not compiled: too large analytically or over budget)")
    print(json.dumps({"fitting": fitting, "not_fitting": too_big, "skipped": skipped}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile the train step ahead of time for N devices: memory, mesh search")
    p.add_argument("config", nargs="?", help="YAML config (path, or name under configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=64")
    p.add_argument("--devices", type=int, default=None, help="number of devices to plan for")
    p.add_argument("--device", default="h100",
                   help=f"accelerator whose peak, memory and links the estimate uses: "
                        f"{', '.join(sorted(DEVICE_KINDS))} (--budget also: cpu, this host) "
                        "(default: h100)")
    p.add_argument("--device-memory-gb", type=float, default=None,
                   help="memory per device in GiB (default: the --device's)")
    p.add_argument("--search", action="store_true",
                   help="try mesh shapes, pipeline stages and schedules, remat policies; rank "
                        "those that fit")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of compiling allowed for --search (default 480; with "
                        "--budget 240)")
    p.add_argument("--max-compiles", type=int, default=None,
                   help="most candidates --search compiles (default 8; with --budget 3)")
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    add_budget_arguments(p)
    p.set_defaults(func=cmd_plan)
