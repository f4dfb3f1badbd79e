"""Transformer layers in Flax NNX: embedding, norm, attention, MLP.

Each parameter is created with the logical names of its axes (`out_sharding` metadata); the rules
table in `parallel/rules.py` maps them to the mesh. Layers whose ops have optimised kernels take
the resolved `Kernels` (model/kernels.py) as an explicit argument. Shapes use B batch, T query
length, S key length, D hidden, K kv heads, G query heads per kv head, H head dim, F mlp dim,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bignlp_jax.model.attention import apply_rope, dot_product_attention
from bignlp_jax.model.context_attention import context_attention, sequence_parallel
from bignlp_jax.model.glue import split_qkv, swiglu
from bignlp_jax.model.kernels import Kernels
from bignlp_jax.model.lora import LayerLora
from bignlp_jax.model.matmul import project
from bignlp_jax.parallel.rules import constrain

Initializer = nnx.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape, axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter drawn by `init`, tagged with the logical names of its axes."""
    return _tagged(init(rngs.params(), shape, jnp.float32), axes)


def zeros(shape, axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter of zeros (biases), tagged like `param`; it needs no random key."""
    return _tagged(jnp.zeros(shape, jnp.float32), axes)


def ones(shape, axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter of ones (norm scales), tagged like `param`."""
    return _tagged(jnp.ones(shape, jnp.float32), axes)


def _tagged(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Embed(nnx.Module):
    """Token embedding; `attend` reuses it as a tied output head."""

    def __init__(self, vocab_size: int, hidden: int, *, init_std: float, kernels: Kernels,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.kernels = kernels
        self.embedding = param(rngs, init, (vocab_size, hidden), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embedding[...].astype(dtype), tokens, axis=0)  # [B, T, D]

    def attend(self, x: jax.Array) -> jax.Array:
        w = self.embedding[...].astype(x.dtype).T  # [D, V]
        return project(x, w, "btd,dv->btv", self.kernels.projection, float32_out=True)


class Norm(nnx.Module):
    """LayerNorm (GPT) or RMSNorm (Llama), computed in float32."""

    def __init__(self, dim: int, *, kind: str, eps: float, use_bias: bool):
        self.kind, self.eps = kind, eps
        self.scale = ones((dim,), ("norm",))
        with_bias = use_bias and kind == "layernorm"
        self.bias = zeros((dim,), ("norm",)) if with_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        if self.kind == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        h = h * self.scale[...]
        if self.bias is not None:
            h = h + self.bias[...]
        return h.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head or grouped-query causal self-attention with one fused QKV projection.

    The fused weight is [D, K, G+2, H]: for each kv head, its G query heads, then its key, then its
    value. Splitting it never crosses a `kv_heads` shard, so tensor parallelism needs no gather.
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 use_bias: bool, rope: bool, init_std: float,
                 out_std: float, kernels: Kernels, rngs: nnx.Rngs):
        self.K, self.G, self.H = num_kv_heads, num_heads // num_kv_heads, head_dim
        self.rope, self.kernels = rope, kernels
        qkv_shape = (hidden, self.K, self.G + 2, head_dim)
        self.qkv = param(rngs, nnx.initializers.normal(init_std), qkv_shape,
                         ("embed", "kv_heads", None, "head_dim"))
        self.out = param(rngs, nnx.initializers.normal(out_std), (num_heads, head_dim, hidden),
                         ("heads", "head_dim", "embed"))
        self.qkv_bias = zeros(qkv_shape[1:], ("kv_heads", None, "head_dim")) if use_bias else None
        self.out_bias = zeros((hidden,), ("norm",)) if use_bias else None

    def __call__(self, x, rope, segment_ids, q_index, cache=None, cache_index=None,
                 lora: LayerLora | None = None):
        """x [B,T,D] -> [B,T,D]; rope: (cos, sin) from `rope_tables`, or None. With `cache`
        (k, v [B,S,K,H], segment ids [B,S]) writes this step's keys/values at `cache_index` and
        attends over the whole cache. lora: this layer's adapters (model/lora.py), if any."""
        B, T, _ = x.shape
        kernels = self.kernels
        qkv = project(x, self.qkv[...], "btd,dkgh->btkgh", kernels.projection)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(x.dtype)
        qkv = constrain(qkv, ("batch", "seq", "act_kv_heads", None, None))
        q, k, v = split_qkv(qkv)
        if lora is not None:  # each of q, k, v has its own adapter on the shared input
            q, k, v = (t + lora.delta(n, x, kernels.projection) if lora.has(n) else t
                       for n, t in zip("qkv", (q, k, v)))
        if self.rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        kv_segment_ids, kv_index = segment_ids, q_index
        new_cache = None
        if cache is not None:
            k_cache, v_cache, seg_cache = cache
            update = jax.lax.dynamic_update_slice_in_dim
            k = update(k_cache, k.astype(k_cache.dtype), cache_index, 1)
            v = update(v_cache, v.astype(v_cache.dtype), cache_index, 1)
            kv_segment_ids = update(seg_cache, segment_ids, cache_index, 1)
            kv_index = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (B, k.shape[1]))
            new_cache = (k, v, kv_segment_ids)
        scale = 1.0 / math.sqrt(self.H)
        # mesh.sequence > 1 (context parallelism) splits each row over devices: its own kernel
        attend = context_attention if cache is None and sequence_parallel() > 1 else (
            dot_product_attention)
        o = attend(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids, kv_segment_ids,
                   q_index, kv_index, scale, kernels.attention, self_attention=cache is None)
        o = o.reshape(B, T, self.K * self.G, self.H)  # [B,T,N,H], head n = k * G + g
        o = constrain(o, ("batch", "seq", "act_heads", None))
        y = project(o, self.out[...], "btnh,nhd->btd", kernels.projection, contract=2)
        if lora is not None and lora.has("o"):
            y = y + lora.delta("o", o, kernels.projection)
        if self.out_bias is not None:
            y = y + self.out_bias[...].astype(x.dtype)
        return y, new_cache


class MLP(nnx.Module):
    """SwiGLU (gate and up fused into one [D, 2, F] weight) or GELU MLP."""

    def __init__(self, hidden: int, mlp_dim: int, *, kind: str, use_bias: bool,
                 init_std: float, out_std: float, kernels: Kernels, rngs: nnx.Rngs):
        self.kind, self.kernels = kind, kernels
        in_shape, in_axes = (((hidden, 2, mlp_dim), ("embed", None, "mlp")) if kind == "swiglu"
                             else ((hidden, mlp_dim), ("embed", "mlp")))
        self.wi = param(rngs, nnx.initializers.normal(init_std), in_shape, in_axes)
        self.wo = param(rngs, nnx.initializers.normal(out_std), (mlp_dim, hidden), ("mlp", "embed"))
        self.bi = zeros(in_shape[1:], in_axes[1:]) if use_bias else None
        self.bo = zeros((hidden,), ("norm",)) if use_bias else None

    def __call__(self, x: jax.Array, lora: LayerLora | None = None) -> jax.Array:
        """lora: this layer's adapters (model/lora.py), if any."""
        wi = self.wi[...].astype(x.dtype)
        kernel = self.kernels.projection
        if self.kind == "swiglu":
            h = project(x, wi, "btd,dcf->btcf", kernel)  # c = 0 gate, 1 up
            if self.bi is not None:
                h = h + self.bi[...].astype(x.dtype)
            if lora is not None and (lora.has("gate") or lora.has("up")):
                h = h + jnp.stack([lora.delta(n, x, kernel) if lora.has(n)
                                   else jnp.zeros_like(h[:, :, 0]) for n in ("gate", "up")], 2)
            h = swiglu(h)
        else:
            h = project(x, wi, "btd,df->btf", kernel)
            if self.bi is not None:
                h = h + self.bi[...].astype(x.dtype)
            if lora is not None and lora.has("up"):
                h = h + lora.delta("up", x, kernel)
            h = jax.nn.gelu(h, approximate=True)  # GPT-2/3 use the tanh approximation
        h = constrain(h, ("batch", "seq", "act_mlp"))
        y = project(h, self.wo[...], "btf,fd->btd", kernel)
        if lora is not None and lora.has("down"):
            y = y + lora.delta("down", h, kernel)
        if self.bo is not None:
            y = y + self.bo[...].astype(x.dtype)
        return y
