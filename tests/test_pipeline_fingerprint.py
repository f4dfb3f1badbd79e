"""Stage fingerprints (no training): what a change upstream makes stale, and a report that
leaves stale stages out instead of mixing them with current ones."""

from __future__ import annotations

import json

from bignlp_jax.pipeline.fingerprint import downstream, fingerprint
from bignlp_jax.pipeline.spec import Pipeline
from bignlp_jax.pipeline.state import RESULTS_FILE, freshness, record


def fingerprints(tmp_path, *overrides):
    p = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *overrides])
    return p, {s: fingerprint(p, s) for s in p.stages()}


def test_a_change_makes_its_stage_and_everything_downstream_stale(tmp_path):
    p, base = fingerprints(tmp_path)
    assert fingerprints(tmp_path)[1] == base  # deterministic
    _, steps = fingerprints(tmp_path, "pretrain.train.steps=4")
    changed = {s for s in base if steps[s] != base[s]}
    assert changed == {"pretrain", *downstream(p, "pretrain")}
    assert changed == {"pretrain", "finetune", "evaluate"} | (
        {"export"} if "export" in base else set())
    # the finetune section configures both finetuning stages (the baseline is the same recipe)
    _, lr = fingerprints(tmp_path, "finetune.optimizer.lr=0.5")
    assert {s for s in base if lr[s] != base[s]} == {
        "finetune", "finetune_scratch", *downstream(p, "finetune")}
    _, tok = fingerprints(tmp_path, "tokenizer.model_type=unigram")
    assert {s for s in base if tok[s] != base[s]} == set(base)  # everything reads it


def test_report_leaves_out_stale_evaluation(tmp_path):
    from bignlp_jax.pipeline.report import build_report

    p, fps = fingerprints(tmp_path)
    (tmp_path / "evaluate").mkdir(parents=True)
    fake = {"accuracy": 0.5, "macro_f1": 0.5, "perplexity": 2.0, "examples": 16,
            "majority_label": "x", "majority_baseline_accuracy": 0.2, "step": 3}
    (tmp_path / "evaluate" / RESULTS_FILE).write_text(json.dumps(
        {"finetune": fake, "finetune_scratch": fake}))
    for stage in p.stages():
        record(p, stage, "done", 1.0, "", fps[stage], {})
    assert freshness(p, "evaluate") == "current"
    assert "## Task finetuning" in build_report(p)

    p4 = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", "pretrain.train.steps=4"])
    assert freshness(p4, "evaluate") == "stale" and freshness(p4, "finetune_scratch") == "current"
    report = build_report(p4)
    assert "## Task finetuning" not in report and "50.0%" not in report
    assert "Stale stages, left out below: " in report
    assert "| evaluate | stale |" in report
