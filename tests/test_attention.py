"""The attention kernels (reference and blocked) against a plain formula written here: outputs
and gradients, with causal block skipping (long rows), packed documents, padding and
grouped-query heads; RoPE tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bignlp_jax.model.attention import (
    apply_rope,
    attention_mask,
    causal_block_size,
    dot_product_attention,
    rope_tables,
)


def reference_attention(q, k, v, q_seg, kv_seg, q_index, kv_index, scale):
    """Softmax attention written the obvious way; autodiff gives its gradients."""
    mask = attention_mask(q_seg, kv_seg, q_index, kv_index)[:, None, None]  # [B,1,1,T,S]
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, axis=-1), v)


def packed_rows(B: int, T: int, rng: np.random.Generator):
    """Segment ids with several documents per row and trailing padding (id 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T - 8), size=3, replace=False))
        bounds = [0, *cuts, T - 5 * b]  # row b ends with 5*b padding slots
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[b, lo:hi] = doc + 1
    return jnp.asarray(seg)


@pytest.mark.parametrize("kernel,T", [("reference", 256), ("blocked", 64), ("blocked", 256),
                                      ("blocked", 512)])  # 256 and 512 skip causal blocks
def test_attention_kernels_match_reference_with_gradients(kernel, T):
    B, K, G, H = 2, 2, 3, 16
    rng = np.random.default_rng(T)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, T, K, G, H), (B, T, K, H), (B, T, K, H)])
    seg = packed_rows(B, T, rng)
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    scale = H ** -0.5
    cotangent = jnp.asarray(rng.normal(size=(B, T, K, G, H)), jnp.float32)
    real = (seg != 0)[:, :, None, None, None]  # padded query rows are ignored downstream

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) * cotangent)

    def ours(q, k, v):
        return dot_product_attention(q, k, v, seg, seg, index, index, scale, kernel,
                                     self_attention=True)

    def ref(q, k, v):
        return reference_attention(q, k, v, seg, seg, index, index, scale)
    assert (causal_block_size(T) < T) == (T >= 256)
    np.testing.assert_allclose(np.where(real, ours(q, k, v), 0), np.where(real, ref(q, k, v), 0),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_causal_block_size():
    assert causal_block_size(64) == 64  # too short to split
    assert causal_block_size(256) == 128
    assert causal_block_size(2048) == 256  # at most 8 blocks
    assert causal_block_size(300) == 300  # 128 does not divide it


def test_rope_tables_match_the_formula():
    positions = jnp.asarray([[0, 1, 5, 63], [7, 7, 2, 0]])
    cos, sin = rope_tables(positions, head_dim=8, theta=500.0, max_len=64)
    inv_freq = 1.0 / 500.0 ** (np.arange(4) / 4)
    angles = np.asarray(positions)[..., None] * inv_freq
    np.testing.assert_allclose(cos, np.cos(angles), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=1e-6, atol=1e-6)
    r = apply_rope(jnp.ones((1, 4, 8)), cos[:1], sin[:1])
    np.testing.assert_allclose(r[0, 0], np.ones(8), rtol=1e-6)  # position 0: no rotation
    # the score between a rotated query and key depends only on their distance
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 8)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        tq = rope_tables(jnp.asarray([[pq]]), 8, 500.0, 64)
        tk = rope_tables(jnp.asarray([[pk]]), 8, 500.0, 64)
        rq, rk = apply_rope(q, *tq), apply_rope(k, *tk)
        return float(jnp.sum(rq * rk))

    assert score(9, 4) == pytest.approx(score(30, 25), rel=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 5), rel=1e-3)
