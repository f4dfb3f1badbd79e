"""Kernel ablation: does each optimised kernel pay for itself? Training throughput of the model
as `model.kernels=auto` builds it, against the same model with one op switched at a time (an
op `auto` runs optimised to its reference, or an op `auto` runs on the reference to an optimised
kernel), and with every op on the reference, on this machine's backend.

    .venv/bin/python benchmarks/kernel_ablation.py [configs/bench/cpu_s.yaml ...] [--rounds 10]

All variants are compiled in this one process and run in interleaved rounds (each round runs
every variant for a few steps, in a rotated order), so drift and load from other programs hit
them alike. A kernel's gain is the median over rounds of (tok/s with it) / (tok/s without) - 1,
each ratio taken within one round; the medians of all timed steps are reported too. The last
lines are a Markdown table for `benchmarks/RESULTS.md`. Like `bignlp-jax`, the script first
re-executes itself with huge-page malloc on the CPU backend (`bignlp_jax/perf/hugepages.py`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bignlp_jax.perf.hugepages import reexec_with_huge_pages

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [str(REPO / "configs/bench/cpu_s.yaml"), str(REPO / "configs/bench/cpu_m.yaml")]


def variants(model_cfg, platform: str) -> dict[str, tuple[list[str], str, bool]]:
    """Name -> (overrides, kernel measured, whether the variant runs it). Besides `auto`: each op
    that `auto` runs optimised, switched to its reference; each optimised kernel that `auto`
    does not run (cudnn on GPU only), switched on; and every op on its reference."""
    from bignlp_jax.model import REFERENCE, select_kernels
    from bignlp_jax.model.kernels import OPS

    auto = select_kernels(model_cfg, platform)
    out = {"auto": ([], "", False)}
    for op, names in OPS.items():
        ref = getattr(REFERENCE, op)
        if getattr(auto, op) != ref:
            out[f"{op}={ref}"] = ([f"model.kernel_{op}={ref}"], f"{op}={getattr(auto, op)}", False)
            continue
        for name in names:
            gpu_16bit = platform == "gpu" and model_cfg.dtype != "float32"
            if name != ref and (name != "cudnn" or gpu_16bit):
                out[f"{op}={name}"] = ([f"model.kernel_{op}={name}"], f"{op}={name}", True)
    if auto != REFERENCE:
        out["all reference"] = (["model.kernels=reference"], "all auto kernels", False)
    return out


def ablate(config: str, rounds: int, steps_per_round: int, warmup: int) -> dict:
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.model import model_kernels
    from bignlp_jax.perf.bench import StepTimer

    base = load_config(config, ["data.source=synthetic"])
    platform = jax.devices()[0].platform
    timers, measured = {}, variants(base.model, platform)
    for name, (overrides, _, _) in measured.items():
        cfg = load_config(config, ["data.source=synthetic", *overrides])
        print(f"== {cfg.model.name} {name}: {model_kernels(cfg.model)}", flush=True)
        timers[name] = StepTimer(cfg, log=lambda s: print("  ", s, flush=True))
        timers[name].run(warmup, record=False)
    tokens = base.train.global_batch_size * base.data.seq_len
    names = list(timers)
    per_round: dict[str, list[float]] = {n: [] for n in names}  # tok/s, median of the round
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for n in order:
            timers[n].run(steps_per_round)
            per_round[n].append(tokens / statistics.median(timers[n].times[-steps_per_round:]))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {per_round[n][-1]:,.0f}" for n in names) + f" (load {os.getloadavg()[0]:.2f})",
            flush=True)
    rows = []
    for n in names:
        _, kernel, variant_runs_it = measured[n]
        # within each round: tok/s with the kernel over tok/s without it
        ratios = [(b / a if variant_runs_it else a / b)
                  for a, b in zip(per_round["auto"], per_round[n])]
        rows.append({
            "variant": n, "kernel": kernel,
            "tokens_per_sec": tokens / statistics.median(timers[n].times),
            "gain_of_kernel": statistics.median(ratios) - 1.0,
            "rounds_kernel_ahead": sum(x > 1.0 for x in ratios),
            "page_faults_per_step": statistics.median(timers[n].faults),
        })
    return {"config": base.model.name, "platform": platform, "rows": rows}


def main() -> int:
    reexec_with_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = [ablate(c, args.rounds, args.steps_per_round, args.warmup) for c in args.configs]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    print("\n--- paste into benchmarks/RESULTS.md ---")
    print(f"### {datetime.date.today().isoformat()}: kernel ablation, commit {commit}, "
          f"{os.cpu_count()} cores; load average before/after {load_before[0]:.2f} / "
          f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.steps_per_round} steps; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}\n")
    print("| config | variant | tok/s (median step) | kernel measured | its gain (median of "
          "round ratios) | rounds it is ahead | page faults/step |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for res in results:
        for row in res["rows"]:
            gain = "" if row["variant"] == "auto" else f"{row['gain_of_kernel']:+.1%}"
            ahead = ("" if row["variant"] == "auto"
                     else f"{row['rounds_kernel_ahead']}/{args.rounds}")
            print(f"| {res['config']} ({res['platform']}) | {row['variant']} | "
                  f"{row['tokens_per_sec']:,.0f} | {row['kernel']} | {gain} | {ahead} | "
                  f"{row['page_faults_per_step']:,.0f} |")
    print("--- end ---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
