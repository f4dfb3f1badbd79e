"""Learning-rate schedules at and around warmup end and every decay boundary; weight-decay mask."""

import jax
import numpy as np
import pytest
from helpers import tiny_config

from bignlp_jax.config import OptimizerConfig
from bignlp_jax.model import abstract_params
from bignlp_jax.train.optimizer import decay_mask, learning_rate_schedule


def lr_at(cfg, steps, total=100):
    schedule = learning_rate_schedule(cfg, total)
    return [float(schedule(s)) for s in steps]


def test_warmup_then_step_decay_every():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, schedule="step", gamma=0.5, decay_every=20)
    # linear ramp: step s uses lr * (s+1)/warmup, reaching lr on the last warmup step (9)
    assert lr_at(cfg, [0, 4, 9]) == pytest.approx([0.1, 0.5, 1.0])
    # full lr until warmup + decay_every, then halved every 20 steps
    assert lr_at(cfg, [10, 29, 30, 49, 50, 69, 70]) == pytest.approx(
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_step_decay_at_listed_boundaries():
    cfg = OptimizerConfig(lr=2.0, warmup_steps=5, schedule="step", gamma=0.1,
                          boundaries=[40, 80])
    assert lr_at(cfg, [4, 5, 39, 40, 79, 80, 99]) == pytest.approx(
        [2.0, 2.0, 2.0, 0.2, 0.2, 0.02, 0.02])


def test_cosine_linear_constant():
    cos = OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    vals = lr_at(cos, [9, 10, 55, 100, 150], total=100)
    assert vals[0] == pytest.approx(1.0) and vals[1] == pytest.approx(1.0)
    assert vals[2] == pytest.approx(0.55, abs=1e-6)  # halfway: (1 + 0.1) / 2
    assert vals[3] == pytest.approx(0.1) and vals[4] == pytest.approx(0.1)
    lin = OptimizerConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(lin, [0, 50, 100], total=100) == pytest.approx([1.0, 0.5, 0.0])
    const = OptimizerConfig(lr=0.3, warmup_steps=2, schedule="constant")
    assert lr_at(const, [0, 1, 2, 1000]) == pytest.approx([0.15, 0.3, 0.3, 0.3])


def test_step_schedule_needs_a_rule():
    with pytest.raises(ValueError, match="decay_every or optimizer.boundaries"):
        OptimizerConfig(schedule="step")


@pytest.mark.parametrize("llama", [False, True], ids=["gpt", "llama"])
def test_weight_decay_skips_norms_and_biases(tmp_path, llama):
    params = abstract_params(tiny_config(tmp_path, llama=llama).model)
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    for name, decays in flat.items():
        is_matrix = any(w in name for w in ("qkv']", "'out']", "'wi'", "'wo'", "embedding",
                                            "lm_head", "pos_embed"))
        assert decays == is_matrix, name
    assert np.sum(list(flat.values())) >= 5
