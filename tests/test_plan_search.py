"""`plan --search`: pipeline candidates (stages, repeats, pipeline microbatches, when fsdp
weights are gathered), the analytic memory that orders them, and the compile loop."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from bignlp_jax.config import load_config
from bignlp_jax.parallel.devices import DEVICES
from bignlp_jax.perf.plan_memory import layer_params, layers_per_stage, memory_terms
from bignlp_jax.perf.plan_search import rank, search
from bignlp_jax.perf.plan_space import mesh_candidates, schedules

GIB = 2**30
H100 = DEVICES["h100"]


@pytest.fixture(scope="module")
def llama405b():
    return load_config("models/llama3_405b.yaml")


@pytest.fixture(scope="module")
def ranked405b(llama405b):
    return rank(llama405b, 1024, H100, 80.0)


def test_405b_on_1024_h100s_needs_per_microbatch_gathers(ranked405b):
    """126 layers on 1,024 devices: 2, 4, 8 and 16 stages (the last three uneven, padded with
    identity slots) are proposed. A stage's slots gathered whole for the step need 98 GiB or
    more even with 16 stages, one mesh without stages keeps all 126 layers' activations: only
    meshes with stages and train.pipeline_fsdp_gather=microbatch fit analytically."""
    queue, skipped = ranked405b
    assert queue
    for c in queue:
        assert c.shape["stage"] > 1 and c.gather == "microbatch" and c.memory <= 80 * GIB
        assert c.pipeline_microbatches % c.shape["stage"] == 0  # multiples of the stage count
    assert {c.shape["stage"] for c in queue} == {2, 4, 8, 16}
    assert [c.est_step_s for c in queue] == sorted(c.est_step_s for c in queue)
    assert any(c.shape.get("dcn_stage") == 8 for c in queue)  # stages across hosts
    first = queue[0]
    assert f"stage {first.shape['stage']} M{first.pipeline_microbatches} gather/microbatch" \
        in first.text()
    assert not [s for s in skipped if s["mesh"]["fsdp"] == 1 and s["gather"] != "step"]
    too_big = {(s["mesh"].get("stage", 1), s["gather"]) for s in skipped}
    assert {(1, "step"), (2, "step"), (4, "step"), (8, "step"), (16, "step")} <= too_big
    step = {}
    for s in skipped:
        if s["gather"] == "step" and s["remat"] == "full" and s["mesh"].get("stage", 1) > 1:
            gib = int(s["why"].split("~")[1].split()[0])
            step[s["mesh"]["stage"]] = min(gib, step.get(s["mesh"]["stage"], gib))
    # a stage's slots whole over fsdp, four float32 copies: 63 layers on 2 stages, 16 slots
    # (two of them identity slots) on 8
    assert step[2] > 300 and 120 < step[8] < 200 and step[16] > 80


def test_uneven_split_counts_slots_and_stores_the_stack_over_stage(llama405b):
    """126 layers on 8 stages run 16 slots a stage: the gathered weights, the compute and the
    tensor traffic count 16 layers, not 126/8; parameters and moments are stored over fsdp x
    stage along `embed` (parallel/rules.py), as small per device as an even split; the
    regroup of that stack into stage groups adds float32 copies and `stage` bytes."""
    from bignlp_jax.perf.plan_memory import analytic_bytes, regroup_moves
    from bignlp_jax.perf.plan_search import analytic_step_s

    even = {"stage": 1, "data": 1, "fsdp": 128, "sequence": 1, "tensor": 8}
    uneven = {"stage": 8, "data": 1, "fsdp": 16, "sequence": 1, "tensor": 8}
    assert analytic_bytes(llama405b, uneven) == pytest.approx(
        analytic_bytes(llama405b, even), rel=0.02)
    assert analytic_bytes(llama405b, uneven) < 5 * GIB  # 405.9B x 12 B / 1,024 devices
    layer_f32 = layer_params(llama405b.model) * 4 / 8
    weights = memory_terms(llama405b, uneven, "full", 4, 16, "step")["weights"]
    assert weights == pytest.approx(4 * 16 * layer_f32)
    assert regroup_moves(126, 8, 1) and regroup_moves(126, 2, 2) and not regroup_moves(126, 2, 1)
    # the same mesh with 128 layers (an even split: 16 each, no regroup) costs as much compute
    # and tensor traffic, and less stage traffic
    cfg128 = llama405b.model_copy(update={"model": llama405b.model.model_copy(
        update={"num_layers": 128})})
    dcn = {"dcn_data": 1, "dcn_fsdp": 1, "dcn_stage": 8}
    est = [analytic_step_s(c, uneven, "full", H100, dcn, 4, 16) for c in (llama405b, cfg128)]
    assert est[1] < est[0] < 1.02 * est[1]
    step_traffic = memory_terms(cfg128, uneven, "full", 4, 16, "microbatch")["pipeline"]
    assert memory_terms(llama405b, uneven, "full", 4, 16, "microbatch")["pipeline"] - \
        step_traffic == pytest.approx(2 * 16 * layer_f32 / 16, rel=0.01)


def test_with_memory_to_spare_gathering_once_per_step_ranks_first(llama405b):
    """The estimate counts the gathers: with room for a stage's weights, gathering them once
    per step is faster than gathering every layer in every pipeline iteration."""
    queue, _ = rank(llama405b, 1024, H100, 10_000.0)
    staged = [c for c in queue if c.remat == "full" and (
        c.shape.get("stage"), c.shape["data"], c.shape["fsdp"], c.shape["tensor"]) == (2, 1, 64, 8)]
    best = {g: min(c.est_step_s for c in staged if c.gather == g)
            for g in ("step", "microbatch")}
    assert best["step"] < best["microbatch"]


def test_memory_terms_follow_gather_microbatches_and_remat(llama405b):
    shape = {"stage": 2, "data": 1, "fsdp": 64, "sequence": 1, "tensor": 8}
    step = memory_terms(llama405b, shape, "full", 4, 4, "step")
    layerwise = memory_terms(llama405b, shape, "full", 4, 4, "microbatch")
    assert step["weights"] > 10 * layerwise["weights"]
    assert step["saved"] == layerwise["saved"]
    # more pipeline microbatches: fewer rows at once, less kept for the backward pass
    finer = memory_terms(llama405b, shape, "full", 4, 8, "microbatch")
    assert finer["saved"] == pytest.approx(layerwise["saved"] / 2)
    assert finer["total"] < layerwise["total"]
    # remat=none checkpoints no stage iteration: all R*M+S-1 iterations' activations stay
    none = [memory_terms(llama405b, shape, "none", 4, M, "microbatch")["saved"] for M in (4, 8)]
    assert none[1] / none[0] == pytest.approx((8 + 1) / (4 + 1) / 2)
    saved = {r: memory_terms(llama405b, shape, r, 4, 4, "microbatch")["saved"]
             for r in ("none", "dots", "full")}
    assert saved["none"] > saved["dots"] > saved["full"]
    # without fsdp a stage's weights are all at hand, whichever the gather setting
    unsharded = {**shape, "data": 64, "fsdp": 1}
    assert memory_terms(llama405b, unsharded, "full", 4, 4, "microbatch")["weights"] == \
        memory_terms(llama405b, unsharded, "full", 4, 4, "step")["weights"]
    # repeats: each iteration's slice of layers is kept for the backward pass
    circular = memory_terms(llama405b, {**shape, "repeats": 3}, "full", 4, 4, "microbatch")
    layer_shard = layer_params(llama405b.model) * 4 / (8 * 64)  # float32 over tensor x fsdp
    iterations, layers = 3 * 4 + 2 - 1, 63 // 3
    assert circular["pipeline"] - layerwise["pipeline"] >= iterations * layers * layer_shard
    # a split that does not come out even pads: 126 layers over 8 stages hold 16 each
    assert layers_per_stage(126, 8, 1) == 16 and layers_per_stage(126, 2, 1) == 63


def test_fsdp_traffic_follows_the_gather_mode_and_the_regroup_crosses_stages(llama405b):
    """With pipeline_fsdp_gather=step a stage's weights are gathered and their gradient summed
    over fsdp once per gradient-accumulation microbatch, whatever M is; layer by layer it is
    every pipeline iteration. The uneven stack's regroup crosses `stage` once per
    accumulation microbatch and once back: 2.6 and 6.5 GiB per device per step compiled
    (benchmarks/RESULTS.md, 126 against 128 layers on stage 8 x fsdp 16 x tensor 8)."""
    from bignlp_jax.perf.plan_search import axis_bytes

    shape = {"stage": 8, "data": 1, "fsdp": 16, "sequence": 1, "tensor": 8}
    once = [axis_bytes(llama405b, shape, "full", k, M, "step")["fsdp"]
            for k, M in ((1, 8), (1, 16), (4, 16))]
    assert once[0] == once[1] and once[2] == pytest.approx(4 * once[0])
    layerwise = [axis_bytes(llama405b, shape, "full", 1, M, "microbatch")["fsdp"]
                 for M in (8, 16)]
    assert layerwise[1] / layerwise[0] == pytest.approx((16 + 7) / (8 + 7))
    assert layerwise[0] > 10 * once[0]
    cfg128 = llama405b.model_copy(update={"model": llama405b.model.model_copy(
        update={"num_layers": 128})})
    for k, compiled in ((1, 2.6), (4, 6.5)):
        regroup = axis_bytes(llama405b, shape, "full", k, 16)["stage"] - \
            axis_bytes(cfg128, shape, "full", k, 16)["stage"]
        assert regroup / GIB == pytest.approx(compiled, rel=0.05)


def test_stage_counts_follow_what_training_accepts(llama405b):
    """The space asks `pipeline_spec` which splits are valid: 126 layers take 2, 4, 8 and 16
    stages (padded where uneven); 9 layers take 2 stages only (4 stages of 3 slots, or 2
    stages x 2 repeats, would leave a whole group's slots idle: training refuses them)."""
    shapes = mesh_candidates(llama405b, 1024)
    assert {s.get("stage", 1) for s in shapes} == {1, 2, 4, 8, 16}
    assert {s.get("repeats", 1) for s in shapes if s.get("stage") == 8} == {1, 2}
    eight = next(s for s in shapes if s.get("stage") == 8 and s.get("repeats") == 1)
    assert all(M % 8 == 0 for _, M in schedules(llama405b, eight))
    nine = llama405b.model_copy(update={"model": llama405b.model.model_copy(
        update={"num_layers": 9})})
    staged = {(s.get("stage", 1), s.get("repeats", 1)) for s in mesh_candidates(nine, 1024)}
    assert staged == {(1, 1), (2, 1)}


def test_search_moves_to_smaller_candidates_after_a_compile_that_does_not_fit(
        llama405b, ranked405b, monkeypatch):
    """The compiled memory corrects the analytic one: a first compile 10% over its estimate
    sends the search to the fastest candidate whose estimate leaves 10% room."""
    import bignlp_jax.perf.plan as plan

    compiled = []

    def fake_compile(cfg, spec=None, memory_gb=80.0):
        memory = next(c.memory for c in ranked405b[0]
                      if (c.microbatches, c.pipeline_microbatches, c.shape["data"]) ==
                      (cfg.train.microbatches, cfg.train.pipeline_microbatches,
                       cfg.mesh.data))
        compiled.append(memory)
        total = 1.1 * memory
        return {"total_bytes_per_device": total, "total_gib_per_device": total / GIB,
                "fits": total <= memory_gb * GIB, "est_step_s": memory / GIB,
                "compile_s": 0.0}

    monkeypatch.setattr(plan, "compile_plan", fake_compile)
    fitting, too_big, skipped = search(llama405b, 1024, H100, 80.0, budget_s=60,
                                       max_compiles=2, log=lambda s: None)
    queue = ranked405b[0]
    assert compiled[0] == queue[0].memory and compiled[0] * 1.1 > 80 * GIB
    assert compiled[1] == next(c.memory for c in queue if c.memory * 1.1 <= 80 * GIB)
    assert len(too_big) == 1 and len(fitting) == 1
    assert sum(s["why"] == "not compiled (budget)" for s in skipped) == len(queue) - 2


@pytest.mark.slow  # two compiles
def test_analytic_memory_orders_gathers_as_the_compiler_does(tmp_path):
    """stage 2 x fsdp 4 on 8 devices: gathering a stage's weights once per step costs more
    memory than gathering layer by layer, analytically and in the compiled program."""
    from bignlp_jax.perf.plan import compile_plan
    from bignlp_jax.perf.plan_space import with_candidate

    cfg = tiny_config(tmp_path, "model.num_layers=16", "model.hidden=128", "model.mlp_dim=512",
                      "train.global_batch_size=16", "model.dtype=bfloat16", llama=True)
    shape = {"stage": 2, "data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
    analytic, measured = {}, {}
    for gather in ("step", "microbatch"):
        analytic[gather] = memory_terms(cfg, shape, "full", 1, 4, gather)["total"]
        trial = with_candidate(cfg, shape, "full", 1, 4, gather)
        measured[gather] = compile_plan(trial, spec=H100)["total_bytes_per_device"]
    assert analytic["step"] > analytic["microbatch"]
    assert measured["step"] > measured["microbatch"]
    for gather in analytic:  # and each estimate near its compiled figure
        assert 0.6 < analytic[gather] / measured[gather] < 1.6


def test_compile_corrections_are_shared_within_a_kind_of_candidate():
    """A compiled/analytic ratio carries to candidates the estimate models alike: dots and full
    remat share one (both checkpoint each stage iteration), remat=none, no stages, repeats and
    the gather mode each make another kind."""
    from bignlp_jax.perf.plan_search import Candidate

    base = {"stage": 2, "repeats": 1, "data": 1, "fsdp": 64, "sequence": 1, "tensor": 8}

    def kind(shape=base, remat="full", gather="microbatch"):
        return Candidate(1.0, shape, remat, 1, 4, gather, 1.0).kind()

    assert kind(remat="dots") == kind()
    others = [kind(remat="none"), kind(gather="step"), kind({**base, "repeats": 2}),
              kind({**base, "stage": 1}, gather="step")]
    assert len({kind(), *others}) == 5
