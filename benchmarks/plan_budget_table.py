"""The `plan --budget` table of benchmarks/RESULTS.md: budgets 1e18..1e25 FLOPs on H100s.

Runs `bignlp-jax plan --budget --flops C --json` once per budget in its own process (the
devices are the fewest that finish in 30 days at the default MFU), times it, and prints one
markdown row per budget. Usage: python benchmarks/plan_budget_table.py [C ...] > table.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

BUDGETS = [1e18, 1e19, 1e20, 1e21, 1e22, 1e23, 1e24, 1e25]


def row(flops: float) -> str:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "bignlp_jax.cli", "plan", "--budget", "--flops",
                          f"{flops:g}", "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode:
        return f"| {flops:.0e} | failed: {out.stderr.strip().splitlines()[-1]} |"
    r = json.loads(out.stdout.strip().splitlines()[-1])
    law, m, b, t, mesh = r["law"], r["model"], r["batch"], r["train"], r["mesh"]
    best = mesh["best"]
    axes = mesh["config_mesh"]
    mesh_text = "x".join(str(axes.get(k, 1)) for k in ("data", "fsdp", "sequence", "tensor"))
    mesh_text += (f" {best['remat']}/{best['microbatches']}mb {best['total_gib_per_device']:.0f}"
                  f" GiB{'' if mesh['fits'] else ' (no fit)'}" if best else " (none compiled)")
    return (f"| {flops:.0e} | {law['params'] / 1e9:.3g}B | {law['tokens'] / 1e9:.4g}B | "
            f"{law['tokens_per_param']:.1f} | {law['loss']:.3f} | {m['layers']}x{m['hidden']} "
            f"({m['params'] / 1e9:.3g}B) | {b['rows']}x{r['inputs']['seq_len']} | {t['lr']:.3g} | "
            f"{t['steps']:,} | {r['inputs']['devices']} | {mesh_text} | "
            f"{r['time']['days_at_mfu']:.3g} | {wall:.0f} |")


def main() -> None:
    budgets = [float(x) for x in sys.argv[1:]] or BUDGETS
    print("| C (FLOPs) | N | D | tokens/param | predicted loss | layers x hidden (params) | "
          "batch (rows x seq) | peak lr | steps | H100s | mesh d x f x seq x t, remat/"
          "microbatches, GiB/device | days at MFU 0.4 | plan --budget wall s |")
    print("|" + "---|" * 13)
    for flops in budgets:
        print(row(flops), flush=True)


if __name__ == "__main__":
    main()
