"""The elementwise glue between the matmuls: split qkv, RoPE's rotation, SwiGLU.

Plain formulas, gradients by autodiff. Hand-written backward passes for all three (one
concatenate instead of autodiff's zero-padded full-size arrays) were removed: the
kernel ablation in benchmarks/RESULTS.md measured no gain above 3% from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B,T,K,G+2,H] -> q [B,T,K,G,H], k [B,T,K,H], v [B,T,K,H]."""
    G = qkv.shape[3] - 2
    return qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE's rotation [x1 cos - x2 sin, x2 cos + x1 sin] of x's two halves, computed in float32;
    cos/sin broadcast against the halves."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2, F] (gate, up) -> silu(gate) * up [..., F]."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
