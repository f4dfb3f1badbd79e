"""The projection every layer uses: activations [B, T, *in] times a weight [*in, *out].

Two kernels (`model.kernel_projection`, see kernels.py). `reference`: a plain `einsum`. GPU and
TPU matmul libraries read either operand transposed for free, so autodiff's weight gradient
x^T @ dy costs nothing extra there.

`cpu_transposed`: on CPU, XLA hands matmuls to XNNPACK/YNNPACK kernels that want both operands
row-major. For the weight gradient dW = x^T @ dy, XLA's layout assignment then materialises a
transposed copy of one operand, and it picks the output gradient dy: for the LM head that is a
full copy of the [tokens, vocab] logits gradient, for the MLP a [tokens, 2F] one. This kernel
instead transposes the smaller of x and dy itself (x^T kept from the forward pass, or dy^T in
the backward pass) behind an optimisation barrier, so the backward pass runs row-major matmuls
and copies nothing large.
Same arithmetic, same parameter layout; only where a transpose happens changes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _transpose(a: jax.Array) -> jax.Array:
    """A row-major transposed copy that XLA will not fold back into the matmul that reads it.

    The inner barrier keeps XLA from fusing `a`'s producer (a norm, say) into the transpose,
    which would recompute it in transposed order, reading its inputs with large strides."""
    return jax.lax.optimization_barrier(jnp.transpose(jax.lax.optimization_barrier(a)))


def _dot(a, b, dtype):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: jax.Array, w: jax.Array, out_dtype, transpose_x: bool) -> jax.Array:
    """[M, K] @ [K, N] -> [M, N] with float32 accumulation.

    transpose_x: keep x^T for the weight gradient (else transpose dy in the backward pass);
    the caller picks whichever of x [M, K] and dy [M, N] is smaller."""
    return _dot(x, w, out_dtype)


def _matmul_fwd(x, w, out_dtype, transpose_x):
    return _dot(x, w, out_dtype), (_transpose(x) if transpose_x else x, w)


def _matmul_bwd(out_dtype, transpose_x, residuals, dy):
    x_or_xt, w = residuals
    dx = _dot(dy, w.T, w.dtype)  # [M, N] x [K, N]^T: the rhs read transposed is free
    if transpose_x:
        dw = _dot(x_or_xt, dy, w.dtype)  # [K, M] x [M, N]
    else:
        dw = _dot(_transpose(dy), x_or_xt, w.dtype).T  # ([N, M] x [M, K])^T, small transpose
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def project(x: jax.Array, w: jax.Array, spec: str, kernel: str, contract: int = 1, *,
            float32_out: bool = False) -> jax.Array:
    """x [B, T, *in] @ w [*in, *out] -> [B, T, *out]; `in` is x's last `contract` axes.

    `spec` is the equivalent einsum: the reference kernel runs it as-is (it also states the
    shapes for readers); `kernel` is "reference" or "cpu_transposed"."""
    w = w.astype(x.dtype)
    if kernel == "reference":
        kwargs = {"preferred_element_type": jnp.float32} if float32_out else {}
        return jnp.einsum(spec, x, w, **kwargs)
    if kernel != "cpu_transposed":
        raise ValueError(f"unknown projection kernel {kernel!r}")
    lead, inner = x.shape[:-contract], x.shape[-contract:]
    out = w.shape[contract:]
    x2 = x.reshape(math.prod(lead), math.prod(inner))  # [B*T, in]
    w2 = w.reshape(math.prod(inner), math.prod(out))  # [in, out]
    out_dtype = jnp.dtype(jnp.float32 if float32_out else x.dtype)
    y = _matmul(x2, w2, out_dtype, x2.shape[1] <= w2.shape[1])
    return y.reshape(*lead, *out)
