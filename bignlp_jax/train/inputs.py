"""Before a run builds anything: do the other runs it starts from exist?

A finetuning config names its pretraining run twice (`init_from`, and `data.tokenizer` for the
tokenizer that run was trained with). When that run has not been made yet, the useful fix is to
make it (its config, or the pipeline that makes both), not to train a tokenizer by hand.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bignlp_jax.config import Config
from bignlp_jax.config.loader import CONFIG_ROOT
from bignlp_jax.errors import UserError
from bignlp_jax.train.init_from import HF_PREFIX


def configs_writing(run_dir: Path) -> list[Path]:
    """Shipped run configs whose run.dir is `run_dir` (the ones that would create it)."""
    found = []
    for path in sorted(CONFIG_ROOT.rglob("*.yaml")):
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        run = tree.get("run") if isinstance(tree, dict) else None
        if isinstance(run, dict) and run.get("dir") and Path(run["dir"]) == run_dir:
            found.append(path)
    return found


def check_source_runs(cfg: Config) -> None:
    """UserError naming the missing run and how to make it, for `init_from` (and a
    `data.tokenizer` that points at the same run) when that path does not exist."""
    if not cfg.init_from or cfg.init_from.startswith(HF_PREFIX) or "://" in cfg.init_from:
        return  # Hugging Face dirs and object storage are checked where they are read
    source = Path(cfg.init_from).expanduser()
    if source.exists():
        return
    makers = configs_writing(source)
    make = (f"`bignlp-jax train {makers[0].relative_to(CONFIG_ROOT.parent)}`" if makers
            else f"the training run whose run.dir is {source}")
    raise UserError(
        f"init_from={cfg.init_from}: no such run (this run starts from its parameters"
        + (" and its tokenizer, data.tokenizer" if cfg.data.tokenizer
           and Path(cfg.data.tokenizer).expanduser() == source else "")
        + f")\n  fix: run the pretraining first: {make}; or the whole chain with "
        "`bignlp-jax pipeline configs/pipelines/default.yaml`; or point init_from at an "
        "existing run directory"
    )
