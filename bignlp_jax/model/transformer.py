"""Decoder-only transformer: embedding, a scanned stack of pre-norm blocks, final norm, LM head.

The blocks' parameters are stacked on a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth; `model.remat` wraps the scanned body in `jax.checkpoint`,
and `model.scan_unroll=0` unrolls the scan into straight-line code (faster for shallow models).
With a `PipelineSpec` the same layers run through the pipeline schedule instead (pipeline.py).
Which kernel runs each op is fixed when the model is built (`kernels`, see kernels.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bignlp_jax.config import ModelConfig
from bignlp_jax.model.attention import rope_tables
from bignlp_jax.model.context_attention import sequence_parallel, zigzag_order
from bignlp_jax.model.kernels import REFERENCE, Kernels
from bignlp_jax.model.layers import MLP, Attention, Embed, Norm, param
from bignlp_jax.model.lora import LayerLora, LoraSpec
from bignlp_jax.model.matmul import project
from bignlp_jax.model.pipeline import PipelineSpec, run_pipeline
from bignlp_jax.parallel.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise work (norms, activations, softmax).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, rngs: nnx.Rngs):
        norm = functools.partial(Norm, cfg.hidden, kind=cfg.norm, eps=cfg.norm_eps,
                                 use_bias=cfg.use_bias)
        # GPT-2 / Megatron scale the residual-output projections by 1/sqrt(2 * layers).
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.attn_norm = norm()
        self.attn = Attention(
            cfg.hidden, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, use_bias=cfg.use_bias,
            rope=cfg.position == "rope", init_std=cfg.init_std,
            out_std=out_std, kernels=kernels, rngs=rngs,
        )
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.hidden, cfg.mlp_dim, kind=cfg.mlp, use_bias=cfg.use_bias,
                       init_std=cfg.init_std, out_std=out_std, kernels=kernels, rngs=rngs)

    def __call__(self, x, rope, segment_ids, q_index, cache=None, cache_index=None, lora=None):
        h, new_cache = self.attn(self.attn_norm(x), rope, segment_ids, q_index, cache,
                                 cache_index, lora)
        x = constrain(x + h, ("batch", "seq", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x), lora), ("batch", "seq", "act_embed"))
        return x, new_cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, kernels: Kernels = REFERENCE):
        """kernels: resolved for the backend by `functional.model_kernels` (the parameters do
        not depend on them)."""
        self.cfg, self.kernels = cfg, kernels
        self.embed = Embed(cfg.vocab_size, cfg.hidden, init_std=cfg.init_std, kernels=kernels,
                           rngs=rngs)
        self.pos_embed = param(rngs, nnx.initializers.normal(cfg.init_std),
                               (cfg.max_seq_len, cfg.hidden), (None, "embed")
                               ) if cfg.position == "learned" else None

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, kernels, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg.hidden, kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias)
        self.lm_head = param(rngs, nnx.initializers.normal(cfg.init_std),
                             (cfg.hidden, cfg.vocab_size), ("embed", "vocab")
                             ) if not cfg.tie_embeddings else None

    def __call__(self, tokens, positions=None, segment_ids=None, *, cache=None, cache_index=None,
                 slot_index=None, lora: tuple[LoraSpec, dict, jax.Array | None] | None = None,
                 pipeline: PipelineSpec | None = None):
        """tokens [B,T] -> (logits [B,T,V] float32, new cache or None).

        positions: RoPE / learned positions (restart at 0 in each packed document);
        segment_ids: document ids, 0 for padding. Both default to one unpacked sequence.
        cache: dict(k, v [L,B,S,K,H], segment_ids [B,S]) for incremental decoding; the T new
        tokens occupy slots cache_index .. cache_index+T-1. slot_index [B,T]: each token's slot
        when the row arrives permuted; under context parallelism it must be `zigzag_order`.
        lora: (spec, adapters stacked over layers, dropout key or None), see model/lora.py.
        pipeline: run the layers as pipeline stages (training and scoring; no cache)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        start = 0 if cache is None else cache_index
        restore = None
        n = sequence_parallel()
        if n > 1 and cache is None and slot_index is None:
            # Context parallelism needs the row in zig-zag order; a caller in slot order
            # (scoring, evaluation) gets its logits back in slot order. The train step permutes
            # its batch itself and passes slot_index, so its logits stay permuted (no gather).
            order = zigzag_order(T, n)
            tokens, positions, segment_ids = (a[:, order] for a in (tokens, positions,
                                                                    segment_ids))
            slot_index, restore = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, T)), (
                np.argsort(order))
        q_index = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T)) \
            if slot_index is None else slot_index

        x = self.embed(tokens, dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...].astype(dtype), positions, axis=0)
        x = constrain(x, ("batch", "seq", "act_embed"))
        rope = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta, cfg.max_seq_len
                           ) if cfg.position == "rope" else None

        graphdef, stacked = nnx.split(self.blocks)

        lora_xs = None
        if lora is not None:  # adapters (and a dropout key per layer) scan with the blocks
            spec, adapters, key = lora
            lora_xs = (adapters, None if key is None else jax.random.split(key, cfg.num_layers))

        def layer(x, xs):
            block_state, layer_cache, layer_lora = xs
            block = nnx.merge(graphdef, block_state)
            layer_cache = None if layer_cache is None else (
                layer_cache[0], layer_cache[1], cache["segment_ids"])
            if layer_lora is not None:
                layer_lora = LayerLora(spec, *layer_lora)
            x, new_cache = block(x, rope, segment_ids, q_index, layer_cache, cache_index,
                                 layer_lora)
            return x, (None if new_cache is None else (new_cache[0], new_cache[1], new_cache[2]))

        if pipeline is not None and pipeline.stages > 1 and cache is None:
            x = self._pipelined(x, stacked, lora_xs, (rope, segment_ids, q_index), pipeline,
                                graphdef, spec if lora is not None else None)
            return self._head(x, restore), None
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        kv = None if cache is None else (cache["k"], cache["v"])
        unroll = cfg.scan_unroll or cfg.num_layers  # 0: the whole stack, straight-line code
        x, new_kv = jax.lax.scan(layer, x, (stacked, kv, lora_xs),
                                 unroll=min(unroll, cfg.num_layers))
        logits = self._head(x, restore)
        new_cache = None
        if cache is not None:
            # every layer wrote the same segment ids; keep the first layer's copy
            new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": new_kv[2][0]}
        return logits, new_cache

    def _pipelined(self, x, stacked, lora_xs, rows, pipeline: PipelineSpec, graphdef,
                   lora_spec: LoraSpec | None):
        """The layer stack as pipeline stages: one layer of `run_pipeline` is a block (and its
        adapters) on one microbatch, its per-row inputs (rotary tables, segment and query ids)
        cut into microbatches with the activations."""
        cfg = self.cfg
        # the blocks' logical axes (layers first) lay out the gathered weights; adapters and
        # dropout keys are left to XLA
        block_axes = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(stacked)),
                                  is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec))
        block_state = nnx.to_pure_dict(stacked)

        def layer(x, xs, row):
            state, layer_lora = xs
            rope, segment_ids, q_index = row
            block = nnx.merge(graphdef, state)
            if layer_lora is not None:
                assert lora_spec is not None  # adapters come with their spec
                layer_lora = LayerLora(lora_spec, *layer_lora)
            return block(x, rope, segment_ids, q_index, None, None, layer_lora)[0]

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        lora_axes = None if lora_xs is None else jax.tree.map(lambda _: None, lora_xs)
        return run_pipeline(layer, x, (block_state, lora_xs), (block_axes, lora_axes), rows,
                            pipeline, REMAT_POLICIES.get(cfg.remat))

    def _head(self, x, restore):
        """Final norm and LM head: [B, T, D] -> logits [B, T, V] float32."""
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = project(x, self.lm_head[...], "btd,dv->btv", self.kernels.projection,
                             float32_out=True)
        if restore is not None:
            logits = logits[:, restore]
        return constrain(logits, ("batch", "seq", "act_vocab"))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
    """An empty key/value cache for `length` slots (segment id 0 = empty)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32)}
