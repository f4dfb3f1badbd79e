"""Huge-page malloc on and off: tokens/s and page faults per step of `bignlp-jax bench`.

    .venv/bin/python benchmarks/hugepages_ab.py [configs/bench/cpu_s.yaml ...] [--pairs 3]

glibc reads its tunables at process start, so the two settings cannot share a process: each pair
runs `bench` twice, once with GLIBC_TUNABLES=glibc.malloc.hugetlb=0 (the opt-out) and once with
=1 (what `bignlp-jax` sets on the CPU backend), in alternating order, so drift on a shared
machine hits both alike. The gain is the median over pairs of the within-pair ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [str(REPO / "configs/bench/cpu_s.yaml"), str(REPO / "configs/bench/cpu_m.yaml")]


def bench(config: str, hugetlb: int, steps: int) -> dict:
    env = dict(os.environ, GLIBC_TUNABLES=f"glibc.malloc.hugetlb={hugetlb}")
    out = subprocess.run([sys.executable, "-m", "bignlp_jax.cli", "bench", config,
                          f"--steps={steps}", "--warmup=2", "--peak-tflops=1"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print("| config | tok/s off | tok/s on | gain (median of pair ratios) | faults/step off | "
          "faults/step on |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for config in args.configs:
        runs: dict[int, list[dict]] = {0: [], 1: []}
        for p in range(args.pairs):
            for hugetlb in ((0, 1) if p % 2 == 0 else (1, 0)):
                runs[hugetlb].append(bench(config, hugetlb, args.steps))
                r = runs[hugetlb][-1]
                print(f"  {r['config']} hugetlb={hugetlb}: {r['tokens_per_sec']:,.0f} tok/s, "
                      f"{r['page_faults_per_step']:,.0f} faults/step", file=sys.stderr, flush=True)
        ratios = [on["tokens_per_sec"] / off["tokens_per_sec"] for off, on in zip(*runs.values())]

        def med(h, key, runs=runs):
            return statistics.median(r[key] for r in runs[h])

        print(f"| {runs[0][0]['config']} | {med(0, 'tokens_per_sec'):,.0f} | "
              f"{med(1, 'tokens_per_sec'):,.0f} | {statistics.median(ratios) - 1:+.1%} "
              f"({sum(x > 1 for x in ratios)}/{len(ratios)} pairs on ahead) | "
              f"{med(0, 'page_faults_per_step'):,.0f} | {med(1, 'page_faults_per_step'):,.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
