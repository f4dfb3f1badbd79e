"""Per-token cross-entropy, the training loss: a reference kernel and a fused one.

Kernels (`model.kernel_cross_entropy`, see kernels.py): `reference` is logsumexp minus the target
logit with autodiff gradients; `fused` has the same forward pass and a hand-written gradient,
d/dlogits = softmax(logits) - onehot(target), produced in one fused elementwise pass. Autodiff of
the forward pass instead scatters the target term into a zeroed [B, T, V] buffer and adds it to
the softmax term: two extra full-size passes over the largest activation of the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array, kernel: str = "reference"
                        ) -> jax.Array:
    """Per-token -log p(target), [B, T], in float32; logits [B, T, V], integer targets [B, T]."""
    if kernel == "fused":
        return _fused(logits, targets)
    if kernel != "reference":
        raise ValueError(f"unknown cross_entropy kernel {kernel!r}")
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    upcast = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(upcast, axis=-1)
    target_logit = jnp.take_along_axis(upcast, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, (logits, log_z, targets)  # keeps the logits in their own dtype


@jax.custom_vjp
def _fused(logits, targets):
    return _forward(logits, targets)[0]


def _fused_bwd(residuals, g):
    logits, log_z, targets = residuals
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = (vocab == targets[..., None]).astype(jnp.float32)
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    dlogits = ((probs - onehot) * g[..., None]).astype(logits.dtype)
    return dlogits, None  # integer targets have no gradient


_fused.defvjp(_forward, _fused_bwd)
