"""Preference tuning (DPO, IPO, hinge): the jitted train and eval steps for task.type=preference.

A batch holds B pairs as `chosen_*` and `rejected_*` [B, T] arrays (data/tasks/preference.py).
Both sides run through the policy as one [2B, T] forward, as TRL's concatenated forward does,
and through the reference in the same jitted step: with LoRA the reference is the same base
weights with the adapters left out (no second copy); without LoRA it is a frozen copy of the
`init_from` parameters, sharded like the policy and passed beside the state (never saved: it is
read from init_from again on every start, so a resumed run continues bitwise). The loss is a
sum over pairs divided by the number of pairs, so microbatches and device splits do not change it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bignlp_jax.config import Config
from bignlp_jax.data.tasks.formats import ROW_KEYS
from bignlp_jax.data.tasks.preference import PAIR_KEYS
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.preference_loss import REWARD_METRICS, preference_loss
from bignlp_jax.parallel.rules import MeshAxes, activation_sharding
from bignlp_jax.train.state import TrainState, trainable, with_trainable
from bignlp_jax.train.step import _grads, batch_sharding, token_losses

PAIRS = "pairs"  # aux key: how many real pairs (padding pairs of a held-out pass have no tokens)


def is_preference(cfg: Config) -> bool:
    return cfg.task is not None and cfg.task.type == "preference"


def needs_reference_copy(cfg: Config) -> bool:
    """Without LoRA the reference is a second, frozen set of parameters."""
    return is_preference(cfg) and not cfg.lora.rank


def sequence_logps(params, batch, cfg: Config, key: jax.Array | None = None):
    """(summed answer log-probabilities [2B], answer token counts [2B]) of both sides of the
    pairs, chosen first: one forward over the [2B, T] concatenation."""
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
            for k in ROW_KEYS}
    losses, mask = token_losses(params, both, cfg, key)
    return -jnp.sum(losses * mask, axis=1), jnp.sum(mask, axis=1)


def reference_logps(params, ref_params, batch, cfg: Config) -> jax.Array:
    """Summed answer log-probabilities [2B] of the reference, no gradient: `ref_params`, or
    with LoRA (ref_params None) the base weights of `params` with the adapters off."""
    if ref_params is None:
        ref_params = {k: v for k, v in params.items() if k != LORA_KEY}
    logps, _ = sequence_logps(jax.lax.stop_gradient(ref_params), batch, cfg)
    return jax.lax.stop_gradient(logps)


def pair_sums(params, ref_params, batch, cfg: Config, key: jax.Array | None = None):
    """(summed loss over real pairs, {pairs: their count, metric: its sum over them})."""
    logps, tokens = sequence_logps(params, batch, cfg, key)
    ref = reference_logps(params, ref_params, batch, cfg)
    B = logps.shape[0] // 2
    dpo = cfg.dpo
    losses, metrics = preference_loss(
        logps[:B], logps[B:], ref[:B], ref[B:], tokens[:B], tokens[B:], beta=dpo.beta,
        loss=dpo.loss, label_smoothing=dpo.label_smoothing)
    real = (tokens[:B] > 0).astype(jnp.float32)
    aux = {name: jnp.sum(value * real) for name, value in metrics.items()}
    aux[PAIRS] = jnp.sum(real)
    return jnp.sum(losses * real), aux


def pair_means(loss_sum, aux) -> dict[str, jax.Array]:
    """Means over pairs: `loss` and the metrics under TRL's names."""
    denom = jnp.maximum(aux[PAIRS], 1.0)
    return {"loss": loss_sum / denom, **{k: aux[k] / denom for k in REWARD_METRICS}}


def pair_batch_sharding(mesh: Mesh, rules: dict[str, MeshAxes]) -> dict[str, NamedSharding]:
    b_sh = batch_sharding(mesh, rules)
    return {k: b_sh for k in PAIR_KEYS}


def make_dpo_train_step(cfg: Config, tx: optax.GradientTransformation, schedule: Callable,
                        mesh: Mesh, rules: dict[str, MeshAxes], state_sh: TrainState):
    """(state, batch, ref_params) -> (state, metrics), jitted, the state donated; ref_params is
    None with LoRA."""

    def step(state: TrainState, batch, ref_params) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.run.seed), 1), state.step)

        def sums(params, b, k):
            return pair_sums(params, ref_params, b, cfg, k)

        with activation_sharding(mesh, rules):
            loss_sum, aux, grad_sums = _grads(state.params, batch, cfg, key, sums)
        denom = jnp.maximum(aux[PAIRS], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sums)
        train = trainable(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        params = with_trainable(state.params, optax.apply_updates(train, updates))
        metrics = {**pair_means(loss_sum, aux), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "tokens": aux[PAIRS]}
        new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                        opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    ref_sh = _base(state_sh.params) if needs_reference_copy(cfg) else None
    jitted = jax.jit(step, in_shardings=(state_sh, pair_batch_sharding(mesh, rules), ref_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=0)
    return WithReference(jitted, ref_sh)


def make_dpo_eval_step(cfg: Config, mesh: Mesh, rules: dict[str, MeshAxes], params_sh):
    """(params, batch) -> (summed loss, {pairs, metric sums}), with the reference beside."""

    def step(params, batch, ref_params):
        with activation_sharding(mesh, rules):
            return pair_sums(params, ref_params, batch, cfg)

    ref_sh = _base(params_sh) if needs_reference_copy(cfg) else None
    jitted = jax.jit(step, in_shardings=(params_sh, pair_batch_sharding(mesh, rules), ref_sh))
    return WithReference(jitted, ref_sh)


def _base(params_sh):
    return {k: v for k, v in params_sh.items() if k != LORA_KEY}


@dataclasses.dataclass
class WithReference:
    """A jitted step called as (first, batch) like the language-modelling steps, with the
    frozen reference parameters (None with LoRA) passed as its last argument."""

    jitted: Any
    ref_shardings: Any = None
    reference: Any = None

    def __call__(self, first, batch):
        if self.ref_shardings is not None and self.reference is None:
            raise RuntimeError("the DPO step needs its reference parameters (set_reference)")
        return self.jitted(first, batch, self.reference)

    def lower(self, first, batch):
        """Ahead-of-time lowering from abstract inputs; the reference is abstract too."""
        ref = self.reference
        if ref is None and self.ref_shardings is not None:
            params = first.params if isinstance(first, TrainState) else first
            ref = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                _base(params), self.ref_shardings)
        return self.jitted.lower(first, batch, ref)
