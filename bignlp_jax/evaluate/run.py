"""Evaluate a run's checkpoint on held-out data: `bignlp-jax eval CONFIG_OR_RUN_DIR`.

Language modelling: loss and perplexity over `train.eval_batches` held-out batches. Tasks: loss
and perplexity of the gold targets over the whole held-out split (or `task.eval_examples`),
plus accuracy, macro-F1 and the majority-class baseline (the most frequent TRAINING label) for
classification, or exact match and BLEU of greedy answers for text-to-text. Runs on the
training mesh with the training shardings. Results go to RUN_DIR/eval.json and, prefixed with
`eval_`, to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from bignlp_jax import storage
from bignlp_jax.checkpoint import load_params, resolve_step_dir
from bignlp_jax.config import Config, LoraConfig
from bignlp_jax.data.tasks.formats import TaskFormat
from bignlp_jax.data.tasks.source import make_task_source, open_task_split, task_format
from bignlp_jax.evaluate import metrics
from bignlp_jax.evaluate.scoring import (
    generate_targets,
    label_log_likelihoods,
    make_score_fn,
    target_nll,
)
from bignlp_jax.rundir import EVAL_FILE, RunDir
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.metrics import MetricsLogger

# Examples written into eval.json so a person can see what the model answered.
SHOWN_EXAMPLES = 5


def _first(records, n: int | None) -> list:
    count = len(records) if n is None else min(n, len(records))
    return [records[i] for i in range(count)]


def train_labels(cfg: Config, fmt: TaskFormat) -> list[int]:
    """Label index of every training record (for the majority baseline)."""
    records, _ = open_task_split(cfg, "train")
    return [fmt.label_index(records[i], i) for i in range(len(records))]


def classification_results(cfg, trainer, params, fmt, records, score) -> dict:
    local = trainer.rows
    B = cfg.train.global_batch_size
    scores = label_log_likelihoods(score, fmt, records, B, local)
    predicted = scores.argmax(axis=1).tolist()
    gold = [fmt.label_index(r, i) for i, r in enumerate(records)]
    train = train_labels(cfg, fmt)
    words = cfg.task.words
    majority = metrics.majority_label(train)
    return {
        "accuracy": metrics.accuracy(predicted, gold),
        "macro_f1": metrics.macro_f1(predicted, gold, labels=range(len(words))),
        "majority_baseline_accuracy": metrics.majority_baseline_accuracy(train, gold),
        "majority_label": words[majority],
        "label_counts": {w: gold.count(i) for i, w in enumerate(words)},
        "predicted_counts": {w: predicted.count(i) for i, w in enumerate(words)},
    }


def text_results(cfg, params, fmt, records) -> dict:
    if jax.process_count() > 1:
        # generate() feeds host arrays to jit, which a multi-process mesh does not accept
        return {"generation": "skipped: text-to-text generation metrics need one process"}
    answers = generate_targets(cfg.model, params, fmt, records, cfg.train.global_batch_size)
    gold = [fmt.target_text(r, i) for i, r in enumerate(records)]
    shown = [{"prompt": fmt.prompt(r), "target": g, "output": a}
             for r, g, a in zip(records[:SHOWN_EXAMPLES], gold, answers)]
    return {"exact_match": metrics.exact_match(answers, gold), "bleu": metrics.bleu(answers, gold),
            "examples": shown}


def preference_results(cfg: Config, trainer, params) -> dict:
    """Preference tuning: the DPO loss and TRL's reward metrics (`rewards/accuracies`, ...)
    against the frozen init_from model, means over the held-out pairs (all of them, or the
    batches covering `task.eval_examples`)."""
    assert cfg.task is not None  # evaluate_params sends only task configs here
    trainer.load_reference()
    source = make_task_source(cfg, "validation", trainer.rows)
    B = cfg.train.global_batch_size
    batches = None if cfg.task.eval_examples is None else -(-cfg.task.eval_examples // B)
    found = trainer.evaluate_pairs(params, source, batches)
    return {"split": source.name, "examples": int(found.pop("eval_pairs")),
            **{k.removeprefix("eval_"): v for k, v in found.items()}}


def evaluate_params(cfg: Config, trainer, params) -> dict:
    """The metrics of `params` on the held-out data of `cfg` (no files written)."""
    if cfg.task is None:
        lm = trainer.evaluate(params, cfg.train.eval_batches)
        per_dataset = {k.replace("eval_loss/", "loss/"): v for k, v in lm.items()
                       if k.startswith("eval_loss/")}  # a data.mixture's held-out sets
        return {"loss": lm["eval_loss"], "perplexity": lm["eval_perplexity"],
                "batches": cfg.train.eval_batches, **per_dataset}
    if cfg.task.type == "preference":
        return preference_results(cfg, trainer, params)
    all_records, where = open_task_split(cfg, "validation")
    records = _first(all_records, cfg.task.eval_examples)
    fmt = task_format(cfg, where)
    score = make_score_fn(trainer, params)
    nll, count = target_nll(score, fmt, records, cfg.train.global_batch_size, trainer.rows)
    results = {"split": where, "examples": len(records), "loss": nll / max(count, 1),
               "perplexity": metrics.perplexity(nll, count), "target_tokens": count}
    if cfg.task.type == "classification":
        results.update(classification_results(cfg, trainer, params, fmt, records, score))
    elif cfg.task.type == "text_to_text":  # chat: the loss on the answers (above)
        results.update(text_results(cfg, params, fmt, records))
    return results


def evaluate_run(cfg: Config, run_dir: str | Path | None = None, step: int | None = None,
                 devices=None) -> dict:
    """Evaluate a checkpoint of `run_dir` (default: run.dir), write eval.json and metrics."""
    run_dir = storage.path(run_dir or cfg.run.dir)
    step_dir = resolve_step_dir(run_dir, step)
    # a LoRA run is evaluated as its merged model: adapters folded into the base weights
    trainer = Trainer.build(cfg.model_copy(update={"lora": LoraConfig()}), devices)
    params = load_params(step_dir, cfg.model, trainer.state_sh.params, lora=cfg.lora)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "run_dir": str(run_dir), "step": int(step_dir.name) if step_dir.name.isdigit() else None,
        "task": cfg.task.type if cfg.task else "language_modelling"}
    results.update(evaluate_params(cfg, trainer, params))
    results["seconds"] = round(time.perf_counter() - started, 2)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / EVAL_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        _drop_eval_lines(run_dir, results["step"] or 0)  # a rerun replaces, never duplicates
        logger = MetricsLogger(run_dir, 1, progress=False)
        logger.log(results["step"] or 0, {f"eval_{k}": v for k, v in results.items()
                                          if isinstance(v, (int, float)) and k != "step"})
        logger.close()
    return results


def _drop_eval_lines(run_dir: Path, step: int) -> None:
    """Remove earlier `bignlp-jax eval` lines (they carry eval_seconds) for `step` from
    metrics.jsonl; training lines stay. Atomic: the old or the new file, never half."""
    path = RunDir(run_dir).metrics_file
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or not (
        (record := json.loads(line)).get("step") == step and "eval_seconds" in record)]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def read_eval(run_dir: str | Path) -> dict | None:
    path = storage.path(run_dir) / EVAL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

