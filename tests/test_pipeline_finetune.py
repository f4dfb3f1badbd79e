"""Finetuning and evaluation during training through pipeline stages: a task finetune with
mesh.stage=2 (3 layers: an uneven split, one identity slot) logs the same training and held-out
losses as with one stage, to float32 rounding. End-to-end runs, so the slow tier."""

import jax
import numpy as np
import pytest

from bignlp_jax.config import load_config
from bignlp_jax.train.loop import train
from bignlp_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

RTOL = 2e-5
SMALL = ["model.vocab_size=512", "model.num_layers=3", "model.hidden=32", "model.num_heads=2",
         "model.mlp_dim=64", "model.max_seq_len=64", "data.seq_len=64", "data.tokenizer=null",
         "init_from=null", "train.global_batch_size=8", "train.steps=2", "train.log_every=1",
         "train.eval_every=2", "train.eval_batches=1", "checkpoint.async_save=false"]


def finetune(run_dir, devices, *overrides) -> tuple[dict[int, float], float]:
    """(training loss per step, held-out loss at the last step) of a classification finetune."""
    cfg = load_config("finetune_stdlib_modules", [f"run.dir={run_dir}", *SMALL, *overrides])
    assert cfg.task is not None and cfg.task.type == "classification"
    train(cfg, devices)
    records = read_metrics(run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    (eval_loss,) = [r["eval_loss"] for r in records if "eval_loss" in r]
    return losses, eval_loss


def test_task_finetune_and_eval_with_stages_match_one_stage(tmp_path):
    # 4 devices (the fewer, the faster the compile): data 4, then stage 2 x data 2
    devices = jax.devices()[:4]
    one_losses, one_eval = finetune(tmp_path / "one", devices, "mesh.data=-1")
    staged_losses, staged_eval = finetune(tmp_path / "staged", devices, "mesh.stage=2",
                                          "mesh.data=-1", "train.pipeline_microbatches=2")
    assert sorted(staged_losses) == [1, 2]
    np.testing.assert_allclose([staged_losses[s] for s in (1, 2)],
                               [one_losses[s] for s in (1, 2)], rtol=RTOL)
    np.testing.assert_allclose(staged_eval, one_eval, rtol=RTOL)
