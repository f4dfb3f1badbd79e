"""The elementwise glue between the matmuls: split qkv, RoPE's rotation, SwiGLU.

Two kernels (`model.kernel_glue`, see kernels.py). `reference`: the plain formulas, gradients by
autodiff. `fused`: the same formulas with hand-written backward passes. Autodiff turns a slice
into a zero-padded full-size array and a concatenation into slices, so the gradient of "split qkv into q, k, v", of RoPE's half rotation and of SwiGLU's gate/up split is a
chain of pads and adds that writes each full-size gradient several times. The backward passes
here write it once, with one concatenate. Same numbers; tests/test_glue.py compares every
function and its gradient with the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_qkv(qkv: jax.Array, kernel: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B,T,K,G+2,H] -> q [B,T,K,G,H], k [B,T,K,H], v [B,T,K,H]."""
    return _split_qkv_fused(qkv) if _fused(kernel) else _split(qkv)


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array, kernel: str) -> jax.Array:
    """RoPE's rotation [x1 cos - x2 sin, x2 cos + x1 sin] of x's two halves, computed in float32;
    cos/sin broadcast against the halves."""
    return _rotate_half_fused(x, cos, sin) if _fused(kernel) else _rotate(x, cos, sin)


def swiglu(h: jax.Array, kernel: str) -> jax.Array:
    """h [..., 2, F] (gate, up) -> silu(gate) * up [..., F]."""
    return _swiglu_fused(h) if _fused(kernel) else _swiglu(h)


def _fused(kernel: str) -> bool:
    if kernel not in ("reference", "fused"):
        raise ValueError(f"unknown glue kernel {kernel!r}")
    return kernel == "fused"


def _split(qkv):
    G = qkv.shape[3] - 2
    return qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]


@jax.custom_vjp
def _split_qkv_fused(qkv):
    return _split(qkv)


def _split_qkv_fwd(qkv):
    return _split(qkv), None


def _split_qkv_bwd(_, grads):
    dq, dk, dv = grads
    return (jnp.concatenate([dq, dk[:, :, :, None], dv[:, :, :, None]], axis=3),)


_split_qkv_fused.defvjp(_split_qkv_fwd, _split_qkv_bwd)


def _rotate(x, cos, sin):
    """[x1 cos - x2 sin, x2 cos + x1 sin] over the two halves of the last axis, in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def _rotate_half_fused(x, cos, sin):
    """The backward pass is the inverse rotation (sin -> -sin), one concatenate; cos/sin are
    position tables without gradient."""
    return _rotate(x, cos, sin)


def _rotate_half_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_half_bwd(residuals, dy):
    cos, sin = residuals
    return _rotate(dy, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rotate_half_fused.defvjp(_rotate_half_fwd, _rotate_half_bwd)


def _swiglu(h):
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


@jax.custom_vjp
def _swiglu_fused(h):
    """The gradient comes back stacked [..., 2, F] in one pass."""
    return _swiglu(h)


def _swiglu_fwd(h):
    return _swiglu(h), h


def _swiglu_bwd(h, dy):
    gate, up = h[..., 0, :].astype(jnp.float32), h[..., 1, :].astype(jnp.float32)
    dy = dy.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * gate * sig
    return (jnp.stack([d_gate, d_up], axis=-2).astype(h.dtype),)


_swiglu_fused.defvjp(_swiglu_fwd, _swiglu_bwd)
