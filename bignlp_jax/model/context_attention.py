"""Context-parallel self-attention: each row's tokens split over the `seq` mesh axis.

Between layers the activations are split along the sequence (the rules map the logical `seq`
axis to `mesh.sequence`); only attention needs tokens from other devices. It is done here by an
**all-gather of K/V**, not a ring of `ppermute`s, because:
  - with grouped-query attention K and V are small (Llama 3 70B: 8 kv heads for 64 query heads,
    so K+V are 1/4 the bytes of Q), so gathering them is cheap next to the attention matmuls;
  - every device sees every key's segment id and slot index, so packed documents and padding
    need no special case, and the backward pass is plain autodiff (the all-gather's transpose
    is a reduce-scatter of dK/dV); this is what Llama 3 itself trained with (Dubey et al. 2024,
    section 3.3.2). A ring would overlap its transfers with compute at long lengths; that is
    left for a fused kernel.

Load balance for causal masks (zig-zag): the row is cut into 2n chunks for n devices and device
i holds chunks i and 2n-1-i (`zigzag_order`; the train step permutes the batch once and passes
the original slot indices, which drive the causal mask). Against the K/V of device s:
  s < i: both local chunks see only s's first chunk (its second is in their future);
  s > i: only the local second chunk sees anything, and it sees all of s's K/V;
  s = i: the diagonal block, masked.
Each case costs 2c^2 score entries (4c^2 on the diagonal), the same on every device, so no
device waits for the one holding the end of the row. Partial results are merged with an online
(running-max) softmax. Masking always uses the real segment ids and slot indices, so the case
choice only skips blocks that are wholly masked; it never changes a value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bignlp_jax.config.schema import context_split_problem
from bignlp_jax.errors import UserError
from bignlp_jax.model.attention import attention_mask
from bignlp_jax.parallel.rules import logical_shard_map, split_axis

SEQ_AXES = ("batch", "seq")
Q_AXES = ("batch", "seq", "act_kv_heads", None, None)  # [B, T, K, G, H]
KV_AXES = ("batch", "seq", "act_kv_heads", None)  # [B, S, K, H]
NEG = float(np.finfo(np.float32).min)  # finite: fully masked rows stay NaN-free


def sequence_parallel() -> int:
    """Devices each row is split over under the active sharding (1: no context parallelism)."""
    split = split_axis("seq")
    return 1 if split is None else split[1]


def zigzag_order(T: int, n: int) -> np.ndarray:
    """Slot order for n devices: device i's share is chunks i and 2n-1-i of 2n equal chunks.

    Permuting a row by this order and splitting it evenly gives each device an equal share of
    the causal work."""
    check_length(T, n)
    chunks = np.arange(T).reshape(2 * n, T // (2 * n))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def check_length(T: int, n: int) -> None:
    """Rows of length T split over n devices: the config's rule, on the arrays themselves."""
    if problem := context_split_problem(T, n):
        raise UserError(problem)


def context_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index, scale: float,
                      impl: str = "xla", *, self_attention: bool = True) -> jax.Array:
    """Same contract as `dot_product_attention` (self-attention only), for inputs split along
    the sequence in zig-zag order; q [B,T,K,G,H], k/v [B,T,K,H] -> [B,T,K,G,H].

    `impl` is accepted for the same signature: the per-block maths is always einsums."""
    if not self_attention:
        raise ValueError("context-parallel attention is for self-attention (no KV cache)")
    split = split_axis("seq")
    if split is None:  # callers check sequence_parallel() > 1 first
        raise ValueError("context-parallel attention needs the sequence axis split over devices")
    axis, n = split
    check_length(q.shape[1], n)

    def local(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        return _local_attention(q, k, v, q_seg, kv_seg, q_idx, kv_idx, scale, axis, n)

    run = logical_shard_map(local, (Q_AXES, KV_AXES, KV_AXES, *(SEQ_AXES,) * 4), Q_AXES)
    return run(q, k, v, q_segment_ids, kv_segment_ids, q_index, kv_index)


@functools.partial(jax.checkpoint, static_argnums=(7,))
def _block(q, q_seg, q_idx, k, v, kv_seg, kv_idx, scale):
    """Unnormalised attention of q [b,K,G,t,H] over k/v [b,K,s,H]: (sum p v, max, sum p).

    Rematerialised: the backward pass recomputes this block's [t, s] scores instead of keeping
    every block's probabilities alive until then (flash-attention's trade: one more q k^T
    matmul for memory that no longer grows with the whole row's length)."""
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_seg, kv_seg, q_idx, kv_idx)[:, None, None]  # [b,1,1,t,s]
    scores = jnp.where(mask, scores, NEG)
    # the result does not depend on the shift: no gradient through it
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)  # masked keys add exactly nothing
    o = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o, m, jnp.sum(p, axis=-1, keepdims=True)


def _local_attention(q, k, v, q_seg, kv_seg, q_idx, kv_idx, scale, axis, n):
    """Per-device body: q [b,2c,K,G,H] (chunks i, 2n-1-i), k/v [b,2c,K,H] likewise."""
    c = q.shape[1] // 2
    i = jax.lax.axis_index(axis)

    def gather(x):  # [b, 2c, ...] from every device -> [b, 2cn, ...], device s at s*2c
        return jax.lax.all_gather(x, axis, axis=1, tiled=True)

    # K and V travel as one [b, K, 2, 2c, H] array: one collective instead of two
    kv = jnp.stack([jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)], axis=2)
    kv = jax.lax.all_gather(kv, axis, axis=3, tiled=True)  # [b, K, 2, 2cn, H]
    seg_all, idx_all = gather(kv_seg), gather(kv_idx)
    qh = jnp.moveaxis(q, 1, 3)  # [b, K, G, 2c, H]
    shape = qh.shape[:3] + (2 * c,)
    acc = jnp.zeros((*shape, q.shape[-1]), jnp.float32)
    m = jnp.full((*shape, 1), NEG, jnp.float32)
    l = jnp.zeros((*shape, 1), jnp.float32)
    for s in range(n):
        keys = slice(s * 2 * c, (s + 1) * 2 * c)
        ks, vs = kv[:, :, 0, keys], kv[:, :, 1, keys]
        seg, idx = seg_all[:, keys], idx_all[:, keys]

        def earlier(ks=ks, vs=vs, seg=seg, idx=idx):  # s < i: their first chunk only
            return _block(qh, q_seg, q_idx, ks[:, :, :c], vs[:, :, :c], seg[:, :c], idx[:, :c],
                          scale)

        def diagonal(ks=ks, vs=vs, seg=seg, idx=idx):  # s == i: own chunks, causal mask
            return _block(qh, q_seg, q_idx, ks, vs, seg, idx, scale)

        def later(ks=ks, vs=vs, seg=seg, idx=idx):  # s > i: only our second chunk sees them
            o, mx, sm = _block(qh[:, :, :, c:], q_seg[:, c:], q_idx[:, c:], ks, vs, seg, idx,
                               scale)
            first = (*shape[:3], c)  # our first chunk: nothing visible (neutral partials)
            return (jnp.concatenate([jnp.zeros((*first, o.shape[-1]), o.dtype), o], axis=3),
                    jnp.concatenate([jnp.full((*first, 1), NEG, mx.dtype), mx], axis=3),
                    jnp.concatenate([jnp.zeros((*first, 1), sm.dtype), sm], axis=3))

        o_s, m_s, l_s = jax.lax.switch(jnp.clip(s - i, -1, 1) + 1, (earlier, diagonal, later))
        m_new = jnp.maximum(m, m_s)
        a, b = jnp.exp(m - m_new), jnp.exp(m_s - m_new)
        acc, l, m = acc * a + o_s * b, l * a + l_s * b, m_new
    # rows that see no key (padding) give 0; every real token sees at least itself
    out = acc / jnp.where(l > 0, l, 1.0)
    return jnp.moveaxis(out, 3, 1).astype(q.dtype)  # [b, 2c, K, G, H]
