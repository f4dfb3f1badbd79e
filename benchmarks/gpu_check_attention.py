"""On a GPU: cuDNN flash attention gives the einsum attention's numbers (bfloat16 tolerance).

Checks the two paths of `model/attention.py::_cudnn_attention`: rows holding one unpadded
document (cuDNN's built-in causal mask) and packed documents with padding (the mask as a bias),
forward and gradient. Prints relative errors and exits 1 if any is above tolerance.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from bignlp_jax.model.attention import dot_product_attention

TOLERANCE = 2e-2  # bf16 operands: relative errors land between 1e-3 and 1e-2


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def case(name: str, segment_ids: np.ndarray, K=2, G=2, H=64, seed=0) -> bool:
    B, T = segment_ids.shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, K, G, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    seg = jnp.asarray(segment_ids, jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    real = (seg != 0)[:, :, None, None, None]  # padding rows' outputs are never used

    def loss(impl, q, k, v):
        out = dot_product_attention(q, k, v, seg, seg, idx, idx, H**-0.5, impl)
        return jnp.sum(jnp.where(real, out.astype(jnp.float32), 0.0) ** 2), out

    results = {}
    for impl in ("reference", "cudnn"):
        f = jax.jit(jax.value_and_grad(lambda q, k, v, impl=impl: loss(impl, q, k, v),
                                       argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = f(q, k, v)
        results[impl] = (jnp.where(real, out, 0), grads)
    errors = [rel(results["cudnn"][0], results["reference"][0])]
    errors += [rel(a, b) for a, b in zip(results["cudnn"][1], results["reference"][1])]
    ok = all(e < TOLERANCE for e in errors) and all(np.isfinite(errors))
    print(f"{name:28s} out {errors[0]:.2e}  dq {errors[1]:.2e}  dk {errors[2]:.2e}  "
          f"dv {errors[3]:.2e}  {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    T = 256
    one_doc = np.ones((2, T), np.int32)
    packed = np.zeros((2, T), np.int32)
    packed[0, :100], packed[0, 100:200], packed[0, 200:240] = 1, 2, 3  # 16 padding slots
    packed[1, :T] = 1
    packed[1, 150:] = 2
    ok = case("one document per row", one_doc) & case("packed documents + padding", packed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
