"""`bignlp-jax plan --search`: which mesh, remat policy and microbatch count to compile.

Tries mesh shapes (stage x data x fsdp x sequence x tensor; with stages, GPipe and a 2-repeat
circular schedule of 2 x stages microbatches), DCN splits and remat policies: candidates are
filtered by divisibility and by the analytic parameter + optimizer bytes (`model/flops.py`, what
`describe` prints), ordered by an analytic estimate, then compiled one by one within
`--time-budget`; the ones that fit are ranked by the compiled estimate of step time (`plan.py`).

DCN splits: with more devices than one host (or TPU slice) joins by the fast link, the hosts are
the DCN granules; sequence x tensor must fit inside one host (they talk every layer), and the
host count is split between the stage, data and fsdp axes (`mesh.dcn_stage` x `mesh.dcn_data`
x `mesh.dcn_fsdp`). The analytic order counts the pipeline bubble (S-1)/(R*M+S-1) as idle
compute and the activations handed between stages as `stage` traffic; the compiled estimate
counts the collective-permutes XLA emits for them.
"""

from __future__ import annotations

import math
import time

from bignlp_jax.config.schema import context_split_problem

# Function-level imports: plan_command.py imports this module before its re-exec gives the
# process its devices, and jax may be imported only after that.

REMATS = ("none", "dots", "full")
STAGES = (1, 2, 4, 8, 16)
MESH_KEYS = ("stage", "data", "fsdp", "sequence", "tensor")


def _devices(shape: dict[str, int]) -> int:
    """Devices of a candidate (its mesh sizes; `repeats` and DCN splits are not axes)."""
    return math.prod(shape.get(k, 1) for k in MESH_KEYS)


def _pipeline(shape: dict[str, int]) -> tuple[int, int, int]:
    """(stages, microbatches, repeats) of a candidate: 2 x stages microbatches, the default."""
    S = shape.get("stage", 1)
    return S, (2 * S if S > 1 else 1), shape.get("repeats", 1)


def analytic_bytes(cfg, shape: dict[str, int]) -> float:
    """Parameters + AdamW moments per device, as `describe` computes them."""
    from bignlp_jax.model.flops import describe

    info = describe(cfg, shape)
    return info["param_bytes_per_device"] + info["optimizer_bytes_per_device"]


def mesh_candidates(cfg, n: int) -> list[dict[str, int]]:
    """Mesh shapes over n devices whose splits divide the model, the batch and the rows."""
    m = cfg.model
    out = []
    for stage in STAGES:
        for repeats in (1, 2) if stage > 1 else (1,):
            if n % stage or m.num_layers % (stage * repeats):
                continue
            pipeline = {"stage": stage, "repeats": repeats} if stage > 1 else {}
            # stages run without context parallelism (the config refuses the pair)
            out += [{**pipeline, **shape} for shape in _inner_candidates(cfg, n // stage)
                    if (stage == 1 or shape["sequence"] == 1)
                    and cfg.train.global_batch_size % (
                        shape["data"] * shape["fsdp"] * _pipeline(pipeline)[1]) == 0]
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


def analytic_step_s(cfg, shape: dict[str, int], remat: str, spec,
                    dcn: dict[str, int] | None = None) -> float:
    """A rough step time used only to order candidates before compiling them: compute at peak
    plus each axis's traffic at its link's bandwidth (DCN for the axes split over hosts)."""
    from bignlp_jax.model.flops import flops_per_token
    from bignlp_jax.model.functional import abstract_params, count_params

    m = cfg.model
    n = _devices(shape)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    recompute = 4 / 3 if remat == "full" else 1.0
    S, M, R = _pipeline(shape)
    bubble = (S - 1) / (R * M + S - 1)
    compute = flops_per_token(m, cfg.data.seq_len) * tokens * recompute / n / (
        spec.peak_tflops * 1e12) / (1 - bubble)
    params = count_params(abstract_params(m)) / shape["tensor"] / S
    d, f, s, t = shape["data"], shape["fsdp"], shape.get("sequence", 1), shape["tensor"]
    act_bytes = 2 if m.dtype != "float32" else 4
    gathers = 3 if remat == "full" else 2  # forward, backward (and the recomputed forward)
    comm = {"fsdp": (gathers * params * act_bytes + params * 4) * (f - 1) / f,  # gather+scatter
            "data": 2 * params / f * 4 * (d - 1) / d}  # all-reduce of the gradient shard
    rows = cfg.train.global_batch_size / (d * f)
    tokens = rows * cfg.data.seq_len / s  # per device
    comm["tensor"] = 8 * m.num_layers / S * tokens * m.hidden * act_bytes * (t - 1) / t
    # pipeline: one microbatch's activations to the next stage per iteration, forward and
    # backward (each stage's devices hold its rows whole over tensor)
    comm["stage"] = 2 * (R * M + S - 1) * tokens / M * m.hidden * act_bytes if S > 1 else 0.0
    # context parallelism: K and V gathered per layer (forward, recompute) and dK/dV scattered
    kv = 2 * m.kv_heads * m.dim_per_head / t
    comm["sequence"] = gathers * m.num_layers / S * tokens * s * kv * act_bytes * (s - 1) / s
    if dcn is None:  # no DCN split known: every axis at the slower link once past one host
        slow = spec.cross_host_gbps if n > spec.host_size else spec.link_gbps
        return compute + sum(comm.values()) / (slow * 1e9)
    crossing = {"data": dcn["dcn_data"] > 1, "fsdp": dcn["dcn_fsdp"] > 1,
                "stage": dcn.get("dcn_stage", 1) > 1}
    return compute + sum(
        v / ((spec.cross_host_gbps if crossing.get(a) else spec.link_gbps) * 1e9)
        for a, v in comm.items())


def activation_bytes_per_row(cfg, shape: dict[str, int], remat: str) -> float:
    """Rough activation bytes one batch row keeps for the backward pass (Korthikanti et al.
    2022: 34*T*D + 5*heads*T^2 per layer in 16-bit, the tensor-parallel part divided by t),
    plus the logits; used only to rule out candidates and to guess how many microbatches one
    needs before compiling it."""
    m = cfg.model
    T, D, t = cfg.data.seq_len, m.hidden, shape["tensor"]
    L = m.num_layers / shape.get("stage", 1)  # a stage keeps its own layers' activations
    # context parallelism splits every activation of a row (and its scores) sequence ways
    T = T / shape.get("sequence", 1)
    scale = 2 if m.dtype == "float32" else 1
    layer = T * D * (10 + 24 / t) + 5 * m.num_heads * T * cfg.data.seq_len / t
    if m.kernel_attention == "cudnn":  # flash attention keeps no T x T scores
        layer -= 5 * m.num_heads * T * cfg.data.seq_len / t
    logits = 3 * T * m.vocab_size / t * 4
    if remat == "full":
        return (2 * T * D * L + layer) * scale + logits
    return layer * L * (0.6 if remat == "dots" else 1.0) * scale + logits


def microbatch_choices(cfg, shape: dict[str, int]) -> list[int]:
    """Microbatch counts that split the global batch into whole rows on every device (and,
    with stages, into whole pipeline microbatches)."""
    B, dp = cfg.train.global_batch_size, shape["data"] * shape["fsdp"] * _pipeline(shape)[1]
    return [k for k in range(1, B + 1) if B % k == 0 and (B // k) % dp == 0]


def search(cfg, n: int, spec, memory_gb: float, budget_s: float, max_compiles: int, log):
    from bignlp_jax.perf.plan import compile_plan

    gib = 2**30
    memory = memory_gb * gib * 0.9  # leave room for what the estimates miss
    candidates, skipped = [], []
    for shape in mesh_candidates(cfg, n):
        # parameters + AdamW moments, and a float32 gradient the size of the parameters
        static = analytic_bytes(cfg, shape) * 4 / 3
        rows = cfg.train.global_batch_size / (shape["data"] * shape["fsdp"])
        least = microbatch_choices(cfg, shape)[-1]
        for remat in REMATS:
            need = static + rows / least * activation_bytes_per_row(cfg, shape, remat)
            if need > memory:
                skipped.append({"mesh": shape, "remat": remat,
                                "why": f"needs ~{need / gib:.0f} GiB analytically"})
                continue
            for dcn in dcn_candidates(shape, n, spec.host_size):
                candidates.append((analytic_step_s(cfg, shape, remat, spec, dcn),
                                   {**shape, **dcn}, remat, static))
    candidates.sort(key=lambda c: c[0])

    results, start, compiles = [], time.perf_counter(), 0

    def attempt(shape, remat, micro):
        nonlocal compiles
        compiles += 1
        trial = _with(cfg, shape, remat, micro)
        log(f"compiling mesh {_mesh_text(shape)} remat={remat} microbatches={micro}")
        plan = compile_plan(trial, spec=spec, memory_gb=memory_gb)
        log(f"  -> {plan['total_gib_per_device']:.1f} GiB/device "
            f"({'fits' if plan['fits'] else 'does not fit'}), est {plan['est_step_s']:.2f}s/step,"
            f" compiled in {plan['compile_s']:.0f}s")
        results.append(plan)
        return plan

    for _estimate, shape, remat, static in candidates:
        if compiles >= max_compiles or time.perf_counter() - start > budget_s:
            skipped.append({"mesh": shape, "remat": remat, "why": "not compiled (budget)"})
            continue
        choices = microbatch_choices(cfg, shape)
        rows = cfg.train.global_batch_size / (shape["data"] * shape["fsdp"])
        room = memory - static
        per_row = activation_bytes_per_row(cfg, shape, remat)
        micro = next((k for k in choices if rows / k * per_row <= room), choices[-1])
        plan = attempt(shape, remat, micro)
        if not plan["fits"] and compiles < max_compiles:
            # Temporaries scale with rows per microbatch: retry once with enough microbatches.
            grads = plan["param_bytes_per_device"]  # part of the temporaries, not per row
            room = memory - plan["argument_bytes_per_device"] - grads
            need = (plan["temp_bytes_per_device"] - grads) / max(room, 1.0) * micro
            bigger = [k for k in choices if k >= need and k > micro]
            if bigger and room > 0:
                attempt(shape, remat, bigger[0])
    fitting = sorted((r for r in results if r["fits"]), key=lambda r: r["est_step_s"])
    return fitting, [r for r in results if not r["fits"]], skipped


def _with(cfg, shape: dict[str, int], remat: str, microbatches: int):
    """`cfg` with the mesh sizes (and DCN splits) of `shape`, remat and microbatches; a
    shape's `stage` counts all stages (mesh.stage x mesh.dcn_stage)."""
    mesh = {k: v for k, v in shape.items() if k != "repeats"}
    mesh["stage"] = shape.get("stage", 1) // shape.get("dcn_stage", 1)
    S, M, R = _pipeline(shape)
    train = {"microbatches": microbatches, "pipeline_repeats": R,
             "pipeline_microbatches": M if S > 1 else None}
    return cfg.model_copy(update={
        "mesh": cfg.mesh.model_copy(update=mesh),
        "model": cfg.model.model_copy(update={"remat": remat}),
        "train": cfg.train.model_copy(update=train),
    })


def _mesh_text(shape: dict[str, int]) -> str:
    text = "x".join(str(shape.get(k, 1)) for k in ("data", "fsdp", "sequence", "tensor"))
    if shape.get("stage", 1) > 1:  # stages in all, and the repeats of a circular schedule
        text = f"{text} stage {shape['stage']}" + (
            f"/r{shape['repeats']}" if shape.get("repeats", 1) > 1 else "")
    dcn = [f"{k[4:]}/{shape[k]}" for k in ("dcn_stage", "dcn_data", "dcn_fsdp")
           if shape.get(k, 1) > 1]
    return text + (f" dcn {','.join(dcn)}" if dcn else "")
