"""The candidates `plan --search` may compile: mesh shapes, DCN splits and step schedules.

A candidate is a mesh shape (stage x data x fsdp x sequence x tensor, with `repeats` for a
circular pipeline; `stage` counts all stages, mesh.stage x mesh.dcn_stage), a DCN split of the
hosts, a remat policy and a schedule: gradient-accumulation microbatches (`train.microbatches`)
and, with stages, pipeline microbatches (`train.pipeline_microbatches`, multiples of the stage
count) and when fsdp-sharded weights are gathered (`train.pipeline_fsdp_gather`: once per step,
or layer by layer for every microbatch). Which stage counts, repeats and pipeline microbatch
counts are valid is asked of `train/step.py::pipeline_spec`, the check training runs, so the
space follows whatever splits training accepts.
"""

from __future__ import annotations

import math
from typing import Any

from bignlp_jax.config.schema import context_split_problem
from bignlp_jax.errors import UserError

# Function-level imports: plan_command.py imports this module (through plan_search.py) before
# its re-exec gives the process its devices, and jax may be imported only after that.

REMATS = ("none", "dots", "full")
STAGES = (1, 2, 4, 8, 16)
REPEATS = (1, 2)
GATHERS = ("step", "microbatch")  # train.pipeline_fsdp_gather
MESH_KEYS = ("stage", "data", "fsdp", "sequence", "tensor")


def mesh_devices(shape: dict[str, int]) -> int:
    """Devices of a candidate (its mesh sizes; `repeats` and DCN splits are not axes)."""
    return math.prod(shape.get(k, 1) for k in MESH_KEYS)


def mesh_candidates(cfg, n: int) -> list[dict[str, int]]:
    """Mesh shapes over n devices whose splits divide the model, the batch and the rows, and
    (with stages) that have at least one pipeline schedule training accepts."""
    out = []
    for stage in STAGES:
        for repeats in REPEATS if stage > 1 else (1,):
            if n % stage:
                continue
            pipeline = {"stage": stage, "repeats": repeats} if stage > 1 else {}
            # stages run without context parallelism (the config refuses the pair)
            out += [{**pipeline, **shape} for shape in _inner_candidates(cfg, n // stage)
                    if (stage == 1 or shape["sequence"] == 1)
                    and schedules(cfg, {**pipeline, **shape})]
    return out


def _inner_candidates(cfg, n: int) -> list[dict[str, int]]:
    """data x fsdp x sequence x tensor shapes over the n devices of one stage."""
    m = cfg.model
    out = []
    for tensor in (1, 2, 4, 8):
        if n % tensor or any(x % tensor for x in (m.num_heads, m.kv_heads, m.mlp_dim,
                                                  m.vocab_size)):
            continue
        for sequence in (1, 2, 4, 8):
            if (n // tensor) % sequence or context_split_problem(cfg.data.seq_len, sequence):
                continue
            rest = n // (tensor * sequence)
            fsdp = 1
            while fsdp <= rest:
                if rest % fsdp == 0 and m.hidden % fsdp == 0 and \
                        cfg.train.global_batch_size % rest == 0:
                    out.append({"data": rest // fsdp, "fsdp": fsdp, "sequence": sequence,
                                "tensor": tensor})
                fsdp *= 2
    return out


def microbatch_choices(cfg, shape: dict[str, int]) -> list[int]:
    """Gradient-accumulation microbatch counts that split the global batch into whole rows on
    every data-parallel device."""
    B, dp = cfg.train.global_batch_size, shape["data"] * shape["fsdp"]
    return [k for k in range(1, B + 1) if B % k == 0 and (B // k) % dp == 0]


def schedules(cfg, shape: dict[str, int]) -> list[tuple[int, int | None]]:
    """(train.microbatches, train.pipeline_microbatches) pairs a candidate may run: None
    pipeline microbatches without stages; with stages, multiples S * 2^i of the stage count
    that `pipeline_spec` accepts for this mesh."""
    from bignlp_jax.train.step import pipeline_spec

    choices = microbatch_choices(cfg, shape)
    S = shape.get("stage", 1)
    if S == 1:
        return [(k, None) for k in choices]
    dp = shape["data"] * shape["fsdp"]
    out: list[tuple[int, int | None]] = []
    for k in choices:
        M = S
        while M * dp <= cfg.train.global_batch_size // k:
            try:
                pipeline_spec(with_candidate(cfg, shape, "full", k, M), dp)
                out.append((k, M))
            except UserError:
                pass  # training refuses this split or schedule
            M *= 2
    return out


def dcn_candidates(shape: dict[str, int], n: int, host_size: int) -> list[dict[str, int]]:
    """Ways to split the hosts (n / host_size of them) between stage, data and fsdp; [] when
    sequence x tensor does not fit in one host, [{1, 1}] when everything is one host."""
    hosts = n // host_size if n > host_size and n % host_size == 0 else 1
    if hosts == 1:
        return [{"dcn_data": 1, "dcn_fsdp": 1}]
    if shape["sequence"] * shape["tensor"] > host_size:
        return []
    out = []
    stage = shape.get("stage", 1)
    for p in range(1, hosts + 1):
        if hosts % p or stage % p:
            continue
        rest = hosts // p
        out += [{"dcn_data": rest // f, "dcn_fsdp": f, **({"dcn_stage": p} if p > 1 else {})}
                for f in range(1, rest + 1)
                if rest % f == 0 and shape["fsdp"] % f == 0 and shape["data"] % (rest // f) == 0]
    return out


def with_candidate(cfg, shape: dict[str, int], remat: str, microbatches: int,
                   pipeline_microbatches: int | None = None, gather: str = "step"):
    """`cfg` with the mesh sizes (and DCN splits) of `shape`, remat and the schedule; a
    shape's `stage` counts all stages (mesh.stage x mesh.dcn_stage)."""
    mesh: dict[str, Any] = {k: v for k, v in shape.items() if k in MESH_KEYS or
                            k.startswith("dcn_")}
    mesh["stage"] = shape.get("stage", 1) // shape.get("dcn_stage", 1)
    staged = shape.get("stage", 1) > 1
    train = {"microbatches": microbatches, "pipeline_repeats": shape.get("repeats", 1),
             "pipeline_microbatches": pipeline_microbatches if staged else None,
             "pipeline_fsdp_gather": gather}
    return cfg.model_copy(update={
        "mesh": cfg.mesh.model_copy(update=mesh),
        "model": cfg.model.model_copy(update={"remat": remat}),
        "train": cfg.train.model_copy(update=train),
    })
