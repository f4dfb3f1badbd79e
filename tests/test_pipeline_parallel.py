"""Pipeline parallelism (mesh.stage, model/pipeline.py): a pipelined step equals one device.

8 simulated devices, a small Llama with 8 layers, packed rows (several documents per row, a
padded tail). Losses and gradients agree with one device to float32 rounding: the pipeline only
regroups rows into microbatches and layers into stages, which reorders float32 sums."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from bignlp_jax.errors import UserError
from bignlp_jax.model.pipeline import PipelineSpec, bubble_fraction, group_layers, split_fits
from bignlp_jax.parallel.rules import activation_sharding, rules_table
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.step import _grads, pipeline_spec

RTOL = 2e-5
LAYERS = ("model.num_layers=8", "train.global_batch_size=16")


def packed_batch(B=16, T=16, vocab=128, seed=0):
    """Rows of 2-3 documents each (positions restart, segment ids count up), the last few
    slots of odd rows padding (segment 0, no loss)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T + 1))
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(2, T - 2), size=1 + b % 2, replace=False))
        end = T - 3 if b % 2 else T
        start, seg = 0, 1
        for stop in [*cuts, end]:
            segment_ids[b, start:stop] = seg
            positions[b, start:stop] = np.arange(stop - start)
            start, seg = stop, seg + 1
    mask = (segment_ids > 0).astype(np.float32)
    return {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "positions": positions, "segment_ids": segment_ids, "loss_mask": mask}


def loss_and_grads(cfg, devices):
    trainer = Trainer.build(cfg, devices)
    state = trainer.layout.fresh()
    batch = trainer.device_batch(packed_batch()) if len(devices) > 1 else {
        k: jnp.asarray(v) for k, v in packed_batch().items()}

    def f(params, batch):
        with activation_sharding(trainer.mesh, rules_table(cfg.mesh.rules)):
            loss, count, grads = _grads(params, batch, cfg, jax.random.key(0))
        return loss / count, jax.tree.map(lambda g: g / count, grads)

    loss, grads = jax.jit(f)(state.params, batch)
    return float(loss), grads, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), "mesh.data=1", *LAYERS, llama=True)
    return loss_and_grads(cfg, jax.devices()[:1])


CASES = {
    "stage2-data2-fsdp2": ("mesh.stage=2", "mesh.data=2", "mesh.fsdp=2"),
    # the weights gathered layer by layer in every iteration instead of once per step
    "stage2-fsdp4-gather-per-microbatch": ("mesh.stage=2", "mesh.data=1", "mesh.fsdp=4",
                                           "train.pipeline_fsdp_gather=microbatch"),
    "stage4-tensor2": ("mesh.stage=4", "mesh.data=1", "mesh.tensor=2"),
    "stage2-repeats2": ("mesh.stage=2", "mesh.data=4", "train.pipeline_repeats=2"),
    # gradient accumulation on top: 2 accumulation steps of 8 rows, each 4 microbatches
    "stage2-accumulate": ("mesh.stage=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                          "train.microbatches=2", "train.pipeline_microbatches=4"),
}


# every case compiles for 8 devices: the slow tier (the fast tier keeps an uneven split below)
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_loss_and_gradients_match_one_device(tmp_path, reference, case):
    cfg = tiny_config(tmp_path, *LAYERS, *CASES[case], llama=True)
    loss, grads, state = loss_and_grads(cfg, jax.devices())
    ref_loss, ref_grads, _ = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    # each gradient tensor within RTOL of the reference, relative to its norm
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g), np.asarray(r)
        err = float(np.linalg.norm(g - r) / np.linalg.norm(r))
        assert err < RTOL, (jax.tree_util.keystr(path), err)
    # the layer stack lives split over the stages: each device holds 1/stages of the layers
    qkv = state.params["blocks"]["attn"]["qkv"]
    assert qkv.sharding.spec[0] == "stage"
    assert qkv.addressable_shards[0].data.shape[0] == 8 // cfg.mesh.stages


UNEVEN = {
    # 7 layers on 4 stages: groups of 2 slots, the last stage 1 layer + 1 identity slot;
    # 4 stages do not divide the stack, so it is stored split over fsdp x stage along `embed`
    "7-layers-stage4-fsdp2": (7, ("mesh.stage=4", "mesh.data=1", "mesh.fsdp=2")),
    # 10 layers on 2 stages x 2 repeats: groups of 3 slots, the last two 2 layers + 1 identity
    # slot; stored split over the stages along `layers`
    "10-layers-stage2-repeats2": (10, ("mesh.stage=2", "mesh.data=2", "mesh.tensor=2",
                                       "train.pipeline_repeats=2")),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if i else c
                                  for i, c in enumerate(UNEVEN)])
def test_uneven_stage_split_matches_one_device(tmp_path, case):
    """Identity slots fill the groups the layers do not: losses and gradients equal one
    device's, and each device stores 1/(stage x fsdp x tensor) of a layer weight."""
    layers, overrides = UNEVEN[case]
    shape = (f"model.num_layers={layers}", "train.global_batch_size=16")
    ref_loss, ref_grads, _ = loss_and_grads(
        tiny_config(tmp_path / "ref", "mesh.data=1", *shape, llama=True), jax.devices()[:1])
    cfg = tiny_config(tmp_path, *shape, *overrides, llama=True)
    loss, grads, state = loss_and_grads(cfg, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g), np.asarray(r)
        err = float(np.linalg.norm(g - r) / np.linalg.norm(r))
        assert err < RTOL, (jax.tree_util.keystr(path), err)
    wo = state.params["blocks"]["mlp"]["wo"]  # [layers, mlp, embed]
    if layers % cfg.mesh.stages:
        assert wo.sharding.spec[0] is None and "stage" in wo.sharding.spec[2]
    else:
        assert wo.sharding.spec[0] == "stage"
    split = cfg.mesh.stages * cfg.mesh.fsdp * cfg.mesh.tensor
    assert wo.addressable_shards[0].data.size * split == wo.size


def test_uneven_split_layout():
    # the last P groups are one layer short; with R > 1 they are the last repeat's
    assert group_layers(126, 8) == (16,) * 6 + (15,) * 2
    assert group_layers(10, 2, 2) == (3, 3, 2, 2)
    assert group_layers(8, 4) == (2,) * 4
    # 8 layers in 5, 6 or 7 groups of 2 slots: 2, 4, 6 identity slots, a whole group or more
    assert [n for n in range(1, 9) if split_fits(8, n)] == [1, 2, 3, 4, 8]
    # stored: split over stages along `layers` when they divide it, else along `embed`
    assert rules_table("default", 128, 8) == rules_table("default")
    uneven = rules_table("default", 126, 8)
    assert uneven["layers"] is None and uneven["embed"] == ("fsdp", "stage")
    assert uneven["pipeline_stage"] == uneven["act_stage"] == "stage"
    assert rules_table("replicated", 126, 8)["layers"] is None


def test_bubble_formula():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert PipelineSpec(4, 8, 2).bubble == pytest.approx(3 / 19)
    assert PipelineSpec(4, 8, 2).iterations == 19


@pytest.mark.parametrize("overrides, message", [
    # 6 groups of 2 slots for 8 layers: 4 identity slots, two whole groups idle
    (("mesh.stage=2", "train.pipeline_repeats=3"),
     "model.num_layers=8 does not split into mesh.stage x mesh.dcn_stage = 2 x 1 = 2 stages x "
     "train.pipeline_repeats=3: groups of 2 layer slots would leave 4 identity slots, a whole "
     "group's worth or more; stages x repeats must be one of 1, 2, 3, 4, 8$"),
    (("mesh.stage=2", "train.pipeline_microbatches=3"),
     "train.pipeline_microbatches=3 does not divide the per-step batch of 16 rows .* valid: 1, "
     "2, 4"),
    (("mesh.stage=4", "train.pipeline_repeats=2", "train.pipeline_microbatches=2"),
     "train.pipeline_microbatches=2 is fewer than the 4 stages"),
])
def test_schedules_that_do_not_fit_are_refused_before_compiling(tmp_path, overrides, message):
    cfg = tiny_config(tmp_path, *LAYERS, "mesh.data=-1", *overrides, llama=True)
    with pytest.raises(UserError, match=message):
        Trainer.build(cfg, jax.devices())
    assert pipeline_spec(tiny_config(tmp_path, *LAYERS, "mesh.stage=2", llama=True)) == (
        PipelineSpec(2, 4, 1))  # the default: 2 x stages microbatches, GPipe


def test_describe_prints_the_stage_split_and_bubble(capsys):
    from bignlp_jax import cli

    assert cli.main(["describe", "models/llama3_405b.yaml", "--devices", "1024",
                     "mesh.stage=2", "mesh.fsdp=64", "mesh.tensor=8",
                     "train.pipeline_repeats=3", "train.pipeline_microbatches=8"]) == 0
    out = capsys.readouterr().out
    assert "stage=2 x data=1 x fsdp=64" in out
    assert "2 stages x 3 repeat(s) of 21 layers (63 per stage), 8 microbatches: bubble " \
           "(S-1)/(R*M+S-1) = 4.0%" in out  # 1 / (3*8 + 1)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["pipeline"]["bubble"] == pytest.approx(1 / 25)
    # the layer stack's parameters and moments are split over the two stages too
    assert info["param_bytes_per_device"] < 4 * 405_853_388_800 / 512 / 1.9

    # 126 layers on 8 stages: groups of 16 slots, the last two stages 15 layers + 1 identity
    assert cli.main(["describe", "models/llama3_405b.yaml", "--devices", "1024",
                     "mesh.stage=8", "mesh.fsdp=16", "mesh.tensor=8"]) == 0
    out = capsys.readouterr().out
    assert "8 stages x 1 repeat(s) of 16 layer slots (16,16,16,16,16,16,15,15 layers per " \
           "stage; 2 identity slots: 1.6% extra layer compute), 16 microbatches: bubble " \
           "(S-1)/(R*M+S-1) = 30.4%" in out  # 7 / (16 + 7)
    info = json.loads(out.strip().splitlines()[-1])
    assert info["pipeline"]["layers_per_stage"] == [16] * 6 + [15] * 2
    # stored whole along `layers` but split over stage x fsdp along `embed`: 1/1024 of every
    # weight per device, except the 2 x 126 + 1 norms' scales, which no rule splits
    norms = (2 * 126 + 1) * 16384
    assert info["param_bytes_per_device"] == 4 * ((405_853_388_800 - norms) / 1024 + norms)


def test_plan_search_tries_stages_repeats_and_dcn_stage():
    from bignlp_jax.config import load_config
    from bignlp_jax.errors import ConfigError
    from bignlp_jax.perf.plan_search import analytic_step_s, dcn_candidates, mesh_candidates

    cfg = load_config("models/llama3_405b.yaml")
    shapes = mesh_candidates(cfg, 1024)
    assert {(s.get("stage", 1), s.get("repeats", 1)) for s in shapes} == {
        (1, 1), (2, 1)}  # 126 layers: only 2 stages divide both 126 and 1024
    assert (2, 2) not in {(s.get("stage", 1), s.get("repeats", 1)) for s in shapes}
    staged = next(s for s in shapes if s.get("stage") == 2)
    assert any(d.get("dcn_stage") == 2 for d in dcn_candidates(staged, 1024, 8))
    small = load_config("tiny.yaml", ["model.num_layers=8", "train.global_batch_size=64"])
    by = {(s.get("stage", 1), s.get("repeats", 1)) for s in mesh_candidates(small, 8)}
    assert {(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1)} <= by
    # stages never come with context parallelism, which the config refuses beside them
    assert not [s for s in mesh_candidates(small, 8) if s.get("stage", 1) > 1
                and s["sequence"] > 1]
    assert any(s["sequence"] > 1 for s in mesh_candidates(small, 8))
    with pytest.raises(ConfigError, match="2 pipeline stages cannot be combined with "
                                         "mesh.sequence=2; fix: set mesh.sequence=1"):
        load_config("tiny.yaml", ["mesh.stage=2", "mesh.sequence=2"])
    # the bubble is idle compute: more microbatch slots per stage, a smaller estimate
    one = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
    from bignlp_jax.parallel.devices import DEVICES

    gpipe = analytic_step_s(small, {**one, "stage": 8}, "none", DEVICES["h100"])
    circular = analytic_step_s(small, {"stage": 4, "repeats": 2, **one, "data": 2}, "none",
                               DEVICES["h100"])
    assert circular < gpipe


@pytest.mark.slow
def test_lora_adapters_run_through_the_pipeline():
    """Adapters (and their per-layer dropout keys) are cut into stages with the blocks: the
    pipelined forward equals the plain layer scan. (With dropout on, masks are drawn per
    microbatch shape, as with train.microbatches, so they differ from the unsplit batch's.)"""
    from bignlp_jax.model import forward, init_params
    from bignlp_jax.model.lora import LoraSpec, init_adapters

    cfg = tiny_config(".", *LAYERS, llama=True).model
    spec = LoraSpec(rank=2, scale=2.0, dropout=0.0, targets=("q", "v", "down"))
    params = init_params(cfg, jax.random.key(0))
    adapters = init_adapters(cfg, spec, jax.random.key(1))
    # B starts at zero; make it count
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape),
                            adapters)
    params = {**params, "lora": adapters}
    batch = packed_batch(B=8)

    def run(pipeline):
        return jax.jit(lambda p: forward(cfg, p, batch["tokens"], batch["positions"],
                                         batch["segment_ids"], lora=spec,
                                         lora_key=jax.random.key(3), pipeline=pipeline)[0])(
            params)

    np.testing.assert_allclose(np.asarray(run(PipelineSpec(2, 4, 2))), np.asarray(run(None)),
                               rtol=RTOL, atol=1e-5)


@pytest.mark.slow  # two compiles
def test_fsdp_gradients_are_summed_once_per_step_not_per_microbatch(tmp_path):
    """Each data-parallel replica accumulates its own copy's gradient in the iteration loop
    (model/pipeline.py), so the compiled step's fsdp collective bytes do not grow with the
    number of pipeline microbatches (summed in every iteration they grew ~2.5x from M=4 to 16)."""
    from bignlp_jax.perf.plan import abstract_batch, collective_bytes
    from bignlp_jax.train.state import abstract_state

    def fsdp_bytes(M):
        cfg = tiny_config(tmp_path, "model.num_layers=2", "train.global_batch_size=32",
                          "mesh.stage=2", "mesh.data=1", "mesh.fsdp=2",
                          f"train.pipeline_microbatches={M}", llama=True)
        trainer = Trainer.build(cfg, jax.devices()[:4])
        abstract = abstract_state(cfg.model, trainer.tx, trainer.state_sh)
        hlo = trainer.train_step.lower(abstract, abstract_batch(cfg, trainer.batch_sh)
                                       ).compile().as_text()
        by_axis = collective_bytes(hlo, 8, dict(trainer.mesh.shape))["by_axis"]
        return sum(v for axes, v in by_axis.items() if "fsdp" in axes)

    assert fsdp_bytes(8) < 1.2 * fsdp_bytes(2)
