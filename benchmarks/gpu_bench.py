"""Run `bignlp-jax bench` over a list of single-GPU variants and print one table.

Used by `benchmarks/gpu.sh`. Each variant runs in its own process (a fresh GPU memory pool, and a
crash or out-of-memory in one does not stop the rest) under a time limit; every result line is
appended to RESULTS_JSONL and the table is printed at the end.

    python benchmarks/gpu_bench.py OUT_DIR [--dry]   (--dry: tiny shapes on CPU, checks the flow)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, preset, overrides): bfloat16 with cuDNN flash attention throughout; what varies is the
# remat policy, the batch, and scan unrolling. benchmarks/RESULTS.md has the measured figures.
COMMON = ["model.dtype=bfloat16", "model.kernel_attention=cudnn", "data.source=synthetic",
          "data.seq_len=2048", "mesh.data=1"]
VARIANTS = [
    # scanned layers (the presets' default) with each remat policy
    ("126m remat=none b32", "configs/models/llama_126m.yaml",
     ["model.remat=none", "train.global_batch_size=32"]),
    ("1.3b remat=dots b16", "configs/models/llama_1.3b.yaml",
     ["model.remat=dots", "train.global_batch_size=16"]),
    ("1.3b remat=full b16", "configs/models/llama_1.3b.yaml",
     ["model.remat=full", "train.global_batch_size=16"]),
    # straight-line layers (model.scan_unroll=0): the fastest settings on an H200 (2026-11-28)
    ("126m remat=none b64 unrolled", "configs/models/llama_126m.yaml",
     ["model.remat=none", "train.global_batch_size=64", "model.scan_unroll=0"]),
    ("1.3b remat=none b16 unrolled", "configs/models/llama_1.3b.yaml",
     ["model.remat=none", "train.global_batch_size=16", "model.scan_unroll=0"]),
    ("1.3b remat=dots b16 unrolled", "configs/models/llama_1.3b.yaml",
     ["model.remat=dots", "train.global_batch_size=16", "model.scan_unroll=0"]),
]
DRY = ["model.dtype=float32", "model.kernel_attention=auto", "model.num_layers=2", "model.hidden=64",
       "model.num_heads=4", "model.head_dim=16", "model.mlp_dim=128", "model.vocab_size=256",
       "data.seq_len=64", "train.global_batch_size=4"]


def run_variant(label: str, preset: str, overrides: list[str], out: Path, dry: bool,
                steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bignlp_jax.cli", "bench", preset, *COMMON, *overrides,
           f"run.dir={out / 'runs'}", "--steps", str(steps), "--warmup", "3"]
    if dry:
        cmd += DRY
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f}s", -1
    log = out / f"{label.replace(' ', '_').replace('=', '-')}.log"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    result = {"label": label, "returncode": code, "wall_s": time.perf_counter() - start}
    last = [line for line in str(text).splitlines() if line.startswith("{")]
    if code == 0 and last:
        result.update(json.loads(last[-1]))
    else:
        result["error"] = str(text).strip().splitlines()[-1][:200] if str(text).strip() else "?"
    return result


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bignlp_gpu_bench")
    dry = "--dry" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    steps = int(os.environ.get("BENCH_STEPS", 10))
    timeout = float(os.environ.get("BENCH_TIMEOUT", 150))
    only = os.environ.get("BENCH_ONLY")  # comma-separated indices, to rerun a subset
    variants = [v for i, v in enumerate(VARIANTS) if not only or str(i) in only.split(",")]
    results = []
    for label, preset, overrides in variants:
        r = run_variant(label, preset, overrides, out, dry, steps, timeout)
        results.append(r)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        status = (f"{r['tokens_per_sec']:,.0f} tok/s, MFU {r['mfu']:.1%}" if "mfu" in r
                  else f"FAILED: {r['error']}")
        print(f"[{r['wall_s']:5.0f}s] {label}: {status}", flush=True)
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    head = ("| variant | device | tokens/s | step ms (min-max) | TFLOP/s/dev | MFU | "
            "peak GiB | compile s |")
    print("\n" + head)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if "mfu" not in r:
            print(f"| {r['label']} | | failed: {r['error'][:80]} | | | | | |")
            continue
        lo, hi = r["step_time_spread"]
        print(f"| {r['label']} | {r['device_kind']} | {r['tokens_per_sec']:,.0f} | "
              f"{r['step_time_s'] * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) | "
              f"{r['tflops_per_device']:.1f} | {r['mfu']:.1%} | "
              f"{r['peak_memory_bytes_per_device'] / 2**30:.1f} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
