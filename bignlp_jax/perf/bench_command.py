"""CLI: `bignlp-jax bench CONFIG` (perf/bench.py). Apart from bench.py, which imports jax, so
that `bench --help` and argument errors stay fast."""

from __future__ import annotations

import json

# Function-level imports: a command loads its package only when run (a fast `--help`).


def cmd_bench(args) -> int:
    from bignlp_jax.config import load_config
    from bignlp_jax.perf.bench import run_bench

    overrides = list(args.overrides)
    if args.data == "synthetic":
        overrides.append("data.source=synthetic")
    cfg = load_config(args.config, overrides)
    result = run_bench(cfg, args.steps, args.warmup, args.peak_tflops)
    print(f"{result['config']}: {result['tokens_per_sec']:,.0f} tokens/s, step "
          f"{result['step_time_s'] * 1e3:.1f} ms (min {result['step_time_spread'][0] * 1e3:.1f}, "
          f"max {result['step_time_spread'][1] * 1e3:.1f}), {result['tflops_per_device']:.3f} "
          f"TFLOP/s/device, MFU {result['mfu']:.1%} of {result['peak_tflops_per_device']:.3f} "
          f"({result['peak_source']})")
    print(json.dumps(result))
    return 0


def register(subparsers) -> None:
    from bignlp_jax.config.loader import add_config_arguments

    p = subparsers.add_parser("bench", help="time the train step: tokens/s, MFU, memory")
    add_config_arguments(p, "model.remat=full")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps after compiling (default 3)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: train.peak_tflops, else "
                        "the table, or a CPU probe)")
    p.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                   help="synthetic batches (default) or the config's own data source")
    p.set_defaults(func=cmd_bench)
