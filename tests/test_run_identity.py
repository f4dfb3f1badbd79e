"""A rerun never silently changes a run's config; what a run logs (step 1, compile time apart
from throughput, eval on its own cadence) and its closing summary line."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import tiny_config

from bignlp_jax.errors import ConfigError
from bignlp_jax.rundir import HISTORY_FILE
from bignlp_jax.train.identity import read_history
from bignlp_jax.train.loop import train
from bignlp_jax.train.metrics import read_metrics


def saved_lr(run_dir) -> float:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"]


@pytest.mark.slow  # four short training runs in one directory
def test_rerun_refuses_other_config_then_records_an_allowed_change(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(tmp_path, "train.steps=2", "train.log_every=5", "train.eval_every=3",
                      "train.eval_batches=1"))
    records = read_metrics(run)
    # step 1 is logged with the compile time and no throughput; the last step has throughput
    assert [r["step"] for r in records] == [1, 2]
    assert "compile_seconds" in records[0] and "tokens_per_sec" not in records[0]
    assert "tokens_per_sec" in records[1] and "compile_seconds" not in records[1]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: step 2 of 2, final loss ")
    assert f"checkpoint {run / 'checkpoints' / '2'}" in summary

    # a finished run with another learning rate: refused with old -> new, file untouched
    with pytest.raises(ConfigError) as err:
        train(tiny_config(tmp_path, "train.steps=2", "optimizer.lr=1e-3"))
    message = str(err.value)
    assert "optimizer.lr: 0.01 (run) -> 0.001 (now)" in message
    assert "--allow-config-change" in message and "train.log_every" not in message
    assert saved_lr(run) == 0.01 and not (run / HISTORY_FILE).exists()

    # more steps and other cadences are fine: applied, and recorded with the step they start
    train(tiny_config(tmp_path, "train.steps=7", "train.log_every=5", "train.eval_every=3",
                      "train.eval_batches=1"))
    (entry,) = read_history(run)
    assert entry["step"] == 2 and entry["changes"]["train.steps"] == {"old": 2, "new": 7}
    records = read_metrics(run)
    # resumed at 2: step 3 is the first of this start (and an eval step), 5 a log step,
    # 6 eval only (no train metrics), 7 the last
    assert [r["step"] for r in records] == [1, 2, 3, 5, 6, 7]
    by_step = {r["step"]: r for r in records}
    assert "eval_loss" in by_step[3] and "eval_loss" in by_step[6]
    assert "loss" not in by_step[6] and "eval_loss" not in by_step[5]

    # explicitly allowed: applied from the resumed step, recorded, config.yaml now says so
    train(tiny_config(tmp_path, "train.steps=8", "optimizer.lr=1e-3"), allow_config_change=True)
    entry = read_history(run)[-1]
    assert entry["step"] == 7
    assert entry["changes"]["optimizer.lr"] == {"old": 0.01, "new": 0.001}
    assert saved_lr(run) == 0.001


@pytest.mark.slow
def test_cli_refuses_config_change_with_exit_2_and_allows_it_with_the_flag(tmp_path, capsys):
    from helpers import TINY_MODEL

    from bignlp_jax.cli import main

    base = ["tiny", f"run.dir={tmp_path}/run", "data.source=synthetic", "data.seq_len=16",
            "train.global_batch_size=8", "train.steps=1", "optimizer.lr=1e-2",
            "optimizer.warmup_steps=0", "optimizer.schedule=constant", *TINY_MODEL]
    assert main(["train", *base]) == 0
    capsys.readouterr()
    assert main(["train", *base, "run.seed=3"]) == 2
    err = capsys.readouterr().err
    assert "run.seed: 0 (run) -> 3 (now)" in err and "Traceback" not in err
    assert main(["train", *base, "run.seed=3", "--allow-config-change"]) == 0
    assert json.loads((tmp_path / "run" / HISTORY_FILE).read_text())["changes"]["run.seed"] == {
        "old": 0, "new": 3}


def test_stores_filled_in_at_start_are_no_change_but_other_stores_are(tmp_path):
    from bignlp_jax.train.identity import compare

    cfg = tiny_config(tmp_path)
    saved = cfg.model_dump(mode="json")
    saved["data"]["stores"] = {"stdlib_docs/train": "abc123"}
    assert not compare(saved, cfg, tmp_path)  # stores unset now: whatever the data resolves to
    pinned = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"stores": {"stdlib_docs/train": "def456"}})})
    assert "data.stores.stdlib_docs/train" in compare(saved, pinned, tmp_path).other
