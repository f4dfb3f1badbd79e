"""`bignlp-jax plan --search`: which mesh, remat policy and schedule to compile.

Candidates (plan_space.py: mesh shapes with stages and repeats, DCN splits, remat policies,
gradient-accumulation and pipeline microbatches, `pipeline_fsdp_gather`) are estimated
analytically, memory (plan_memory.py) and step time (`analytic_step_s`); those whose memory
fits are ordered by step time and compiled one by one within `--time-budget` and
`--max-compiles`; the ones that fit are ranked by the compiled estimate of step time (`plan.py`).
After each compile the search scales the memory of the remaining candidates of the same kind
(stages, repeats, gather, remat none or not) by the worst compiled / analytic ratio seen for that
kind and compiles next the fastest one that still fits, so a wrong guess moves the search to
smaller candidates instead of repeating the mistake.
Candidates that differ only in their DCN split compile to the same program (`compile_plan`
compiles a one-level mesh of the same shape), so only the best-ranked split is compiled.

DCN splits: with more devices than one host (or TPU slice) joins by the fast link, the hosts are
the DCN granules; sequence x tensor must fit inside one host (they talk every layer), and the
host count is split between the stage, data and fsdp axes (`mesh.dcn_stage` x `mesh.dcn_data`
x `mesh.dcn_fsdp`). The analytic order counts the pipeline bubble (S-1)/(R*M+S-1) as idle
compute, the activations handed between stages as `stage` traffic, and the fsdp gathers as
often as the schedule makes them (once per gradient-accumulation microbatch; with
`pipeline_fsdp_gather=microbatch` once per pipeline iteration); the compiled estimate counts the
collectives XLA emits for them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from bignlp_jax.perf.plan_memory import analytic_bytes, memory_terms
from bignlp_jax.perf.plan_space import (
    GATHERS,
    REMATS,
    dcn_candidates,
    mesh_candidates,
    mesh_devices,
    microbatch_choices,
    schedules,
    with_candidate,
)

__all__ = ["REMATS", "Candidate", "analytic_bytes", "analytic_step_s", "dcn_candidates",
           "mesh_candidates", "microbatch_choices", "rank", "search"]

# Function-level imports: plan_command.py imports this module before its re-exec gives the
# process its devices, and jax may be imported only after that.

SCHEDULES_KEPT = 3  # fitting schedules per (mesh, remat, gather), fastest first


@dataclasses.dataclass
class Candidate:
    est_step_s: float  # analytic
    shape: dict[str, int]  # mesh sizes, repeats and DCN splits
    remat: str
    microbatches: int
    pipeline_microbatches: int | None
    gather: str
    memory: float  # analytic bytes per device

    def kind(self) -> tuple:
        """What the analytic memory model treats alike, so that its errors are shared within a
        kind: stages or none, repeats, the gather mode, and whether anything is recomputed."""
        staged = self.shape.get("stage", 1) > 1
        return (self.remat == "none", staged, self.shape.get("repeats", 1) > 1,
                staged and self.gather)

    def program(self) -> tuple:
        """What the compiled program depends on (not the DCN split)."""
        mesh = tuple(sorted((k, v) for k, v in self.shape.items() if not k.startswith("dcn_")))
        return mesh, self.remat, self.microbatches, self.pipeline_microbatches, self.gather

    def text(self) -> str:
        return _mesh_text({**self.shape, "pipeline_microbatches": self.pipeline_microbatches,
                           "gather": self.gather})


def analytic_step_s(cfg, shape: dict[str, int], remat: str, spec,
                    dcn: dict[str, int] | None = None, microbatches: int = 1,
                    pipeline_microbatches: int | None = None, gather: str = "step") -> float:
    """A rough step time used only to order candidates before compiling them: compute at peak
    plus each axis's traffic at its link's bandwidth (DCN for the axes split over hosts)."""
    from bignlp_jax.model.flops import flops_per_token
    from bignlp_jax.model.functional import abstract_params, count_params

    m = cfg.model
    n = mesh_devices(shape)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    recompute = 4 / 3 if remat == "full" else 1.0
    S, R = shape.get("stage", 1), shape.get("repeats", 1)
    M = (pipeline_microbatches or 2 * S) if S > 1 else 1
    iterations = R * M + S - 1
    bubble = (S - 1) / iterations
    compute = flops_per_token(m, cfg.data.seq_len) * tokens * recompute / n / (
        spec.peak_tflops * 1e12) / (1 - bubble)
    params = count_params(abstract_params(m)) / shape["tensor"] / S
    d, f, s, t = shape["data"], shape["fsdp"], shape.get("sequence", 1), shape["tensor"]
    act_bytes = 2 if m.dtype != "float32" else 4
    # fsdp: weights gathered for the forward, the backward (and the recomputed forward) of
    # every microbatch, or once per step for a stage with gather=step; the gradient is reduced
    # per microbatch, and with stages per pipeline iteration (XLA sums it inside the loop)
    layerwise = S == 1 or gather == "microbatch"
    gathers = (3 if remat == "full" else 2) * microbatches * (
        iterations if S > 1 and layerwise else 1)
    reduces = microbatches * (iterations if S > 1 else 1)
    comm = {"fsdp": (gathers * params * act_bytes + reduces * params * 4) * (f - 1) / f,
            "data": 2 * params / f * 4 * (d - 1) / d}  # all-reduce of the gradient shard
    rows = cfg.train.global_batch_size / (d * f)
    tokens = rows * cfg.data.seq_len / s  # per device
    comm["tensor"] = 8 * m.num_layers / S * tokens * m.hidden * act_bytes * (t - 1) / t
    # pipeline: one microbatch's activations to the next stage per iteration, forward and
    # backward (each stage's devices hold its rows whole over tensor)
    comm["stage"] = 2 * iterations * tokens / M * m.hidden * act_bytes if S > 1 else 0.0
    # context parallelism: K and V gathered per layer (forward, recompute) and dK/dV scattered
    kv = 2 * m.kv_heads * m.dim_per_head / t
    comm["sequence"] = (3 if remat == "full" else 2) * m.num_layers / S * tokens * s * kv * \
        act_bytes * (s - 1) / s
    if dcn is None:  # no DCN split known: every axis at the slower link once past one host
        slow = spec.cross_host_gbps if n > spec.host_size else spec.link_gbps
        return compute + sum(comm.values()) / (slow * 1e9)
    crossing = {"data": dcn["dcn_data"] > 1, "fsdp": dcn["dcn_fsdp"] > 1,
                "stage": dcn.get("dcn_stage", 1) > 1}
    return compute + sum(
        v / ((spec.cross_host_gbps if crossing.get(a) else spec.link_gbps) * 1e9)
        for a, v in comm.items())


def rank(cfg, n: int, spec, memory_gb: float) -> tuple[list[Candidate], list[dict]]:
    """Every candidate whose analytic memory fits, fastest analytic step first (one per
    compiled program), and what was left out and why."""
    gib = 2**30
    limit = memory_gb * gib
    candidates, skipped = [], []
    for shape in mesh_candidates(cfg, n):
        static = analytic_bytes(cfg, shape)
        plans = schedules(cfg, shape)
        for remat in REMATS:
            # without stages or without fsdp, when to gather makes no difference
            staged = shape.get("stage", 1) > 1 and shape["fsdp"] > 1
            for gather in GATHERS if staged else ("step",):
                sized = [(memory_terms(cfg, shape, remat, k, M, gather, static)["total"], k, M)
                         for k, M in plans]
                fitting = sorted((analytic_step_s(cfg, shape, remat, spec, None, k, M, gather),
                                  k, M, mem) for mem, k, M in sized if mem <= limit)
                if not fitting:
                    least = min(mem for mem, _, _ in sized)
                    skipped.append({"mesh": shape, "remat": remat, "gather": gather,
                                    "why": f"needs ~{least / gib:.0f} GiB analytically"})
                    continue
                for _, k, M, mem in fitting[:SCHEDULES_KEPT]:
                    for dcn in dcn_candidates(shape, n, spec.host_size):
                        candidates.append(Candidate(
                            analytic_step_s(cfg, shape, remat, spec, dcn, k, M, gather),
                            {**shape, **dcn}, remat, k, M, gather, mem))
    candidates.sort(key=lambda c: c.est_step_s)
    seen, unique = set(), []
    for c in candidates:  # other DCN splits of a program already queued: not compiled again
        if c.program() not in seen:
            seen.add(c.program())
            unique.append(c)
    return unique, skipped


def search(cfg, n: int, spec, memory_gb: float, budget_s: float, max_compiles: int, log):
    """Compile the best-ranked candidates (see the module docstring); (fitting plans fastest
    first by the compiled estimate, compiled plans that do not fit, candidates not compiled)."""
    from bignlp_jax.perf.plan import compile_plan

    limit = memory_gb * 2**30
    queue, skipped = rank(cfg, n, spec, memory_gb)
    log(f"{len(queue)} candidates fit analytically ({len(skipped)} too large); compiling the "
        f"fastest by the analytic estimate")
    results: list[dict[str, Any]] = []
    ratios: dict[tuple, float] = {}  # kind -> worst compiled / analytic memory so far
    start = time.perf_counter()
    while queue and len(results) < max_compiles and time.perf_counter() - start <= budget_s:
        # the fastest whose memory, corrected by what the compiles of its kind showed, still
        # fits (none: the smallest, the likeliest to fit)
        pick = next((c for c in queue if c.memory * ratios.get(c.kind(), 1.0) <= limit),
                    None) or min(queue, key=lambda c: c.memory)
        queue.remove(pick)
        log(f"compiling mesh {pick.text()} remat={pick.remat} microbatches="
            f"{pick.microbatches} (analytic {pick.memory / 2**30:.1f} GiB/device)")
        trial = with_candidate(cfg, pick.shape, pick.remat, pick.microbatches,
                               pick.pipeline_microbatches, pick.gather)
        plan = compile_plan(trial, spec=spec, memory_gb=memory_gb)
        plan["analytic_bytes_per_device"] = pick.memory
        ratio = plan["total_bytes_per_device"] / pick.memory
        ratios[pick.kind()] = max(ratio, ratios.get(pick.kind(), ratio))
        log(f"  -> {plan['total_gib_per_device']:.1f} GiB/device "
            f"({'fits' if plan['fits'] else 'does not fit'}), est {plan['est_step_s']:.2f}s/step,"
            f" compiled in {plan['compile_s']:.0f}s")
        results.append(plan)
    skipped += [{"mesh": c.shape, "remat": c.remat, "gather": c.gather,
                 "why": "not compiled (budget)"} for c in queue]
    fitting = sorted((r for r in results if r["fits"]), key=lambda r: r["est_step_s"])
    return fitting, [r for r in results if not r["fits"]], skipped


def _mesh_text(shape: dict[str, Any]) -> str:
    """'1x64x1x8 stage 2/r2 M4 gather/microbatch dcn stage/2,fsdp/64'."""
    text = "x".join(str(shape.get(k, 1)) for k in ("data", "fsdp", "sequence", "tensor"))
    if shape.get("stage", 1) > 1:  # stages in all, and the repeats of a circular schedule
        text = f"{text} stage {shape['stage']}" + (
            f"/r{shape['repeats']}" if shape.get("repeats", 1) > 1 else "")
        if shape.get("pipeline_microbatches"):
            text += f" M{shape['pipeline_microbatches']}"
        if shape.get("gather", "step") != "step":
            text += f" gather/{shape['gather']}"
    dcn = [f"{k[4:]}/{shape[k]}" for k in ("dcn_stage", "dcn_data", "dcn_fsdp")
           if shape.get(k, 1) > 1]
    return text + (f" dcn {','.join(dcn)}" if dcn else "")
