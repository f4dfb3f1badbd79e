"""Both glue kernels (bignlp_jax/model/glue.py: the reference and the fused one with
hand-written backward passes) against the plain formulas written here: same values, and
gradients equal to autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bignlp_jax.model.attention import apply_rope, rope_tables
from bignlp_jax.model.glue import split_qkv, swiglu


def plain_split(qkv):
    G = qkv.shape[3] - 2
    return qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]


def plain_rope(x, cos, sin):
    half = x.shape[-1] // 2
    cos = cos.reshape(*cos.shape[:2], *(1,) * (x.ndim - 3), half)
    sin = sin.reshape(*sin.shape[:2], *(1,) * (x.ndim - 3), half)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def plain_swiglu(h):
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def assert_same_vjp(ours, plain, x, rng):
    """Values equal, and the pullback of a random cotangent equal to autodiff's."""
    out, pull = jax.vjp(ours, x)
    want, want_pull = jax.vjp(plain, x)
    for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(o, w, rtol=1e-6, atol=1e-6)
    cot = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), w.dtype), want)
    np.testing.assert_allclose(pull(cot)[0], want_pull(cot)[0], rtol=1e-5, atol=1e-6)


KERNELS = pytest.mark.parametrize("kernel", ["reference", "fused"])


@KERNELS
@pytest.mark.parametrize("G", [1, 3])
def test_split_qkv(G, kernel):
    rng = np.random.default_rng(G)
    qkv = jnp.asarray(rng.normal(size=(2, 5, 2, G + 2, 4)), jnp.float32)
    assert_same_vjp(lambda x: split_qkv(x, kernel), plain_split, qkv, rng)


@KERNELS
@pytest.mark.parametrize("shape", [(2, 7, 3, 8), (2, 7, 2, 3, 8)])  # k [B,T,K,H], q [B,T,K,G,H]
def test_rope_rotation(shape, kernel):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    positions = jnp.asarray(rng.integers(0, 32, size=shape[:2]), jnp.int32)
    cos, sin = rope_tables(positions, shape[-1], 10000.0, 32)
    assert_same_vjp(lambda x: apply_rope(x, cos, sin, kernel), lambda x: plain_rope(x, cos, sin),
                    x, rng)


@KERNELS
def test_swiglu(kernel):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 5, 2, 7)) * 3, jnp.float32)  # includes large |gate|
    assert_same_vjp(lambda h: swiglu(h, kernel), plain_swiglu, h, rng)
