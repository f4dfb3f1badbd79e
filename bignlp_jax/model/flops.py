"""Analytic model figures: parameter count, training FLOPs per token, memory per device.

Nothing is allocated: shapes come from `jax.eval_shape` of the model, and per-device sizes from
the rules table applied to a mesh *shape* (no devices needed, so a 175B model on a 512-device mesh
can be described from a laptop).

Training FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):
    6 * N + 12 * L * H * Q * T
N = parameters taking part in matmuls = all parameters minus the input embedding table and learned
position table (with tied embeddings the table is the output head, so it is counted once);
L layers, H query heads, Q head dim, T sequence length. The second term is attention's
QK^T and AV matmuls (forward + backward = 3x the 4*L*H*Q*T forward FLOPs).
"""

from __future__ import annotations

import math

import jax

from bignlp_jax.config import Config, ModelConfig
from bignlp_jax.model.functional import abstract_params, count_params, param_axes
from bignlp_jax.model.lora import LoraSpec, adapter_axes, adapter_shapes
from bignlp_jax.model.pipeline import PipelineSpec, group_layers
from bignlp_jax.parallel.rules import logical_to_spec, rules_table

# AdamW keeps two float32 moments per parameter.
ADAM_STATE_BYTES_PER_PARAM = 8


def non_embedding_params(cfg: ModelConfig) -> int:
    shapes = abstract_params(cfg)
    n = count_params(shapes)
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.hidden  # the input table does no matmul; the head does
    if cfg.position == "learned":
        n -= cfg.max_seq_len * cfg.hidden
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """PaLM model FLOPs for one training token (forward + backward), no rematerialisation."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    return 6.0 * non_embedding_params(cfg) + attention


def shard_factor(shape, axes, rules, mesh_shape: dict[str, int]) -> int:
    """How many pieces one array is split into under `rules` on a mesh of `mesh_shape`."""
    spec = logical_to_spec(axes, rules)
    factor = 1
    for size, mesh_axes in zip(shape, spec):
        if mesh_axes is None:
            continue
        for a in (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes:
            if size % mesh_shape.get(a, 1) == 0:  # an axis the shape leaves out has size 1
                factor *= mesh_shape.get(a, 1)
    return factor


def param_bytes_per_device(cfg: ModelConfig, rules_name: str, mesh_shape: dict[str, int],
                           bytes_per_param: int = 4) -> float:
    rules = rules_table(rules_name, cfg.num_layers, mesh_shape.get("stage", 1))
    return _bytes_per_device(abstract_params(cfg), param_axes(cfg), rules, mesh_shape,
                             bytes_per_param)


def _bytes_per_device(shapes, axes, rules: dict, mesh_shape: dict[str, int],
                      bytes_per_param: int = 4) -> float:
    leaves = jax.tree.leaves(shapes)
    axis_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    return sum(
        math.prod(s.shape) * bytes_per_param / shard_factor(s.shape, a, rules, mesh_shape)
        for s, a in zip(leaves, axis_leaves)
    )


def pipeline_split(cfg: Config) -> dict | None:
    """How the layers split into pipeline stages (model/pipeline.py: S*R groups of K layer
    slots, identity slots where L does not fill them), and the schedule's bubble (None: no
    stages)."""
    S, R = cfg.mesh.stages, cfg.train.pipeline_repeats
    if S == 1:
        return None
    M = cfg.train.pipeline_microbatches or 2 * S
    L = cfg.model.num_layers
    groups = group_layers(L, S, R)
    per_stage = [sum(groups[r * S + s] for r in range(R)) for s in range(S)]
    return {"stages": S, "repeats": R, "microbatches": M, "layers_per_group": max(groups),
            "layers_per_stage": per_stage, "identity_slots": S * R * max(groups) - L,
            "bubble": PipelineSpec(S, M, R).bubble}


def pipeline_text(split: dict) -> str:
    """'4 stages x 2 repeat(s) of 8 layers (16 per stage), 8 microbatches: bubble 15.8%'; an
    uneven split lists the layers of every stage and the identity slots' extra compute."""
    per_stage, pad = split["layers_per_stage"], split["identity_slots"]
    if pad:
        layers = sum(per_stage)
        size = (f"{split['layers_per_group']} layer slots ({','.join(map(str, per_stage))} "
                f"layers per stage; {pad} identity slot{'s' * (pad > 1)}: "
                f"{pad / layers:.1%} extra layer compute)")
    else:
        size = f"{split['layers_per_group']} layers ({per_stage[0]} per stage)"
    return (f"{split['stages']} stages x {split['repeats']} repeat(s) of {size}, "
            f"{split['microbatches']} microbatches: bubble (S-1)/(R*M+S-1) = "
            f"{split['bubble']:.1%}")


def describe(cfg: Config, mesh_shape: dict[str, int]) -> dict:
    """Headline figures for `bignlp-jax describe`."""
    m = cfg.model
    total = count_params(abstract_params(m))
    params_bytes = param_bytes_per_device(m, cfg.mesh.rules, mesh_shape)
    optimizer_bytes = params_bytes * ADAM_STATE_BYTES_PER_PARAM / 4
    lora = {}
    spec = LoraSpec.from_config(cfg.lora)
    if spec is not None:  # frozen base + adapters; AdamW moments for the adapters only
        shapes = adapter_shapes(m, spec)
        rules = rules_table(cfg.mesh.rules, m.num_layers, mesh_shape.get("stage", 1))
        adapter_bytes = _bytes_per_device(shapes, adapter_axes(m, spec), rules, mesh_shape)
        params_bytes += adapter_bytes
        optimizer_bytes = adapter_bytes * ADAM_STATE_BYTES_PER_PARAM / 4
        lora = {"lora_parameters": count_params(shapes)}
    return {**lora,
        "model": m.name,
        "parameters": total,
        "non_embedding_parameters": non_embedding_params(m),
        "flops_per_token": flops_per_token(m, cfg.data.seq_len),
        "seq_len": cfg.data.seq_len,
        "mesh": dict(mesh_shape),
        "param_bytes_per_device": params_bytes,
        "optimizer_bytes_per_device": optimizer_bytes,
        "param_plus_optimizer_gib_per_device": (params_bytes + optimizer_bytes) / 2**30,
        "pipeline": pipeline_split(cfg),
    }
