"""`bignlp-jax lm-eval RUN_DIR --tasks T1,T2 [options] [key=value ...]`: standard benchmarks.

Runs EleutherAI's lm-evaluation-harness in this process on a checkpoint of RUN_DIR, sharded over
the run's mesh (`mesh.*` overrides change it), and writes the harness's results JSON plus the
run dir, step and commit (default RUN_DIR/lm_eval.json). lm-eval is an optional extra:
`pip install -e '.[eval]'`.
"""

from __future__ import annotations

import argparse
import importlib.util

from bignlp_jax.errors import UserError
from bignlp_jax.rundir import LM_EVAL_FILE

INSTALL_HINT = ("lm-eval is not installed; install the eval extra: pip install -e '.[eval]' "
                "(or pip install 'lm-eval>=0.4.8,<0.5')")

# Function-level imports: a command loads its package only when run (a fast `--help`).


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(INSTALL_HINT)


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise UserError("lm-eval: --tasks names no task\n  fix: e.g. --tasks "
                        "bignlp_stdlib_package,bignlp_stdlib_ppl")
    return tasks


def cmd_lm_eval(args) -> int:
    require_lm_eval()
    import jax

    from bignlp_jax.evaluate.commands import resolve_run
    from bignlp_jax.evaluate.harness_results import results_json, score_table, write_results
    from bignlp_jax.evaluate.harness_run import HarnessSettings, load_model, run_harness

    if args.batch_size < 1:
        raise UserError(f"lm-eval: --batch-size must be >= 1, got {args.batch_size}")
    settings = HarnessSettings(
        tasks=parse_tasks(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
        batch_size=args.batch_size, max_length=args.max_length,
        include_paths=tuple(args.include_path or ()), log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters, seed=args.seed,
        add_bos_token=None if args.add_bos_token is None else args.add_bos_token == "true")
    cfg, run_dir = resolve_run(args.run_dir, args.overrides)
    lm, step = load_model(cfg, run_dir, args.step, settings)
    results = run_harness(lm, settings)
    path = write_results(results_json(results, run_dir, step), args.output or
                         run_dir / LM_EVAL_FILE)
    if jax.process_index() == 0:
        for task, metric, value, stderr in score_table(results):
            spread = f" ± {stderr:.4f}" if stderr is not None else ""
            print(f"{task:32s} {metric:18s} {value:.4f}{spread}")
        print(f"scoring shapes compiled (rows, tokens): {sorted(lm.runner.shapes_scored)}")
        print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a run's checkpoint "
                                       "-> lm_eval.json",
                       description=__doc__.splitlines()[0],
                       epilog="example: bignlp-jax lm-eval runs/tiny --tasks "
                              "bignlp_stdlib_package,bignlp_stdlib_ppl --limit 50")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (its config.yaml and "
                                                      "checkpoints/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides of the run's config, e.g. mesh.tensor=2 (default: none)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated harness task (or group) names, e.g. "
                        "bignlp_stdlib_package,hellaswag")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many documents per task (a fraction if < 1; default: all)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per scoring/generation batch, rounded up to the data-parallel "
                        "device count (default: 16)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens the model sees at once (default: data.seq_len, its training "
                        "window)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="directory of extra task YAMLs; data_files may be relative to the YAML "
                        "(repeatable)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help=f"results JSON (default: RUN_DIR/{LM_EVAL_FILE})")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and response in the results JSON (`samples`)")
    p.add_argument("--add-bos-token", choices=("true", "false"), default=None,
                   help="put <s> before every text (default: true, as the run's exported "
                        "Hugging Face tokenizer does)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="bootstrap resamples for the stderr of non-mean metrics; 0 skips them "
                        "(default: 100000, as the harness)")
    p.add_argument("--seed", type=int, default=0,
                   help="few-shot sampling and generation sampling seed (default: 0)")
    p.set_defaults(func=cmd_lm_eval)
