"""Optax AdamW with global-norm clipping, a weight-decay mask, and warmup + decay schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bignlp_jax.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then the configured decay.

    step:     lr * gamma ** (number of boundaries passed); boundaries are counted in global steps,
              either listed (`boundaries`) or every `decay_every` steps after warmup.
    cosine:   cosine from lr to lr * min_lr_ratio over `decay_steps` (default: the rest of the run).
    linear:   straight line over the same span.
    constant: lr after warmup.
    """
    warmup = cfg.warmup_steps
    decay_steps = max(1, (cfg.decay_steps or total_steps) - warmup)
    end = cfg.lr * cfg.min_lr_ratio

    if cfg.schedule == "step":
        boundaries = jnp.asarray(cfg.boundaries or [], jnp.int32)

        def decay(step):
            step = jnp.asarray(step)
            if cfg.boundaries is not None:
                passed = jnp.sum(step >= boundaries)
            else:  # the config requires boundaries or decay_every for a step schedule
                assert cfg.decay_every is not None
                passed = jnp.maximum(step - warmup, 0) // cfg.decay_every
            return cfg.lr * cfg.gamma ** passed.astype(jnp.float32)

        after = decay
    elif cfg.schedule == "cosine":
        cosine = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
        after = lambda step: cosine(step - warmup)  # noqa: E731
    elif cfg.schedule == "linear":
        linear = optax.linear_schedule(cfg.lr, end, decay_steps)
        after = lambda step: linear(step - warmup)  # noqa: E731
    else:
        after = lambda step: jnp.asarray(cfg.lr, jnp.float32)  # noqa: E731

    def schedule(step):
        step = jnp.asarray(step)
        ramp = cfg.lr * (step + 1) / max(warmup, 1)  # reaches lr on the last warmup step
        return jnp.where(step < warmup, ramp, after(step)).astype(jnp.float32)

    return schedule


def decay_mask(params):
    """Weight decay on matrices only: norms, biases and other vectors are excluded.

    Stacked layer parameters carry a leading `layers` axis, so "a vector" means a tensor whose
    non-layer part is one-dimensional; the key names make that unambiguous."""

    def wants_decay(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        parent = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        if "norm" in parent or "bias" in name or name in ("bi", "bo", "scale"):
            return False
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
