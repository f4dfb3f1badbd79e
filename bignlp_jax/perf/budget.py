"""`plan --budget`: a FLOPs budget -> model, tokens, batch, learning rate, schedule and a mesh.

Steps: the law gives N and D (scaling_law.py); a shape of about N parameters in the family's
proportions (budget_shape.py); DeepSeek LLM's fits give the batch (rounded to a multiple of the
device count, so every mesh the search tries divides it) and the peak learning rate, with their
step decay; `plan --search` (plan_search.py) compiles mesh, remat and microbatch candidates for
the devices and keeps the fastest that fits. The result is a config tree that `describe`, `plan`
and `train` load as is.

Past MAX_SIMULATED_DEVICES the search compiles for a slice of the devices with the batch cut by
the same factor, then multiplies the data axis back up: extra data-parallel replicas change
neither the per-device memory nor the per-device compute of a step.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bignlp_jax import storage
from bignlp_jax.config import Config, load_config
from bignlp_jax.config.loader import CONFIG_ROOT, validate
from bignlp_jax.errors import UserError
from bignlp_jax.model.flops import flops_per_token
from bignlp_jax.model.functional import abstract_params, count_params
from bignlp_jax.perf.budget_inputs import BYTES_PER_PARAM, CPU, Inputs, simulated_devices
from bignlp_jax.perf.budget_shape import DEFAULT_VOCAB, choose_shape, closest_preset
from bignlp_jax.perf.plan_search import search
from bignlp_jax.perf.scaling_law import (
    DEEPSEEK_SOURCE,
    WARMUP_STEPS,
    compute_optimal,
    decay_gamma,
    optimal_batch_tokens,
    optimal_lr,
    step_boundaries,
)

WARMUP_SHARE = 0.05  # warmup at most this share of a short run's steps
HEADER_START = "# Written by `bignlp-jax plan --budget`"


def size_text(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def batch_rows(flops: float, seq_len: int, devices: int) -> tuple[int, str]:
    """DeepSeek's batch in rows of seq_len, rounded to a multiple of as many devices as keeps
    it within 10% of the fit: every mesh whose data x fsdp divides that multiple can split it.
    Never to fewer than devices / 64 (tensor x sequence parallelism covers at most 64)."""
    rows = optimal_batch_tokens(flops) / seq_len
    floor = max(1, devices // 64)
    multiple = devices
    while multiple > floor and multiple % 2 == 0 and \
            abs(max(1, round(rows / multiple)) * multiple / rows - 1) > 0.10:
        multiple //= 2
    rounded = max(1, round(rows / multiple)) * multiple
    note = f"{rows:,.1f} rows fitted, rounded to a multiple of {multiple}"
    if abs(rounded / rows - 1) > 0.10:
        note += f" ({rounded / rows - 1:+.0%}: fewer rows than the devices can split)"
    return rounded, note


def config_tree(inp: Inputs, model, rows: int, steps: int, lr: float) -> dict:
    """The config to write: model, mesh (the search fills it in), data, train, optimizer."""
    if inp.spec.name == CPU:  # float32 and no recompute: what runs fastest on a CPU
        model = model.model_copy(update={"dtype": "float32", "remat": "none"})
    size = size_text(count_params(abstract_params(model))).lower()
    model = model.model_copy(update={"name": f"budget_{model.family}_{size}"})
    shape = model.model_dump(mode="json", exclude_defaults=True)
    warmup = min(WARMUP_STEPS, max(1, round(WARMUP_SHARE * steps)))
    return {
        "model": {"name": model.name, "family": model.family, **shape},
        "mesh": {"data": -1},
        "data": {"seq_len": inp.seq_len},
        "train": {"steps": steps, "global_batch_size": rows, "log_every": max(1, steps // 200)},
        "optimizer": {"lr": float(f"{lr:.4g}"), "warmup_steps": warmup, "schedule": "step",
                      "gamma": round(decay_gamma(), 6), "boundaries": step_boundaries(steps),
                      "b1": 0.9, "b2": 0.95, "weight_decay": 0.1, "clip_norm": 1.0},
        "run": {"dir": f"runs/{model.name}"},
    }


def _with_plan(tree: dict, plan: dict, scale: int, devices: int, host_size: int) -> dict:
    """`tree` with the plan's mesh (data axis x `scale`), DCN split, remat and microbatches."""
    # data -1 ("the devices left over", planned as plan's data x scale): the config also
    # loads for describe/train on other device counts
    mesh = {"data": -1,
            **{k: plan["mesh"][k] for k in ("fsdp", "sequence", "tensor")}}
    train = {**tree["train"], "microbatches": plan["microbatches"]}
    dcn_fsdp, dcn_stage = plan["dcn"].get("fsdp", 1), plan["dcn"].get("stage", 1)
    pipeline = plan.get("pipeline")
    if pipeline:  # the stage axis spans mesh.stage x mesh.dcn_stage devices
        mesh["stage"] = pipeline["stages"] // dcn_stage
        train.update(pipeline_repeats=pipeline["repeats"],
                     pipeline_microbatches=pipeline["microbatches"],
                     pipeline_fsdp_gather=plan.get("pipeline_fsdp_gather", "step"))
    hosts = devices // host_size if devices > host_size and devices % host_size == 0 else 1
    if hosts > 1:
        mesh.update(dcn_data=hosts // (dcn_fsdp * dcn_stage), dcn_fsdp=dcn_fsdp)
        if dcn_stage > 1:
            mesh["dcn_stage"] = dcn_stage
    return {**tree, "mesh": mesh,
            "model": {**tree["model"], "remat": plan["remat"]},
            "train": train}


def plan_budget(inp: Inputs, time_budget: float, max_compiles: int, log) -> dict:
    """Everything `plan --budget` reports, and the config tree to write."""
    opt = compute_optimal(inp.flops, inp.law)
    vocab = inp.vocab or DEFAULT_VOCAB[inp.family]
    shape = choose_shape(inp.family, opt.params, vocab, inp.seq_len)
    rows, batch_note = batch_rows(inp.flops, inp.seq_len, inp.devices)
    steps = max(1, round(opt.tokens / (rows * inp.seq_len)))
    lr = optimal_lr(inp.flops)
    tree = config_tree(inp, shape.model, rows, steps, lr)
    cfg = validate(tree)

    n_sim = simulated_devices(inp.devices)
    scale = inp.devices // n_sim
    trial = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"global_batch_size": rows // scale})})
    log(f"searching meshes for {size_text(shape.params)} parameters on {n_sim} simulated "
        f"devices" + (f" (x{scale} data-parallel replicas)" if scale > 1 else ""))
    fitting, too_big, skipped = search(trial, n_sim, inp.spec, inp.memory_gb, time_budget,
                                       max_compiles, log)
    best = fitting[0] if fitting else min(too_big, key=lambda r: r["total_bytes_per_device"],
                                          default=None)
    if best is not None:
        tree = _with_plan(tree, best, scale, inp.devices, inp.spec.host_size)
        cfg = validate(tree)

    tokens_per_step = rows * inp.seq_len
    fpt = flops_per_token(cfg.model, inp.seq_len)
    peak = inp.spec.peak_tflops * 1e12
    step_at_mfu = fpt * tokens_per_step / (inp.devices * peak * inp.mfu)
    preset = closest_preset(inp.family, shape.params, CONFIG_ROOT / "models")
    emb = vocab * cfg.model.hidden * (1 if cfg.model.tie_embeddings else 2)
    return {
        "inputs": {"flops": inp.flops, "how": inp.how, "device": inp.spec.name,
                   "peak_tflops": inp.spec.peak_tflops, "devices": inp.devices, "days": inp.days,
                   "mfu": inp.mfu, "mfu_source": inp.mfu_source, "family": inp.family,
                   "law": inp.law.name, "seq_len": inp.seq_len, "vocab": vocab,
                   "device_memory_gb": inp.memory_gb},
        "law": {"params": opt.params, "tokens": opt.tokens, "tokens_per_param":
                opt.tokens_per_param, "loss": opt.loss, "source": inp.law.source,
                "E": inp.law.E, "A": inp.law.A, "B": inp.law.B, "a": inp.law.a, "b": inp.law.b},
        "model": {"params": shape.params, "error": shape.error,
                  "embedding_share": emb / shape.params, "layers": cfg.model.num_layers,
                  "hidden": cfg.model.hidden, "heads": cfg.model.num_heads,
                  "kv_heads": cfg.model.kv_heads, "head_dim": cfg.model.dim_per_head,
                  "mlp_dim": cfg.model.mlp_dim, "vocab": vocab,
                  "closest_preset": preset[0] if preset else None,
                  "closest_preset_params": preset[1] if preset else None,
                  "loss_at_shape": inp.law.loss(shape.params, steps * tokens_per_step)},
        "batch": {"rows": rows, "tokens": tokens_per_step, "fitted_tokens":
                  optimal_batch_tokens(inp.flops), "note": batch_note, "source": DEEPSEEK_SOURCE},
        "train": {"steps": steps, "tokens": steps * tokens_per_step, "lr": tree["optimizer"]["lr"],
                  "warmup_steps": tree["optimizer"]["warmup_steps"],
                  "boundaries": tree["optimizer"]["boundaries"],
                  "gamma": tree["optimizer"]["gamma"]},
        "mesh": {"best": best, "fits": bool(fitting), "n_fitting": len(fitting),
                 # none fits: every compiled plan was too big and every other candidate too
                 # big by the analytic estimate (not merely left out by the search's bounds)
                 "none_fits": not fitting and (bool(too_big) or bool(skipped)) and all(
                     s["why"].startswith("needs") for s in skipped),
                 "n_compiled": len(fitting) + len(too_big), "n_skipped": len(skipped),
                 "simulated_devices": n_sim, "data_scale": scale,
                 "config_mesh": {**tree["mesh"], "data": best["mesh"]["data"] * scale}
                 if best else tree["mesh"],  # the config's mesh, its data axis as planned
                 "largest_fitting_params": inp.devices * 0.9 * inp.memory_gb * 2**30
                 / BYTES_PER_PARAM},
        "time": {"flops_per_token": fpt, "step_s_at_mfu": step_at_mfu,
                 "days_at_mfu": steps * step_at_mfu / 86400,
                 "days_plan_estimate": steps * best["est_step_s"] / 86400 if best else None,
                 "plan_est_mfu": best["est_mfu"] if best else None,
                 "budget_days": inp.days},
        "config": tree,
    }


def header(result: dict) -> str:
    """The comment block on top of a written config: the inputs and the law."""
    i, law = result["inputs"], result["law"]
    lines = [
        f"{HEADER_START[2:]}: {i['how']} = {i['flops']:.4g} FLOPs "
        f"(MFU {i['mfu']:g}, {i['mfu_source']}).",
        f"Law {i['law']}: L(N, D) = {law['E']} + {law['A']}/N^{law['a']} + {law['B']}/D^{law['b']}"
        f", C = 6ND -> N = {law['params']:.4g}, D = {law['tokens']:.4g} "
        f"({law['tokens_per_param']:.1f} tokens/parameter), predicted loss {law['loss']:.3f}.",
        f"  {law['source']}.",
        f"Batch and learning rate: {result['batch']['source']}; step decay x0.316 at 80% and "
        "x0.1 at 90% of the steps.",
        f"Mesh planned for {i['devices']} x {i['device']} with {i['device_memory_gb']:.3g} GiB "
        "each" + (" (NO PLAN FITS: this mesh is the smallest compiled)"
                  if result["mesh"]["none_fits"] else "" if result["mesh"]["fits"] else
                  " (no mesh compiled within the search's bounds)") + f"; family {i['family']}, "
        f"seq_len {i['seq_len']}, vocabulary {i['vocab']}.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def write_config(result: dict, path: str) -> Config:
    """Write the config (header comment + YAML) and return it as loaded back. An existing file
    is replaced only if an earlier `plan --budget` wrote it."""
    target = storage.path(path)
    if target.exists() and not target.read_text().startswith(HEADER_START):
        raise UserError(f"--out {path} exists and was not written by `plan --budget`; "
                        "choose another file or remove it")
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(header(result) + yaml.safe_dump(result["config"], sort_keys=False))
    return load_config(str(path), [])


def check_tokens(result: dict) -> float:
    """Relative gap between the tokens the config trains on and the law's D."""
    return result["train"]["tokens"] / result["law"]["tokens"] - 1
