"""Run lm-evaluation-harness tasks on a run's checkpoint: load, evaluate, write the results.

`load_model` builds the run's model on its mesh (LoRA adapters folded in) and wraps it as a
harness `LM`; `run_harness` hands that to `lm_eval.simple_evaluate` and returns the harness's
own results dict plus where the numbers came from (`run_dir`, `step`, `commit`). Every process
of a multi-process job runs the harness (see harness.py); only process 0 writes files.
"""

from __future__ import annotations

import difflib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager

from bignlp_jax.checkpoint import load_params, resolve_step_dir
from bignlp_jax.config import Config
from bignlp_jax.data.tokenizer import Tokenizer, load_tokenizer
from bignlp_jax.errors import UserError
from bignlp_jax.evaluate.harness import BignlpLM
from bignlp_jax.evaluate.harness_runner import HarnessRunner
from bignlp_jax.evaluate.harness_tasks import SHIPPED_DIR, prepare_include_dirs
from bignlp_jax.model import param_shardings
from bignlp_jax.parallel.mesh import build_mesh
from bignlp_jax.parallel.rules import rules_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HarnessSettings:
    """What `bignlp-jax lm-eval` (and the pipeline's lm_eval stage) asks the harness for."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 16
    max_length: int | None = None  # None: data.seq_len (the training window)
    add_bos_token: bool | None = None  # None: as the exported tokenizer (adds <s>)
    include_paths: tuple[str, ...] = ()
    log_samples: bool = False
    bootstrap_iters: int = 100_000
    seed: int = 0


def run_tokenizer(run_dir: Path, cfg: Config) -> Tokenizer:
    """The run's own tokenizer (RUN_DIR/tokenizer), else the one its config names."""
    try:
        return load_tokenizer(run_dir)
    except UserError:
        if not cfg.data.tokenizer:
            raise UserError(f"lm-eval: run {run_dir} has no tokenizer/ directory and its config "
                            "names none (data.tokenizer); the harness needs the run's tokenizer"
                            ) from None
        return load_tokenizer(cfg.data.tokenizer)


def load_model(cfg: Config, run_dir: Path, step: int | None, settings: HarnessSettings,
               devices=None) -> tuple[BignlpLM, int | None]:
    """(the harness model of a checkpoint of `run_dir` on cfg.mesh, its step)."""
    step_dir = resolve_step_dir(run_dir, step)
    tokenizer = run_tokenizer(run_dir, cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"lm-eval: the tokenizer has {tokenizer.vocab_size} pieces but the model "
                        f"only {cfg.model.vocab_size} (model.vocab_size)")
    mesh = build_mesh(cfg.mesh, devices)
    rules = rules_for(cfg)
    shardings = param_shardings(cfg.model, mesh, rules)
    params = load_params(step_dir, cfg.model, shardings, lora=cfg.lora)
    max_length = settings.max_length or min(cfg.data.seq_len, cfg.model.max_seq_len)
    runner = HarnessRunner(cfg.model, params, mesh, rules, shardings, settings.batch_size,
                           max_length)
    lm = BignlpLM(runner, tokenizer, add_bos_token=settings.add_bos_token, seed=settings.seed,
                  name=run_dir.name)
    return lm, int(step_dir.name) if step_dir.name.isdigit() else None


@functools.lru_cache(maxsize=4)
def task_manager(include_paths: tuple[str, ...]):
    """The harness's task index (its own tasks, ours, `include_paths`): built once per process,
    as indexing the harness's thousands of task files takes seconds."""
    return TaskManager(include_path=str(prepare_include_dirs([SHIPPED_DIR, *include_paths])))


def check_tasks(manager, tasks: tuple[str, ...]) -> None:
    """UserError naming every task the harness does not know (with close matches)."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(f"lm-eval: unknown task {'; '.join(hints)}\n  fix: name tasks the "
                        "harness lists (`lm-eval ls tasks`), a shipped one (bignlp_stdlib_package, "
                        "bignlp_stdlib_ppl, bignlp_stdlib_complete), or add --include-path DIR")


def _is_download_error(error: BaseException) -> bool:
    """Did loading a task's dataset fail for want of a network or a cached copy?"""
    names = {type(e).__name__ for e in _chain(error)}
    markers = ("OfflineModeIsEnabled", "ConnectionError", "LocalEntryNotFoundError",
               "DatasetNotFoundError", "HFValidationError", "MaxRetryError", "ConnectError")
    text = " ".join(str(e) for e in _chain(error))
    return bool(names & set(markers)) or "offline" in text.lower() or \
        "couldn't reach" in text.lower()


def _chain(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def run_harness(lm: BignlpLM, settings: HarnessSettings) -> dict[str, Any]:
    """The harness's results dict for `settings.tasks` evaluated with `lm`."""
    manager = task_manager(settings.include_paths)
    check_tasks(manager, settings.tasks)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
            limit=settings.limit, log_samples=settings.log_samples, task_manager=manager,
            batch_size=settings.batch_size, bootstrap_iters=settings.bootstrap_iters,
            random_seed=settings.seed, numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)
    except Exception as e:
        if not _is_download_error(e):
            raise
        raise UserError(
            f"lm-eval: a task's dataset is neither local nor cached and cannot be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})\n  fix: download "
            "it once on a machine with network (the same `bignlp-jax lm-eval` command, or "
            "`python -c \"import datasets; datasets.load_dataset(PATH, NAME)\"`), point "
            "HF_DATASETS_CACHE / HF_HOME at that cache and set HF_DATASETS_OFFLINE=1, or use a "
            "task whose YAML reads local files (dataset_path: json)") from None
    if results is None:  # only on ranks the harness thinks are not 0; we are always rank 0
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return dict(results)
