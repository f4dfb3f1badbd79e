"""Requests per second of `bignlp-jax lm-eval`'s backend vs the harness's own `hf` backend, on the
same CPU, model and tasks, and how many XLA programs our backend compiles per task.

    PYTHONPATH=. .venv/bin/python benchmarks/lm_eval_backends.py [--model gpt3_126m] [--limit 20]

A random-weight model of the preset (float32, no remat; the harness scores any weights the same
way), a 1024-piece tokenizer trained on the shipped task data, saved as a run and exported with
`bignlp-jax export --format hf`. Each shipped task (multiple choice = loglikelihood, rolling
perplexity = loglikelihood_rolling, completion = generate_until) runs through
`lm_eval.simple_evaluate` with our backend, then with `hf` on the export (batch size 8 both),
timed around the whole evaluate call (request building included, dataset building excluded:
done once first); ours twice, the first time with its compiles, then compiled. Compiles are XLA backend compiles counted through
jax.monitoring while our backend runs the task. The last lines are a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bignlp_jax.cli import main as cli_main  # noqa: E402
from bignlp_jax.config import load_config  # noqa: E402
from bignlp_jax.data.tokenizer import train_tokenizer  # noqa: E402
from bignlp_jax.evaluate.harness_run import HarnessSettings, load_model, task_manager  # noqa: E402
from bignlp_jax.evaluate.harness_tasks import SHIPPED_DIR  # noqa: E402
from bignlp_jax.export.bundle import save_params_bundle  # noqa: E402
from bignlp_jax.model import abstract_params  # noqa: E402

TASKS = ("bignlp_stdlib_package", "bignlp_stdlib_ppl", "bignlp_stdlib_complete")
COMPILES = {"n": 0}


def _count(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES["n"] += 1


def random_params(cfg, seed: int = 0):
    rng = np.random.default_rng(seed)

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "scale" in name else 0.0
        return (base + cfg.init_std * rng.standard_normal(spec.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract_params(cfg))


def build(root: Path, model: str, max_length: int):
    texts = []
    for name in sorted(os.listdir(SHIPPED_DIR)):
        if name.endswith(".jsonl"):
            with open(SHIPPED_DIR / name, encoding="utf-8") as f:
                texts += [" ".join(str(v) for v in json.loads(line).values()) for line in f]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=1024)
    cfg = load_config(f"models/{model}", [
        f"run.dir={root / 'run'}", f"data.seq_len={max_length}", "model.dtype=float32",
        "model.remat=none", "mesh.data=1"])
    save_params_bundle(random_params(cfg.model), cfg, root / "run", step=1, tokenizer=tok)
    assert cli_main(["export", "--run", str(root / "run"), "--format", "hf",
                     "--out", str(root / "hf")]) == 0
    return cfg


def requests_of(results, task: str) -> int:
    return sum(len(s["resps"]) for s in results["samples"][task])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt3_126m", help="preset under configs/models/")
    ap.add_argument("--limit", type=int, default=20, help="documents per task (default: 20)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per window (default: 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: 8)")
    args = ap.parse_args()
    jax.monitoring.register_event_duration_secs_listener(_count)
    root = Path(tempfile.mkdtemp(prefix="lm_eval_bench_"))
    cfg = build(root, args.model, args.max_length)
    manager = task_manager(())
    settings = HarnessSettings(tasks=TASKS, limit=args.limit, batch_size=args.batch_size,
                               bootstrap_iters=0)
    lm, _ = load_model(cfg, root / "run", None, settings, devices=jax.devices()[:1])
    hf = lm_eval.api.registry.get_model("hf").create_from_arg_obj(
        {"pretrained": str(root / "hf"), "dtype": "float32", "max_length": args.max_length,
         "device": "cpu", "batch_size": args.batch_size})
    common = dict(limit=args.limit, log_samples=True, task_manager=manager, bootstrap_iters=0)
    # the datasets are built once here, untimed (by hf: our compiles are counted and timed)
    lm_eval.simple_evaluate(model=hf, tasks=list(TASKS), limit=1, task_manager=manager,
                            bootstrap_iters=0)
    rows = []
    for task in TASKS:
        before = COMPILES["n"]
        started = time.perf_counter()
        ours = lm_eval.simple_evaluate(model=lm, tasks=[task], **common)
        ours_s = time.perf_counter() - started
        compiles = COMPILES["n"] - before
        started = time.perf_counter()  # again, every program compiled: the steady state
        lm_eval.simple_evaluate(model=lm, tasks=[task], **common)
        warm_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model=hf, tasks=[task], batch_size=args.batch_size,
                                         **common)
        theirs_s = time.perf_counter() - started
        n = requests_of(ours, task)
        assert n == requests_of(theirs, task)
        rows.append((task, n, ours_s, warm_s, theirs_s, compiles))
        print(json.dumps({"task": task, "requests": n, "ours_s": ours_s, "ours_warm_s": warm_s,
                          "hf_s": theirs_s, "our_compiles": compiles}), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\n{datetime.date.today()}, commit {commit}, {args.model} float32 random weights, "
          f"max_length {args.max_length}, batch {args.batch_size}, limit {args.limit}, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, jax {jax.__version__}, "
          f"python {sys.version.split()[0]}")
    print("| task | request type | requests | ours req/s (compiles included) | ours req/s "
          "(compiled) | hf req/s | ours / hf (compiled) | our compiles |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    kinds = dict(zip(TASKS, ("loglikelihood", "loglikelihood_rolling", "generate_until")))
    for task, n, ours_s, warm_s, theirs_s, compiles in rows:
        print(f"| {task} | {kinds[task]} | {n} | {n / ours_s:.2f} | {n / warm_s:.2f} | "
              f"{n / theirs_s:.2f} | {theirs_s / warm_s:.2f}x | {compiles} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
