"""The one attention function every layer calls, and rotary position embeddings.

`dot_product_attention` masks causally *within* a packed document: a query sees a key only if the
key's slot index is not later than its own and both carry the same non-zero segment id. The `xla`
implementation is plain einsums (used on CPU and as the reference); `cudnn` hands the same inputs to
cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU, 16-bit dtypes only;
decoding steps against a KV cache use the einsums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate the two halves of the last axis (the Hugging Face Llama convention).

    x: [..., H]; positions broadcastable to x's leading axes."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [..., H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index) -> jax.Array:
    """[B, T, S] boolean: same document (segment id, 0 = padding) and not in the future."""
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = kv_segment_ids[:, None, :] != 0
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return same_doc & real & causal


def dot_product_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index,
                          scale: float, impl: str = "xla") -> jax.Array:
    """q [B,T,K,G,H], k/v [B,S,K,H], segment ids and slot indices [B,T] / [B,S] -> [B,T,K,G,H]."""
    if impl == "cudnn" and q.shape[1] == k.shape[1]:
        return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale)
    if impl not in ("xla", "cudnn"):  # cudnn decoding against a cache (T != S) uses einsums
        raise ValueError(f"unknown attention implementation {impl!r}")
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    # A large finite negative rather than -inf: fully masked rows (padding) stay finite.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v)


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale):
    """cuDNN flash attention (bfloat16/float16 only) for self-attention over a whole sequence.

    cuDNN takes a document mask only as an additive [B, 1, T, S] bias, which it must read (and
    differentiate) in full. So when every row holds exactly one document with no padding (a
    runtime check, cheap next to attention), the kernel runs with its built-in causal mask and
    no bias; otherwise (packed documents, padding) the same kernel gets the full mask."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention=cudnn needs model.dtype bfloat16 or float16, got "
                         f"{q.dtype}; use model.attention=xla for float32")
    B, T, K, G, H = q.shape
    q = q.reshape(B, T, K * G, H)  # head n = k * G + g: cuDNN's GQA grouping

    def causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")

    def masked(q, k, v):
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation="cudnn")

    one_document = jnp.all((q_segment_ids == q_segment_ids[:, :1]) & (q_segment_ids != 0))
    one_document &= jnp.all(q_index == kv_index)
    out = jax.lax.cond(one_document, causal, masked, q, k, v)
    return out.reshape(B, T, K, G, H)
