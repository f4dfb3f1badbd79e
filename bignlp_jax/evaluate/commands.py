"""`bignlp-jax eval CONFIG_OR_RUN_DIR [overrides] [--step S]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bignlp_jax import storage

# Function-level imports: a command loads its package only when run (a fast `--help`).


def resolve_run(target: str, overrides: list[str]):
    """(config, run dir) from a run directory (its recorded config) or a config file
    (run.dir)."""
    from bignlp_jax.config import load_config
    from bignlp_jax.rundir import CONFIG_FILE, RunDir, holds_run

    path = storage.path(target)
    if path.is_dir():
        recorded = RunDir(path).recorded_config(overrides)
        if recorded is not None:
            return recorded, path
        from bignlp_jax.checkpoint import load_run_config
        from bignlp_jax.config.loader import apply_overrides, validate

        cfg = load_run_config(path)
        return validate(apply_overrides(cfg.model_dump(mode="json"), overrides)), path
    if not path.exists() and path.suffix not in (".yaml", ".yml"):
        from bignlp_jax.config.loader import resolve_config_path
        from bignlp_jax.errors import UserError

        try:
            resolve_config_path(target)  # a config name such as `tiny` is fine
        except UserError:
            parent = path.parent if str(path.parent) not in ("", ".") else Path("runs")
            runs = sorted(str(d) for d in parent.glob("*") if holds_run(d))
            raise UserError(
                f"no run directory {target} (and no config of that name)\n  fix: pass a run "
                f"directory written by `bignlp-jax train` (it holds {CONFIG_FILE} and "
                "checkpoints/)" + (f", e.g. {', '.join(runs[:5])}" if runs else "")
                + ", or a config file whose run.dir to evaluate") from None
    cfg = load_config(target, overrides)
    return cfg, storage.path(cfg.run.dir)


def cmd_eval(args) -> int:
    from bignlp_jax.evaluate.run import evaluate_run
    from bignlp_jax.rundir import EVAL_FILE

    cfg, run_dir = resolve_run(args.target, args.overrides)
    results = evaluate_run(cfg, run_dir, args.step)
    shown = {k: v for k, v in results.items() if not isinstance(v, (dict, list))}
    for key, value in shown.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(f"wrote {run_dir / EVAL_FILE}")
    print(json.dumps(results))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on held-out data -> eval.json")
    p.add_argument("target", metavar="CONFIG_OR_RUN_DIR",
                   help="a run directory, or a config (its run.dir is evaluated)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. task.eval_examples=100")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(func=cmd_eval)
