"""What each pipeline stage does, and when it runs, reruns or is skipped.

A stage is skipped only when its output is complete and current: made from the settings and
inputs the pipeline has now (fingerprint.py). A stale stage (its settings or anything upstream
changed) runs again, and so, through the fingerprints, does everything downstream; its old
output is moved to OUT/stale/ first, except a training stage that may simply continue (only
steps/cadence changed, same inputs), which resumes in place. An interrupted training stage
continues from its newest checkpoint; the tokenizer and export stages write to a temporary
directory and rename it, so a half-written output never counts as done. With OUT in a bucket
they write to a local staging directory and upload it, the file that marks the stage done
(tokenizer.model, config.json) last; training stages write there directly (run.dir).
`OUT/pipeline.json` (state.py) records each stage's status, wall time and fingerprints.
"""

from __future__ import annotations

import json
import time

import jax
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint import is_complete, load_params
from bignlp_jax.data.corpora import embedded
from bignlp_jax.data.tfds.source import open_split, resolve_data_dir, text_of
from bignlp_jax.data.tokenizer import MODEL_FILE, train_tokenizer
from bignlp_jax.errors import UserError
from bignlp_jax.evaluate.harness_results import results_json, score_table
from bignlp_jax.evaluate.run import evaluate_run
from bignlp_jax.hf.weights import export_hf
from bignlp_jax.owned import LEDGER
from bignlp_jax.pipeline.fingerprint import fingerprint, input_fingerprints, upstream
from bignlp_jax.pipeline.spec import TRAIN_STAGES, Pipeline
from bignlp_jax.pipeline.state import (  # noqa: F401 - read_state: re-exported for report.py
    RESULTS_FILE,
    STATE_FILE,
    can_resume,
    freshness,
    read_state,
    record,
    set_aside,
    why_stale,
    write_whole,
)
from bignlp_jax.rundir import LM_EVAL_FILE, RunDir
from bignlp_jax.train.loop import train


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# -- completion -------------------------------------------------------------------------------
def is_done(p: Pipeline, stage: str) -> bool:
    out = p.stage_dir(stage)
    if stage == "tokenizer":
        return (out / MODEL_FILE).is_file()
    if stage in TRAIN_STAGES:
        return is_complete(out, p.run_config(stage))
    if stage == "evaluate":
        results = read_results(p)
        if results is None:
            return False
        wanted = {s: p.run_config(s).train.steps for s in p.stages() if s in TRAIN_STAGES}
        return all(results.get(s, {}).get("step") == step for s, step in wanted.items())
    if stage == "export":
        return (out / "config.json").is_file()
    if stage == "lm_eval":
        scores = read_lm_eval(p)
        return scores is not None and all(
            scores.get(m, {}).get("step") == p.run_config(m).train.steps
            for m in p.lm_eval_models())
    raise UserError(f"unknown pipeline stage {stage!r}; stages: {', '.join(p.stages())}")


def read_results(p: Pipeline) -> dict | None:
    path = p.stage_dir("evaluate") / RESULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_lm_eval(p: Pipeline) -> dict | None:
    """{trained stage: the harness's results JSON (+ run_dir, step, commit)} of the lm_eval
    stage, or None before it ran."""
    path = p.stage_dir("lm_eval") / LM_EVAL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _needs(p: Pipeline, stage: str, before: str) -> None:
    if before not in p.stages():
        return
    current = freshness(p, before)
    if current != "current" or not is_done(p, before):
        what = (f"is stale ({why_stale(p, before)})" if current == "stale"
                else "is not complete")
        raise UserError(
            f"pipeline stage {stage} needs the output of stage {before} ({p.stage_dir(before)}), "
            f"which {what}\n  fix: run `bignlp-jax pipeline {p.path} --stage {before}` "
            "first (or the whole pipeline without --stage)"
        )


# -- the stages -------------------------------------------------------------------------------
def run_tokenizer(p: Pipeline) -> str:
    """Train a SentencePiece tokenizer on the pretraining data, model.vocab_size pieces."""
    cfg = p.run_config("pretrain")
    assert p.spec.tokenizer is not None and cfg.data.tfds_name  # Pipeline.check() saw to both
    out = p.stage_dir("tokenizer")
    if jax.process_index() == 0:
        data_dir = resolve_data_dir(cfg.data.data_dir)
        if cfg.data.tfds_name in embedded.EMBEDDED and not storage.is_remote(data_dir):
            embedded.ensure_embedded(data_dir)  # (a bucket must hold them already)
        records = open_split(cfg.data.tfds_name, data_dir, cfg.data.split,
                             required_keys=(cfg.data.text_key,))
        texts = (text_of(records[i], cfg.data.text_key) for i in range(len(records)))
        staged = storage.staging_dir(out)  # `out` itself on a file system
        tok = train_tokenizer(texts, staged, cfg.model.vocab_size, p.spec.tokenizer.model_type)
        storage.publish(staged, out, marker=MODEL_FILE)  # a bucket: upload, the model last
        message = (f"{tok.vocab_size} pieces ({p.spec.tokenizer.model_type}) trained on "
                   f"{len(records)} documents of {cfg.data.tfds_name}")
    _barrier("bignlp_pipeline_tokenizer")
    return message if jax.process_index() == 0 else "done"


def run_train(p: Pipeline, stage: str) -> str:
    reads = {"finetune": ["pretrain"], "align": ["finetune"]}.get(stage, [])
    for before in ["tokenizer", *reads]:
        _needs(p, stage, before)
    cfg = p.run_config(stage)
    last = train(cfg)
    loss = last.get("loss")
    return f"{cfg.train.steps} steps" + (f", final loss {loss:.4f}" if loss is not None else "")


def run_evaluate(p: Pipeline) -> str:
    """Evaluate every trained stage; gather the results into OUT/evaluate/results.json."""
    results = {}
    for stage in (s for s in p.stages() if s in TRAIN_STAGES):
        _needs(p, "evaluate", stage)
        cfg = p.run_config(stage)
        results[stage] = evaluate_run(cfg, p.stage_dir(stage))
    if jax.process_index() == 0:
        write_whole(p.stage_dir("evaluate") / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    _barrier("bignlp_pipeline_evaluate")
    return ", ".join(f"{s}: " + _headline(r) for s, r in results.items())


def _headline(result: dict) -> str:
    """The one figure of a stage's evaluation that the pipeline log shows."""
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.3f}"
    if "rewards/accuracies" in result:  # preference tuning (align)
        return f"reward accuracy {result['rewards/accuracies']:.3f}"
    return f"perplexity {result['perplexity']:.2f}"


def run_export(p: Pipeline) -> str:
    source = p.final_run()
    assert source is not None and p.spec.export is not None  # check() and stages() see to it
    _needs(p, "export", source)
    cfg = p.run_config(source)
    params = load_params(p.stage_dir(source), cfg.model, lora=cfg.lora)
    run_tok = RunDir(p.stage_dir(source)).tokenizer
    tokenizer = run_tok if run_tok.is_dir() else None
    staged = storage.staging_dir(p.stage_dir("export"))  # a bucket: written here, uploaded
    # the stage's own directory: an earlier export of ours is replaced, nothing else
    out = export_hf(params, cfg.model, staged, p.spec.export.dtype, tokenizer, overwrite=True)
    out = storage.publish(out, p.stage_dir("export"), LEDGER)
    return f"{source} model as Hugging Face {p.spec.export.dtype} in {out}"


def run_lm_eval(p: Pipeline) -> str:
    """lm-evaluation-harness tasks on each model of `lm_eval.models`, into
    OUT/lm_eval/lm_eval.json."""
    # the eval extra is optional: imported only when the stage runs (stages() leaves the stage
    # out when lm_eval is not installed)
    from bignlp_jax.evaluate.harness_run import HarnessSettings, load_model, run_harness

    spec = p.spec.lm_eval
    assert spec is not None  # the stage exists only with its section
    settings = HarnessSettings(
        tasks=tuple(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
        batch_size=spec.batch_size, max_length=spec.max_length,
        add_bos_token=spec.add_bos_token, bootstrap_iters=spec.bootstrap_iters, seed=spec.seed,
        include_paths=tuple(str(p.path.parent / d) for d in spec.include_paths))
    scores, notes = {}, []
    for stage in p.lm_eval_models():
        _needs(p, "lm_eval", stage)
        lm, step = load_model(p.run_config(stage), p.stage_dir(stage), None, settings)
        results = run_harness(lm, settings)
        scores[stage] = json.loads(results_json(results, p.stage_dir(stage), step))
        notes += [f"{stage} {task} {metric} {value:.4f}"
                  for task, metric, value, _ in score_table(results)][:2]
    if jax.process_index() == 0:
        write_whole(p.stage_dir("lm_eval") / LM_EVAL_FILE,
                    json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    _barrier("bignlp_pipeline_lm_eval")
    return ", ".join(notes)


def run_stage(p: Pipeline, stage: str) -> str:
    if stage == "tokenizer":
        return run_tokenizer(p)
    if stage in TRAIN_STAGES:
        return run_train(p, stage)
    if stage == "evaluate":
        return run_evaluate(p)
    if stage == "export":
        return run_export(p)
    if stage == "lm_eval":
        return run_lm_eval(p)
    raise UserError(f"unknown pipeline stage {stage!r}; stages: {', '.join(p.stages())}")


def check_inputs(p: Pipeline, stage: str) -> None:
    """Refuse (UserError naming the stage to run first) a stage to run whose inputs are
    missing; a stage that is complete and current needs nothing."""
    if freshness(p, stage) == "current" and is_done(p, stage):
        return
    for before in upstream(p, stage):
        _needs(p, stage, before)


def execute(p: Pipeline, stage: str, log=print) -> bool:
    """Run one stage unless it is done; True if it ran. Under a multi-process launch every
    process runs the stage; only process 0 logs (and `record` writes only there)."""
    say = log if jax.process_index() == 0 else (lambda message: None)
    fresh = freshness(p, stage)
    _barrier(f"bignlp_pipeline_{stage}_checked")  # all decide before process 0 moves anything
    if fresh == "current" and is_done(p, stage):
        say(f"[pipeline] {stage}: complete and current, skipped ({p.stage_dir(stage)})")
        record(p, stage, "skipped", 0.0)
        return False
    check_inputs(p, stage)  # refuse before moving or recording anything
    if fresh == "stale":
        reason = why_stale(p, stage)
        if can_resume(p, stage):
            say(f"[pipeline] {stage}: stale ({reason}); continuing the run in place")
        else:
            moved = set_aside(p, stage)
            say(f"[pipeline] {stage}: stale ({reason}); rerunning"
                + (f", old output moved to {moved}" if moved else ""))
        _barrier(f"bignlp_pipeline_{stage}_set_aside")
    say(f"[pipeline] {stage}: running -> {p.stage_dir(stage)}")
    mark = fingerprint(p, stage), input_fingerprints(p, stage)
    record(p, stage, "running", 0.0, "", *mark)  # an interrupted run resumes, not restarts
    started = time.perf_counter()
    note = run_stage(p, stage)
    seconds = time.perf_counter() - started
    record(p, stage, "done", seconds, note, *mark)
    say(f"[pipeline] {stage}: done in {seconds:.0f} s ({note})")
    return True
