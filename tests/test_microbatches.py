"""Gradient accumulation (`train.microbatches`) changes how a batch is computed, not what a step
does: four microbatches give the losses and parameters of one whole batch (within float
rounding), on one device, on a data x fsdp mesh, and when training LoRA adapters only."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bignlp_jax.config import LoraConfig
from bignlp_jax.data import make_source
from bignlp_jax.train.loop import Trainer
from tests.helpers import tiny_config

TOL = 1e-5  # losses and final params, absolute; float32 sums in another order
STEPS = 3


def _run(cfg, devices) -> tuple[list[float], dict]:
    trainer = Trainer.build(cfg, devices)
    source = make_source(cfg, "train", trainer.rows)
    state = trainer.layout.fresh()
    losses = []
    for _ in range(STEPS):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(source)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("mesh, devices, extra", [
    ("one_device", 1, []),
    ("data_x_fsdp", 8, ["mesh.data=2", "mesh.fsdp=4"]),
    # the LoRA step compiles another program: in the full suite, out of the fast tier
    pytest.param("lora", 8, ["mesh.data=2", "mesh.fsdp=4"], marks=pytest.mark.slow),
])
def test_four_microbatches_equal_one(tmp_path, mesh, devices, extra):
    overrides = ["train.global_batch_size=32", "optimizer.lr=1e-3", *extra]
    if devices == 1:
        overrides += ["mesh.data=1"]
    used = jax.devices()[:devices]
    configs = [tiny_config(tmp_path, *overrides, f"train.microbatches={m}", llama=True)
               for m in (1, 4)]
    if mesh == "lora":
        # adapters on a random base: the config refuses LoRA without init_from, which only
        # decides where the base comes from, not how a step computes
        lora = LoraConfig(rank=4, alpha=8.0, targets=["q", "v", "up"])
        configs = [c.model_copy(update={"lora": lora}) for c in configs]
    one_losses, one_params = _run(configs[0], used)
    four_losses, four_params = _run(configs[1], used)
    np.testing.assert_allclose(four_losses, one_losses, rtol=0, atol=TOL)
    assert len(set(one_losses)) == STEPS  # the steps trained (the loss moved)
    flat_one = jax.tree_util.tree_leaves_with_path(one_params)
    flat_four = jax.tree.leaves(four_params)
    assert len(flat_one) == len(flat_four)
    for (path, a), b in zip(flat_one, flat_four):
        np.testing.assert_allclose(b, a, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))
    if mesh == "lora":
        assert all(float(np.abs(p["b"]).max()) > 0 for p in four_params["lora"].values())
