"""A run trained with pipeline stages: resumes under another stage count, generates, exports.

The checkpoint holds the layer stack in its canonical order (split over stages only in memory),
so a run saved with mesh.stage=2 continues with mesh.stage=1 or 4 and its losses equal the
uninterrupted run's to float32 rounding."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_common import losses
from helpers import tiny_config

from bignlp_jax import cli
from bignlp_jax.checkpoint import load_params
from bignlp_jax.infer.generate import generate
from bignlp_jax.model import forward
from bignlp_jax.model.pipeline import PipelineSpec
from bignlp_jax.train.loop import train

pytestmark = pytest.mark.slow  # end-to-end runs with checkpoints

RTOL = 2e-5
BASE = ("model.num_layers=8", "train.global_batch_size=16", "checkpoint.async_save=false")


def run(path, *overrides):
    cfg = tiny_config(path, *BASE, *overrides, llama=True)
    train(cfg, jax.devices())
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole")
    run(whole, "mesh.stage=2", "mesh.data=-1", "train.steps=4")
    half = tmp_path_factory.mktemp("half")
    run(half, "mesh.stage=2", "mesh.data=-1", "train.steps=2")
    return losses(whole / "run"), half


@pytest.mark.parametrize("stage", [1, 4])
def test_resume_under_another_stage_count_matches_the_uninterrupted_run(runs, tmp_path, stage):
    whole, half = runs
    shutil.copytree(half, tmp_path, dirs_exist_ok=True)
    run(tmp_path, f"mesh.stage={stage}", "mesh.data=-1", "train.steps=4")
    resumed = losses(tmp_path / "run")
    np.testing.assert_allclose([resumed[s] for s in (3, 4)], [whole[s] for s in (3, 4)],
                               rtol=RTOL)


def test_generate_and_export_from_a_pipelined_checkpoint(runs, tmp_path):
    _, half = runs
    cfg = tiny_config(half, *BASE, "mesh.stage=2", "mesh.data=-1", llama=True)
    params = load_params(half / "run", cfg.model)
    # generation runs the plain layer scan; its first greedy token is the pipelined forward's
    prompts = [[5, 9, 17, 3], [7, 7, 2, 40]]
    got = generate(cfg.model, params, prompts, max_new_tokens=1)
    logits, _ = jax.jit(lambda p, t: forward(cfg.model, p, t, pipeline=PipelineSpec(2, 2)))(
        params, jnp.asarray(prompts))
    assert [g[-1] for g in got] == np.asarray(jnp.argmax(logits[:, -1], -1)).tolist()

    out = tmp_path / "hf"
    assert cli.main(["export", "--run", str(half / "run"), "--out", str(out)]) == 0
    index = json.loads((out / "config.json").read_text())
    assert index["num_hidden_layers"] == 8


def test_resume_between_an_uneven_and_an_even_split(tmp_path):
    """10 layers: 4 stages split them unevenly (3,3,2,2 with two identity slots; stored split
    over `embed`, the stages do not divide the stack), 2 stages evenly (stored split over
    `layers`). A run saved with 4 stages resumes with 2 and matches the uninterrupted run."""
    ten = ("model.num_layers=10", "mesh.data=-1")
    run(tmp_path / "whole", *ten, "mesh.stage=2", "train.steps=4")
    run(tmp_path / "resumed", *ten, "mesh.stage=4", "train.steps=2")
    run(tmp_path / "resumed", *ten, "mesh.stage=2", "train.steps=4")
    expected, resumed = losses(tmp_path / "whole" / "run"), losses(tmp_path / "resumed" / "run")
    np.testing.assert_allclose([resumed[s] for s in (1, 2, 3, 4)],
                               [expected[s] for s in (1, 2, 3, 4)], rtol=RTOL)
