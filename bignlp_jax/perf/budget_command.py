"""`bignlp-jax plan --budget`: the options, the re-exec onto simulated devices, the report.

`plan --budget (--flops C | --device KIND --devices N --days D) [--mfu M | --mfu-from FILE]
[--family llama|gpt3] [--law epoch|hoffmann] [--seq-len T] [--vocab V] [--out FILE.yaml]`.
Like `plan`, the mesh search needs as many devices as it compiles for, so the command re-runs
itself in a process with that many simulated CPU devices; the maths is in scaling_law.py,
budget_shape.py and budget.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bignlp_jax.errors import UserError
from bignlp_jax.perf.budget_inputs import CPU, DEFAULT_MFU, resolve, simulated_devices
from bignlp_jax.perf.scaling_law import LAWS

# Function-level imports: jax may be imported only after the re-exec gives the process its
# devices (budget.py imports it).

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # as plan_command.py
# --time-budget / --max-compiles when not given: the largest budgets must plan in minutes
SEARCH_SECONDS, SEARCH_COMPILES = 240.0, 3


def add_arguments(p) -> None:
    """The `--budget` options of `bignlp-jax plan` (its --devices, --device,
    --device-memory-gb, --time-budget, --max-compiles and --json are shared)."""
    g = p.add_argument_group("compute budget (--budget)")
    g.add_argument("--budget", action="store_true",
                   help="choose the compute-optimal model, tokens, batch, learning rate and mesh "
                        "for a budget (--flops, or --device/--devices/--days) instead of "
                        "planning CONFIG")
    g.add_argument("--flops", type=float, default=None, help="the training FLOPs budget C")
    g.add_argument("--days", type=float, default=None,
                   help="days on --devices (the budget: devices x peak x MFU x days); with "
                        "--flops and no --devices, the days to finish in (default 30)")
    g.add_argument("--mfu", type=float, default=None,
                   help=f"model FLOPs utilisation to assume (default {DEFAULT_MFU:g})")
    g.add_argument("--mfu-from", default=None, metavar="FILE",
                   help="take the MFU from a `bignlp-jax bench` output (its JSON line)")
    g.add_argument("--family", choices=("llama", "gpt3"), default="llama",
                   help="architecture and proportions (default llama: Llama 3's)")
    g.add_argument("--law", choices=sorted(LAWS), default="epoch",
                   help="scaling law fit (default epoch: Besiroglu et al. 2024)")
    g.add_argument("--seq-len", type=int, default=4096, help="tokens per row (default 4096)")
    g.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default: the family's, 128256 llama / 50304 gpt3)")
    g.add_argument("--out", default=None, metavar="FILE.yaml",
                   help="write the planned config (describe, plan and train take it as is)")


def _child_argv(args, devices: int) -> list[str]:
    argv = [sys.executable, "-m", "bignlp_jax.cli", "plan", "--budget", "--devices",
            str(devices), "--device", args.device, "--family", args.family, "--law", args.law,
            "--seq-len", str(args.seq_len)]
    for flag, value in (("--flops", args.flops), ("--days", args.days), ("--mfu", args.mfu),
                        ("--mfu-from", args.mfu_from), ("--vocab", args.vocab),
                        ("--out", args.out), ("--device-memory-gb", args.device_memory_gb),
                        ("--time-budget", args.time_budget),
                        ("--max-compiles", args.max_compiles)):
        if value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv + (["--json"] if args.json else [])


def _has_devices(n: int) -> bool:
    return (os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
            and f"{DEVICE_COUNT_FLAG}={n}" in os.environ.get("XLA_FLAGS", "").split())


def cmd_budget(args) -> int:
    if args.config is not None or args.overrides:
        raise UserError("--budget plans a new model: give no CONFIG or overrides "
                        f"(got {' '.join([args.config or '', *args.overrides]).strip()})")
    if args.device != CPU or args.devices is not None:
        inp = resolve(args)  # jax-free for accelerators: checks the input, picks the devices
        devices = inp.devices
    else:
        devices = 1
    n_sim = simulated_devices(devices)
    if not _has_devices(n_sim):
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={n_sim}"])
        env["JAX_PLATFORMS"] = "cpu"
        return subprocess.run(_child_argv(args, devices), env=env).returncode

    from bignlp_jax.perf.budget import plan_budget, write_config

    args.devices = devices
    inp = resolve(args)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (
        lambda s: print(s, flush=True))
    result = plan_budget(
        inp, SEARCH_SECONDS if args.time_budget is None else args.time_budget,
        SEARCH_COMPILES if args.max_compiles is None else args.max_compiles, log)
    if args.out:
        write_config(result, args.out)
        result["out"] = args.out
    if not args.json:
        print_report(result)
    print(json.dumps(result))
    return 0


def print_report(r: dict) -> None:
    i, law, m, b, t, mesh, time = (r[k] for k in ("inputs", "law", "model", "batch", "train",
                                                  "mesh", "time"))
    print(f"\nbudget           {i['flops']:.4g} FLOPs = {i['how']}")
    print(f"                 MFU {i['mfu']:g} ({i['mfu_source']})")
    print(f"law ({i['law']})    L(N,D) = {law['E']} + {law['A']}/N^{law['a']} + "
          f"{law['B']}/D^{law['b']}, C = 6ND")
    print(f"                 {law['source']}")
    print(f"compute-optimal  N = {law['params']:.4g} parameters, D = {law['tokens']:.4g} tokens "
          f"({law['tokens_per_param']:.1f} tokens/parameter), predicted loss {law['loss']:.3f}")
    print(f"model ({i['family']})   {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads"
          f" of {m['head_dim']}, {m['kv_heads']} KV heads, FFN {m['mlp_dim']}, vocabulary "
          f"{m['vocab']}: {m['params']:,} parameters ({m['error']:+.1%} of N)")
    if m["embedding_share"] > 0.5:
        print(f"                 embeddings are {m['embedding_share']:.0%} of the parameters: a "
              "smaller --vocab leaves more for the layers")
    if m["closest_preset"]:
        print(f"                 closest preset: {m['closest_preset']} "
              f"({m['closest_preset_params'] / 1e9:.3g}B parameters)")
    print(f"batch            {b['rows']} x {i['seq_len']} = {b['tokens']:,} tokens ({b['note']})")
    print(f"                 {b['source']}")
    print(f"schedule         {t['steps']:,} steps ({t['tokens']:.4g} tokens), peak lr {t['lr']:.4g}"
          f", warmup {t['warmup_steps']}, x{t['gamma']} at steps {t['boundaries'][0]:,} and "
          f"{t['boundaries'][1]:,} (80%, 90%)")
    best = mesh["best"]
    if best is None and mesh["none_fits"]:
        print(f"mesh             nothing compiled: every candidate needs more than "
              f"{i['device_memory_gb']:g} GiB by the analytic estimate")
    elif best is None:
        print("mesh             not searched: no candidate compiled within --max-compiles / "
              "--time-budget; the config keeps mesh.data=-1")
    else:
        axes = mesh["config_mesh"]
        text = " x ".join(f"{k} {axes[k]}" for k in ("data", "fsdp", "sequence", "tensor"))
        if "dcn_data" in axes:
            text += f" (over DCN: data {axes['dcn_data']}, fsdp {axes['dcn_fsdp']} hosts)"
        print(f"mesh             {text}, remat {best['remat']}, {best['microbatches']} "
              f"microbatches: {best['total_gib_per_device']:.1f} GiB/device of "
              f"{i['device_memory_gb']:.3g} ({mesh['n_fitting']} of {mesh['n_compiled']} "
              f"compiled plans fit)")
    if mesh["none_fits"]:
        print(f"                 NO PLAN FITS on {i['devices']} x {i['device']}: parameters, "
              f"gradients and AdamW state alone fit for at most "
              f"~{mesh['largest_fitting_params'] / 1e9:.3g}B parameters fully sharded; use more "
              "devices or more memory per device")
    print(f"time             {time['days_at_mfu']:.3g} days at MFU {i['mfu']:g} "
          f"({time['step_s_at_mfu']:.3g} s/step) against a budget of {i['days']:.3g} days")
    if time["days_plan_estimate"] is not None:
        print(f"                 the compiled plan's own estimate: {time['days_plan_estimate']:.3g}"
              f" days (est. MFU {time['plan_est_mfu']:.0%}, no compute/communication overlap)")
    if "out" in r:
        print(f"config           {r['out']} (bignlp-jax train {r['out']})")
