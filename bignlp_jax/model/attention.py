"""The one attention function every layer calls, and rotary position embeddings.

`dot_product_attention` masks causally *within* a packed document: a query sees a key only if the
key's slot index is not later than its own and both carry the same non-zero segment id. Kernels
(`model.kernel_attention`, see kernels.py): `reference` is plain einsums and a softmax, gradients
by autodiff; `blocked` skips the key blocks above the causal diagonal and has a hand-written
backward pass; `cudnn` hands the same inputs to cuDNN's fused flash attention through
`jax.nn.dot_product_attention` (GPU, 16-bit dtypes only; decoding steps against a KV cache use
the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bignlp_jax.model.glue import rotate_half


def rope_tables(positions: jax.Array, head_dim: int, theta: float, max_len: int
                ) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles at `positions`, [B, T, H/2] each, float32.

    Looked up in a [max_len, H/2] table built at trace time (a compile-time constant), rather
    than evaluated on the device: XLA fuses an on-device cos/sin into every consumer, which
    re-evaluates the transcendentals per head in each layer, forward and backward. Positions
    outside the table give NaN, like the learned position table."""
    half = head_dim // 2
    # float32 throughout, as the on-device formula (and Hugging Face) compute it
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, half, dtype=np.float32) / half))
                ).astype(np.float32)
    angles = np.arange(max_len, dtype=np.float32)[:, None] * inv_freq  # [max_len, H/2]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of the last axis (the Hugging Face Llama convention).

    x: [B, T, ..., H]; cos, sin: [B, T, H/2] from `rope_tables`."""
    half = x.shape[-1] // 2
    extra = (1,) * (x.ndim - 3)  # the head axes between T and H
    cos = cos.reshape(*cos.shape[:2], *extra, half)
    sin = sin.reshape(*sin.shape[:2], *extra, half)
    return rotate_half(x, cos, sin)


def attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index) -> jax.Array:
    """[B, T, S] boolean: same document (segment id, 0 = padding) and not in the future."""
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = kv_segment_ids[:, None, :] != 0
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    return same_doc & real & causal


def dot_product_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index,
                          scale: float, impl: str = "reference", *, self_attention: bool = False
                          ) -> jax.Array:
    """q [B,T,K,G,H], k/v [B,S,K,H], segment ids and slot indices [B,T] / [B,S] -> [B,T,K,G,H].

    impl: the attention kernel (reference, blocked or cudnn). self_attention: the keys are the
    queries' own slots (no cache: S == T, kv_index == q_index), so causality is known in
    advance and the blocked kernel skips blocks above the diagonal."""
    if impl not in ("reference", "blocked", "cudnn"):
        raise ValueError(f"unknown attention kernel {impl!r}")
    if impl == "cudnn" and q.shape[1] == k.shape[1]:
        return _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_index, kv_index)[:, None, None]
    if impl != "blocked":  # cudnn decoding against a cache (T != S) uses the reference too
        return reference_attention(q, k, v, mask, scale)
    T = q.shape[1]
    # Head-major layouts once per layer ([B,K,G,T,H], [B,K,S,H]), so the batched matmuls below
    # read contiguous [T,H] / [S,H] blocks and no per-block transposes are needed.
    q, k, v = jnp.moveaxis(q, 1, 3), jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    block = causal_block_size(T) if self_attention else T
    out = _softmax_attention(q, k, v, mask, scale, block)
    return jnp.moveaxis(out, 3, 1)  # [B,T,K,G,H]


def reference_attention(q, k, v, mask, scale: float) -> jax.Array:
    """softmax(q k^T * scale, masked) v, written the obvious way; autodiff gives the gradients.

    q [B,T,K,G,H], k/v [B,S,K,H], mask [B,1,1,T,S] -> [B,T,K,G,H]."""
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    # A large finite negative rather than -inf: fully masked rows (padding) stay finite.
    scores = jnp.where(mask, scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def causal_block_size(T: int, target: int = 128, max_blocks: int = 8) -> int:
    """Query block length for causal block skipping: `target` (or larger, to keep at most
    `max_blocks` blocks) when it divides T into at least two blocks, else T (no blocking)."""
    block = max(target, T // max_blocks)
    return block if T % block == 0 and T // block >= 2 else T


def _blocks(T: int, S: int, block: int) -> list[tuple[slice, slice]]:
    """(query rows, visible keys) per query block. With block < T (self-attention, S == T),
    query block i sees keys [0, (i+1) * block) only: the rest is in its future. Same numbers
    for every real token, about (n+1)/2n of the work for n blocks."""
    if block == T:
        return [(slice(0, T), slice(0, S))]
    return [(slice(i * block, (i + 1) * block), slice(0, (i + 1) * block))
            for i in range(T // block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(q, k, v, mask, scale: float, block: int):
    """softmax(q k^T * scale, masked) v per query block, with a hand-written backward pass.

    Head-major: q [B,K,G,T,H], k/v [B,K,S,H], mask [B,1,1,T,S] -> [B,K,G,T,H]. The softmax is
    left unnormalised until after the value matmul (dividing [T,H] instead of [T,S]) and the
    backward pass forms dS = p * (dO/l v^T - rowsum(dO * O)/l) in one elementwise pass; autodiff
    would add separate passes over the [T,S] probabilities for the normalisation and the
    softmax gradient, and would assemble dq, dk, dv from one zero-padded full-size array per
    block. Here dq is one concatenate and dk, dv sum each key block's contributions once."""
    return _softmax_attention_fwd(q, k, v, mask, scale, block)[0]


def _softmax_attention_fwd(q, k, v, mask, scale, block):
    outs, probs, norms = [], [], []
    for rows, keys in _blocks(q.shape[3], k.shape[2], block):
        scores = jnp.einsum("bkgth,bksh->bkgts", q[:, :, :, rows], k[:, :, keys],
                            preferred_element_type=jnp.float32)
        # A large finite negative rather than -inf: fully masked rows (padding) stay finite.
        scores = jnp.where(mask[..., rows, keys], scores * scale, jnp.finfo(jnp.float32).min)
        p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # unnormalised
        l = jnp.sum(p, axis=-1, keepdims=True)  # [B,K,G,t,1]
        outs.append(jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v[:, :, keys],
                               preferred_element_type=jnp.float32) / l)
        probs.append(p)
        norms.append(l)
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.astype(q.dtype), (q, k, v, mask, probs, norms, out)


def _softmax_attention_bwd(scale, block, residuals, d_out):
    q, k, v, mask, probs, norms, out = residuals
    d_out = d_out.astype(jnp.float32)
    blocks = _blocks(q.shape[3], k.shape[2], block)
    dqs, dks, dvs = [], [], []
    for (rows, keys), p, l in zip(blocks, probs, norms):
        d_o = d_out[:, :, :, rows]
        d_out_n = d_o / l  # dO / l
        delta = jnp.sum(d_o * out[:, :, :, rows], axis=-1, keepdims=True) / l  # [B,K,G,t,1]
        dp = jnp.einsum("bkgth,bksh->bkgts", d_out_n.astype(v.dtype), v[:, :, keys],
                        preferred_element_type=jnp.float32)
        # masked scores are constants: no gradient (p alone is not 0 there in fully masked rows)
        ds = jnp.where(mask[..., rows, keys], p * (dp - delta) * scale, 0.0).astype(q.dtype)
        dqs.append(jnp.einsum("bkgts,bksh->bkgth", ds, k[:, :, keys],
                              preferred_element_type=jnp.float32))
        dks.append(jnp.einsum("bkgts,bkgth->bksh", ds, q[:, :, :, rows],
                              preferred_element_type=jnp.float32))
        dvs.append(jnp.einsum("bkgts,bkgth->bksh", p.astype(v.dtype), d_out_n.astype(v.dtype),
                              preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
    return (dq.astype(q.dtype), _sum_key_blocks(dks, block).astype(k.dtype),
            _sum_key_blocks(dvs, block).astype(v.dtype), None)


def _sum_key_blocks(parts: list[jax.Array], block: int) -> jax.Array:
    """Query block i's gradient covers keys [0, (i+1) * block): key block j sums the parts of
    blocks i >= j, and the key blocks are concatenated (each written once)."""
    if len(parts) == 1:
        return parts[0]
    n = len(parts)
    key_blocks = [sum(parts[i][:, :, j * block:(j + 1) * block] for i in range(j, n))
                  for j in range(n)]
    return jnp.concatenate(key_blocks, axis=2)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale):
    """cuDNN flash attention (bfloat16/float16 only) for self-attention over a whole sequence.

    cuDNN takes a document mask only as an additive [B, 1, T, S] bias, which it must read (and
    differentiate) in full. So when every row holds exactly one document with no padding (a
    runtime check, cheap next to attention), the kernel runs with its built-in causal mask and
    no bias; otherwise (packed documents, padding) the same kernel gets the full mask."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.kernel_attention=cudnn needs model.dtype bfloat16 or float16, got "
                         f"{q.dtype}; use model.kernel_attention=auto for float32")
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
