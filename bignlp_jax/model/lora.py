"""Low-rank adapters (LoRA): shapes, logical axes, initialisation, the forward hook, merging.

A targeted projection y = x W gains (alpha / rank) * dropout(x) A B, with A [in, rank] and
B [rank, out]. Adapters live beside the base parameters under the params dict's `lora` key, one
{a, b} pair per target, stacked over layers like the blocks: {"q": {"a": [L, D, r],
"b": [L, r, K, G, H]}, ...}. Each carries the logical axes of the weight it adapts (the rank axis
is never sharded), so adapters shard like their layers on any mesh.

Our fused weights hold several projections: QKV [D, K, G+2, H] (per kv head: G query heads, the
key, the value) and gate/up [D, 2, F]. Each target gets its own adapter, added to its slice of
the fused output after the split (q, k, v) or before SwiGLU (gate, up), as Hugging Face `peft`
does for its separate q_proj/k_proj/v_proj/gate_proj/up_proj modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bignlp_jax.config import LoraConfig, ModelConfig
from bignlp_jax.model.matmul import project

KEY = "lora"  # where adapters sit in the params dict

# target -> (input shape + axes, output shape + axes), from the model config. The input of q, k,
# v, gate and up is the normed hidden state; o reads the attention heads; down the MLP hidden.


def _io(cfg: ModelConfig, target: str):
    D, K, H, F = cfg.hidden, cfg.kv_heads, cfg.dim_per_head, cfg.mlp_dim
    G, N = cfg.num_heads // K, cfg.num_heads
    embed = ((D,), ("embed",))
    table = {
        "q": (embed, ((K, G, H), ("kv_heads", None, "head_dim"))),
        "k": (embed, ((K, H), ("kv_heads", "head_dim"))),
        "v": (embed, ((K, H), ("kv_heads", "head_dim"))),
        "o": (((N, H), ("heads", "head_dim")), embed),
        "gate": (embed, ((F,), ("mlp",))),
        "up": (embed, ((F,), ("mlp",))),
        "down": (((F,), ("mlp",)), embed),
    }
    return table[target]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The static part of LoRA (hashable: it is closed over by jitted functions)."""

    rank: int
    scale: float
    dropout: float
    targets: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: LoraConfig) -> LoraSpec | None:
        """None when `lora.rank` is 0 (off)."""
        if not cfg.rank:
            return None
        return cls(cfg.rank, cfg.scale, cfg.dropout, tuple(cfg.targets))


class _Pair(nnx.Module):
    def __init__(self, cfg: ModelConfig, target: str, rank: int, rngs: nnx.Rngs):
        (in_shape, in_axes), (out_shape, out_axes) = _io(cfg, target)
        n_in = len(in_shape)
        # peft's default (kaiming uniform, a=sqrt(5)): uniform in +-1/sqrt(fan_in)
        init_a = nnx.initializers.variance_scaling(
            1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
        self.a = nnx.Param(init_a(rngs.params(), (*in_shape, rank), jnp.float32),
                           out_sharding=(*in_axes, None), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((rank, *out_shape), jnp.float32),
                           out_sharding=(None, *out_axes), eager_sharding=False)


class _Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: LoraSpec, rngs: nnx.Rngs):
        for t in spec.targets:
            setattr(self, t, _Pair(cfg, t, spec.rank, rngs))


class _Adapters(nnx.Module):
    def __init__(self, cfg: ModelConfig, spec: LoraSpec, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(rngs: nnx.Rngs) -> _Layer:
            return _Layer(cfg, spec, rngs)

        self.layers = make(rngs)


def _state(cfg: ModelConfig, spec: LoraSpec, key=None):
    if key is None:
        return nnx.state(nnx.eval_shape(lambda: _Adapters(cfg, spec, nnx.Rngs(0))), nnx.Param)
    return nnx.state(_Adapters(cfg, spec, nnx.Rngs(params=key)), nnx.Param)


def adapter_shapes(cfg: ModelConfig, spec: LoraSpec) -> dict[str, Any]:
    """ShapeDtypeStruct of every adapter: {target: {a, b}}, stacked over layers."""
    return nnx.to_pure_dict(_state(cfg, spec))["layers"]


def adapter_axes(cfg: ModelConfig, spec: LoraSpec) -> dict[str, Any]:
    """The logical axis names of every adapter, as tuples."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(_state(cfg, spec)))["layers"]
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_adapters(cfg: ModelConfig, spec: LoraSpec, key: jax.Array) -> dict[str, Any]:
    """Fresh adapters: A random, B zero (call inside jit to create them sharded)."""
    return nnx.to_pure_dict(_state(cfg, spec, key))["layers"]


@dataclasses.dataclass(frozen=True)
class LayerLora:
    """One layer's adapters as the layers see them: `delta(target, x)` is the scaled update
    to add to that target's projection output. key: dropout key (None: no dropout)."""

    spec: LoraSpec
    weights: dict[str, Any]
    key: jax.Array | None

    def has(self, target: str) -> bool:
        return target in self.weights

    def delta(self, target: str, x: jax.Array, kernel: str) -> jax.Array:
        a, b = self.weights[target]["a"], self.weights[target]["b"]
        n_in = a.ndim - 1
        if self.key is not None and self.spec.dropout > 0:
            keep = 1.0 - self.spec.dropout
            k = jax.random.fold_in(self.key, self.spec.targets.index(target))
            x = jnp.where(jax.random.bernoulli(k, keep, x.shape), x / keep, 0).astype(x.dtype)
        ins, outs = "ijk"[:n_in], "mno"[:b.ndim - 1]
        h = project(x, a, f"bt{ins},{ins}r->btr", kernel, contract=n_in)  # [B, T, r]
        y = project(h, b, f"btr,r{outs}->bt{outs}", kernel)
        return y * jnp.asarray(self.spec.scale, y.dtype)


def merge(cfg: ModelConfig, spec: LoraSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Base parameters with every adapter folded in, W + scale * A @ B in float32 (for export,
    evaluation and generation); the `lora` key is dropped."""
    adapters = params[KEY]
    base = {k: v for k, v in params.items() if k != KEY}
    attn, mlp = dict(base["blocks"]["attn"]), dict(base["blocks"]["mlp"])
    G = cfg.num_heads // cfg.kv_heads

    def product(t):
        a, b = adapters[t]["a"].astype(jnp.float32), adapters[t]["b"].astype(jnp.float32)
        n_in = a.ndim - 2  # minus layers and rank
        flat_a = a.reshape(a.shape[0], -1, a.shape[-1])
        flat_b = b.reshape(b.shape[0], b.shape[1], -1)
        w = jnp.einsum("lir,lro->lio", flat_a, flat_b) * spec.scale
        return w.reshape(*a.shape[:n_in + 1], *b.shape[2:])

    qkv = jnp.asarray(attn["qkv"])
    for t, col in (("q", slice(0, G)), ("k", G), ("v", G + 1)):
        if t in adapters:
            d = product(t)  # [L, D, K, G, H] or [L, D, K, H]
            qkv = qkv.at[:, :, :, col].add(d.astype(qkv.dtype))
    attn["qkv"] = qkv
    if "o" in adapters:
        attn["out"] = attn["out"] + product("o").astype(attn["out"].dtype)
    wi = jnp.asarray(mlp["wi"])
    if cfg.mlp == "swiglu":
        for t, col in (("gate", 0), ("up", 1)):
            if t in adapters:
                wi = wi.at[:, :, col].add(product(t).astype(wi.dtype))
    elif "up" in adapters:
        wi = wi + product("up").astype(wi.dtype)
    mlp["wi"] = wi
    if "down" in adapters:
        mlp["wo"] = mlp["wo"] + product("down").astype(mlp["wo"].dtype)
    blocks = {**base["blocks"], "attn": attn, "mlp": mlp}
    return {**base, "blocks": blocks}
