"""The miniature pipeline end to end through the CLI: stages, report, skip on rerun, and the
generate / eval commands on its runs."""

import json
import os
import subprocess

import pytest
from compile_flags import xla_flags
from conftest import bignlp_cmd

from bignlp_jax.cli import main

pytestmark = pytest.mark.slow


def run_cli(*args, env, check=True):
    proc = subprocess.run(bignlp_cmd(*args), env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def env(cli_env):
    # two simulated devices: the batch is sharded, and compiles stay quick
    return dict(cli_env, XLA_FLAGS=xla_flags(2))


def test_mini_pipeline_end_to_end_and_rerun(tmp_path, env, capsys):
    out = tmp_path / "pipe"
    args = ("pipeline", "pipelines/mini", f"output_dir={out}")
    listed = run_cli(*args, "--list-stages", env=env)
    stages = json.loads(listed.stdout.strip().splitlines()[-1])
    assert stages[:5] == ["tokenizer", "pretrain", "finetune", "finetune_scratch", "evaluate"]

    first = run_cli(*args, env=env)
    for stage in stages:
        assert f"[pipeline] {stage}: done" in first.stdout
    report = (out / "report.md").read_text()
    assert "finetuned from random init" in report and "majority-class baseline" in report
    assert (out / "loss_curves.png").stat().st_size > 1000
    result = json.loads((out / "finetune" / "eval.json").read_text())
    assert {"accuracy", "macro_f1", "majority_baseline_accuracy", "perplexity"} <= set(result)
    assert result["examples"] == 16 and result["step"] == 3
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert set(results) == {"pretrain", "finetune", "finetune_scratch"}
    if "export" in stages:
        assert (out / "export" / "config.json").is_file()

    # rerun: every stage is complete and skipped, nothing is retrained
    ckpt = out / "pretrain" / "checkpoints" / "3"
    before = ckpt.stat().st_mtime_ns
    again = run_cli(*args, env=env)
    for stage in stages:
        assert f"[pipeline] {stage}: complete and current, skipped" in again.stdout
    assert ckpt.stat().st_mtime_ns == before
    assert "## Task finetuning" in again.stdout  # the report is printed again

    # the trained runs work with generate and eval
    gen = run_cli("generate", "--run", str(out / "pretrain"), "--prompt", "Return the",
                  "--prompt", "x", "--max-new-tokens", "5", env=env)
    outputs = json.loads(gen.stdout.strip().splitlines()[-1])
    assert [o["prompt"] for o in outputs] == ["Return the", "x"]
    assert all(o["tokens"] <= 5 for o in outputs)
    # eval of a run directory (in-process): eval.json, and a line in metrics.jsonl
    assert main(["eval", str(out / "finetune"), "task.eval_examples=8"]) == 0
    assert json.loads((out / "finetune" / "eval.json").read_text())["examples"] == 8
    assert "eval_accuracy" in (out / "finetune" / "metrics.jsonl").read_text()
    lines = (out / "finetune" / "metrics.jsonl").read_text().splitlines()
    assert main(["eval", str(out / "finetune"), "task.eval_examples=8"]) == 0  # idempotent
    assert (out / "finetune" / "metrics.jsonl").read_text().splitlines()[:-1] == lines[:-1]
    assert len((out / "finetune" / "metrics.jsonl").read_text().splitlines()) == len(lines)

    # bad input, in-process (exit code 2 and one message, no doubled `generate:` prefix)
    assert main(["generate", "--run", str(out / "pretrain"), "--prompt", "x",
                 "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "bignlp-jax generate: error: max_new_tokens must be >= 1" in err, err
    assert main(["generate", "--run", str(out / "pretrain"), "--prompt", " "]) == 2
    assert "--prompt number 1 is empty" in capsys.readouterr().err

    # more pretraining steps: with --refuse-stale the pipeline lists what is stale and stops
    refused = run_cli(*args, "pretrain.train.steps=4", "--refuse-stale", env=env, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "pretrain: config train.steps: 3 -> 4" in refused.stderr
    assert "finetune: pretrain changed" in refused.stderr and "evaluate:" in refused.stderr
    assert "finetune_scratch" not in refused.stderr  # it does not read the pretrained model
    # without it: pretraining continues to step 4, everything downstream of it reruns
    old_finetune_ckpt = (out / "finetune" / "checkpoints" / "3").stat().st_mtime_ns
    changed = run_cli(*args, "pretrain.train.steps=4", env=env)
    assert "[pipeline] pretrain: stale (config train.steps: 3 -> 4); continuing" in changed.stdout
    assert "[pipeline] finetune: stale (pretrain changed); rerunning" in changed.stdout
    for stage in ["finetune", "evaluate"] + (["export"] if "export" in stages else []):
        assert f"[pipeline] {stage}: stale (" in changed.stdout, stage
        assert f"[pipeline] {stage}: done" in changed.stdout
    assert "[pipeline] finetune_scratch: complete and current, skipped" in changed.stdout
    moved = sorted((out / "stale").iterdir())
    assert [m.name.split(".")[0] for m in moved] == sorted(
        ["evaluate", "finetune"] + (["export"] if "export" in stages else []))
    assert (out / "finetune" / "checkpoints" / "3").stat().st_mtime_ns != old_finetune_ckpt
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert results["pretrain"]["step"] == 4 and results["finetune"]["step"] == 3
    # the finetuning started from the 4-step model: its run records the new upstream
    assert "Stale stages" not in (out / "report.md").read_text()


def test_pipeline_bad_stage_and_mismatched_models(tmp_path, capsys):
    from bignlp_jax.errors import UserError
    from bignlp_jax.pipeline.spec import Pipeline

    with pytest.raises(UserError, match=r"finetune's model differs from pretrain's \(model.hidden"):
        Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", "finetune.model.hidden=48"])
    p = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}"])
    ft = p.run_config("finetune")
    assert ft.init_from == str(tmp_path / "pretrain")
    assert ft.data.tokenizer == str(tmp_path / "tokenizer")
    assert p.run_config("finetune_scratch").init_from is None
    # in-process: keep this process's JAX config as it is (no compilation cache)
    args = ["pipeline", "pipelines/mini", f"output_dir={tmp_path}", "compilation_cache=null"]
    assert main([*args, "--stage", "nope"]) == 2
    assert "has no stage 'nope'" in capsys.readouterr().err
    # a stage whose input is missing says which stage to run first
    assert main([*args, "--stage", "finetune"]) == 2
    assert "needs the output of stage tokenizer" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing was written
