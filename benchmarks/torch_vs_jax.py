"""Side-by-side CPU training throughput: our JAX train step vs Hugging Face LlamaForCausalLM in
eager PyTorch, same shapes, same batches, float32, AdamW with the same hyper-parameters and
global-norm clipping.

    .venv/bin/python benchmarks/torch_vs_jax.py [configs/bench/cpu_s.yaml ...] [--rounds 10]

Both frameworks run in this one process, one after the other, in interleaved rounds (a few
PyTorch steps, then a few JAX steps, repeated), so load from other programs on a shared machine
hits both alike. Figures are medians over all timed steps: 10 rounds of 4 steps each by default,
because on a 2-vCPU VM single rounds swing by +-15% and 5-round medians still moved the ratio
by 0.16 between back-to-back runs (cpu_s 1.22, then 1.06). The last lines are a Markdown block
for `benchmarks/RESULTS.md`.

`--separate` runs each framework in a process of its own instead (a fresh child per framework
and round, alternating which goes first; one process per framework is how users run them), and
prints the per-round ratios: in one process, our steps measured ~17% slower than alone
(RESULTS.md), so the shared process may itself tilt the comparison.

Like `bignlp-jax`, the script first re-executes itself with glibc's huge-page malloc tunable
(`bignlp_jax/perf/hugepages.py`); being one process, both frameworks run with it. Run it with
GLIBC_TUNABLES=glibc.malloc.hugetlb=0 to compare without.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bignlp_jax.perf.hugepages import reexec_with_huge_pages

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [str(REPO / "configs/bench/cpu_s.yaml"), str(REPO / "configs/bench/cpu_m.yaml")]


class TorchLlama:
    """HF LlamaForCausalLM + torch.optim.AdamW, one eager training step per `run` iteration."""

    def __init__(self, cfg, seed: int = 0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        m, o = cfg.model, cfg.optimizer
        torch.manual_seed(seed)
        hf = LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden, intermediate_size=m.mlp_dim,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            num_key_value_heads=m.kv_heads, head_dim=m.dim_per_head,
            max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
            attention_bias=m.use_bias, mlp_bias=m.use_bias, initializer_range=m.init_std,
        )
        self.model = LlamaForCausalLM(hf).float().train()  # default attention: SDPA
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.clip = o.clip_norm
        self.cfg = cfg
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds per step (both frameworks use 2 threads)
        self.faults: list[int] = []  # minor page faults per step
        self.loss = float("nan")

    def run(self, batches, record: bool = True) -> None:
        import torch
        import torch.nn.functional as F

        for batch in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tokens = torch.from_numpy(batch["tokens"]).long()
            targets = torch.from_numpy(batch["targets"]).long()
            self.opt.zero_grad(set_to_none=True)
            logits = self.model(input_ids=tokens).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.loss = float(loss.detach())
            if record:
                self.times.append(time.perf_counter() - t0)
                self.cpu.append(time.process_time() - c0)
                self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def host_batches(cfg, n: int, start: int):
    from bignlp_jax.data import SyntheticSource

    src = SyntheticSource(seed=cfg.run.seed, vocab_size=cfg.model.vocab_size,
                          seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch_size,
                          rows=(0, cfg.train.global_batch_size))
    src.set_state({"step": start})
    return [next(src) for _ in range(n)]


def compare(config: str, rounds: int, steps_per_round: int, warmup: int) -> dict:
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.perf.bench import StepTimer

    cfg = load_config(config, ["data.source=synthetic"])
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    print(f"\n== {cfg.model.name}: batch {cfg.train.global_batch_size} x {cfg.data.seq_len}",
          flush=True)
    ours = StepTimer(cfg, log=lambda s: print("jax:", s, flush=True))
    theirs = TorchLlama(cfg)
    ours.run(warmup, record=False)
    theirs.run(host_batches(cfg, warmup, 0), record=False)
    ours_cpu = []
    for r in range(rounds):
        theirs.run(host_batches(cfg, steps_per_round, warmup + r * steps_per_round))
        c0 = time.process_time()
        ours.run(steps_per_round)
        ours_cpu.append((time.process_time() - c0) / steps_per_round)
        print(f"round {r + 1}/{rounds}: torch {tokens / statistics.median(theirs.times[-steps_per_round:]):,.0f}"
              f" tok/s, jax {tokens / statistics.median(ours.times[-steps_per_round:]):,.0f} tok/s"
              f"  (load {os.getloadavg()[0]:.2f})", flush=True)
    report = ours.report()
    torch_tps = tokens / statistics.median(theirs.times)
    out = {
        "config": cfg.model.name,
        "jax_tokens_per_sec": report["tokens_per_sec"],
        "torch_tokens_per_sec": torch_tps,
        "ratio": report["tokens_per_sec"] / torch_tps,
        "jax_mfu": report["mfu"],
        "torch_mfu": report["mfu"] * torch_tps / report["tokens_per_sec"],
        "peak_tflops": report["peak_tflops_per_device"] * report["num_devices"],
        "jax_step_spread": report["step_time_spread"],
        "torch_step_spread": [min(theirs.times), max(theirs.times)],
        "jax_cpu_s_per_step": statistics.median(ours_cpu),
        "torch_cpu_s_per_step": statistics.median(theirs.cpu),
        "jax_page_faults_per_step": report["page_faults_per_step"],
        "torch_page_faults_per_step": statistics.median(theirs.faults),
        "jax_loss": report["final_loss"],
        "torch_loss": theirs.loss,
        "devices": jax.device_count(),
    }
    print(f"{out['config']}: jax {out['jax_tokens_per_sec']:,.0f} tok/s (MFU {out['jax_mfu']:.1%}),"
          f" torch {out['torch_tokens_per_sec']:,.0f} tok/s (MFU {out['torch_mfu']:.1%}),"
          f" ratio {out['ratio']:.2f}; CPU s/step jax {out['jax_cpu_s_per_step']:.2f}, torch "
          f"{out['torch_cpu_s_per_step']:.2f}", flush=True)
    return out


def one_framework(config: str, framework: str, steps: int, warmup: int) -> dict:
    """`steps` timed steps of one framework alone in this process (a `--separate` child)."""
    from bignlp_jax.config import load_config
    from bignlp_jax.perf.bench import StepTimer

    cfg = load_config(config, ["data.source=synthetic"])
    runner: StepTimer | TorchLlama
    if framework == "jax":
        runner = StepTimer(cfg, log=lambda s: None)
        runner.run(warmup, record=False)
        c0 = time.process_time()
        runner.run(steps)
        cpu = (time.process_time() - c0) / steps
    else:
        runner = TorchLlama(cfg)
        runner.run(host_batches(cfg, warmup, 0), record=False)
        runner.run(host_batches(cfg, steps, warmup))
        cpu = statistics.median(runner.cpu)
    return {"times": runner.times, "cpu_s_per_step": cpu,
            "tokens": cfg.train.global_batch_size * cfg.data.seq_len, "config": cfg.model.name}


def compare_separate(config: str, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """Each framework in a fresh child process per round, alternating which runs first."""
    got: dict[str, list[dict]] = {"torch": [], "jax": []}
    for r in range(rounds):
        for framework in (("torch", "jax") if r % 2 == 0 else ("jax", "torch")):
            cmd = [sys.executable, __file__, config, "--framework", framework,
                   "--steps-per-round", str(steps_per_round), "--warmup", str(warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            got[framework].append(json.loads(out.splitlines()[-1].removeprefix("CHILD ")))
        t, j = (statistics.median(got[f][-1]["times"]) for f in ("torch", "jax"))
        print(f"round {r + 1}/{rounds}: torch {got['jax'][-1]['tokens'] / t:,.0f} tok/s, jax "
              f"{got['jax'][-1]['tokens'] / j:,.0f} tok/s, ratio {t / j:.2f}  "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    tokens = got["jax"][0]["tokens"]
    med = {f: statistics.median([x for g in got[f] for x in g["times"]]) for f in got}
    per_round = [statistics.median(a["times"]) / statistics.median(b["times"])
                 for a, b in zip(got["torch"], got["jax"], strict=True)]
    return {"config": got["jax"][0]["config"], "jax_tokens_per_sec": tokens / med["jax"],
            "torch_tokens_per_sec": tokens / med["torch"], "ratio": med["torch"] / med["jax"],
            "per_round": per_round,
            "jax_cpu_s_per_step": statistics.median(g["cpu_s_per_step"] for g in got["jax"]),
            "torch_cpu_s_per_step": statistics.median(g["cpu_s_per_step"] for g in got["torch"])}


def versions() -> str:
    import jax
    import torch
    import transformers

    return f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def header(args, load_before) -> str:
    """The RESULTS.md heading: date, machine, commit, versions, load."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # the CPU model, where Linux names it
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    how = "separate processes" if args.separate else "one process"
    return (f"### {datetime.date.today().isoformat()}: {os.cpu_count()}-core CPU ({cpu}), "
            f"commit {commit}\n{versions()}; GLIBC_TUNABLES="
            f"{os.environ.get('GLIBC_TUNABLES', '')}; load average before/after: "
            f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; {how}, {args.rounds} rounds x "
            f"{args.steps_per_round} steps, medians\n")


def main() -> int:
    reexec_with_huge_pages()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--separate", action="store_true",
                        help="each framework in its own process, a fresh one per round")
    parser.add_argument("--framework", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.framework:  # a --separate child: one framework, one config, one JSON line
        result = one_framework(args.configs[0], args.framework, args.steps_per_round, args.warmup)
        print("CHILD " + json.dumps(result), flush=True)
        return 0
    load_before = os.getloadavg()
    if args.separate:
        separate = [compare_separate(c, args.rounds, args.steps_per_round, args.warmup)
                    for c in args.configs]
        print(f"\n--- paste into benchmarks/RESULTS.md ---\n{header(args, load_before)}")
        print("| config | ours (tok/s) | PyTorch (tok/s) | ratio | per-round ratios | "
              "CPU s/step ours / PyTorch |\n| --- | ---: | ---: | ---: | --- | ---: |")
        for r in separate:
            rounds = ", ".join(f"{x:.2f}" for x in r["per_round"])
            print(f"| {r['config']} | {r['jax_tokens_per_sec']:,.0f} | "
                  f"{r['torch_tokens_per_sec']:,.0f} | {r['ratio']:.2f} | {rounds} | "
                  f"{r['jax_cpu_s_per_step']:.2f} / {r['torch_cpu_s_per_step']:.2f} |")
        print("--- end ---")
        return 0
    results = [compare(c, args.rounds, args.steps_per_round, args.warmup) for c in args.configs]
    print(f"\n--- paste into benchmarks/RESULTS.md ---\n{header(args, load_before)}")
    print("| config | ours (tok/s) | PyTorch (tok/s) | ratio | our MFU | PyTorch MFU | "
          "CPU peak (GFLOP/s, probe) | CPU s/step ours / PyTorch | page faults/step ours / PyTorch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['config']} | {r['jax_tokens_per_sec']:,.0f} | {r['torch_tokens_per_sec']:,.0f} | "
              f"{r['ratio']:.2f} | {r['jax_mfu']:.1%} | {r['torch_mfu']:.1%} | "
              f"{r['peak_tflops'] * 1e3:.0f} | {r['jax_cpu_s_per_step']:.2f} / "
              f"{r['torch_cpu_s_per_step']:.2f} | {r['jax_page_faults_per_step']:,.0f} / "
              f"{r['torch_page_faults_per_step']:,.0f} |")
    print("--- end ---")
    return 0


if __name__ == "__main__":
    sys.exit(main())
