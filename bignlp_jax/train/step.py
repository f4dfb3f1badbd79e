"""The loss, one pure jitted train step (with gradient accumulation), and the eval step.

A batch is a dict of [B, T] arrays: `tokens`, `targets`, `positions`, `segment_ids` (0 = padding)
and `loss_mask` (1.0 where the target counts). Losses are means over counted target tokens, so a
step's loss does not depend on how the batch was split into microbatches or devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bignlp_jax.config import Config
from bignlp_jax.errors import UserError
from bignlp_jax.model import forward, model_kernels
from bignlp_jax.model.context_attention import zigzag_order
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.model.loss import token_cross_entropy
from bignlp_jax.model.pipeline import PipelineSpec, split_fits
from bignlp_jax.parallel.rules import MeshAxes, activation_sharding, constrain, logical_to_spec
from bignlp_jax.train.state import TrainState, trainable, with_trainable

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def batch_sharding(mesh: Mesh, rules: dict[str, MeshAxes]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))


def pipeline_spec(cfg: Config, data_parallel: int = 1) -> PipelineSpec | None:
    """The pipeline schedule of `cfg` (None with one stage), checked against the model and the
    batch: raises UserError naming the keys and the values that would work."""
    S, R = cfg.mesh.stages, cfg.train.pipeline_repeats
    if S == 1:
        return None
    M = cfg.train.pipeline_microbatches or 2 * S
    L = cfg.model.num_layers
    stages = (f"mesh.stage x mesh.dcn_stage = {cfg.mesh.stage} x {cfg.mesh.dcn_stage} = {S} "
              f"stages")
    if not split_fits(L, S * R):
        valid = [n for n in range(1, L + 1) if split_fits(L, n)]
        K = -(-L // (S * R))
        raise UserError(
            f"model.num_layers={L} does not split into {stages} x train.pipeline_repeats={R}: "
            f"groups of {K} layer slots would leave {S * R * K - L} identity slots, a whole "
            f"group's worth or more; stages x repeats must be one of "
            f"{', '.join(map(str, valid))}")
    if R > 1 and M < S:
        raise UserError(
            f"train.pipeline_microbatches={M} is fewer than the {S} stages "
            f"({stages}): the circular schedule (train.pipeline_repeats={R}) feeds each "
            f"microbatch back to stage 0, which needs train.pipeline_microbatches >= {S}")
    rows = cfg.train.global_batch_size // cfg.train.microbatches
    if rows % (M * data_parallel):
        valid = [m for m in range(1, rows + 1) if rows % (m * data_parallel) == 0]
        raise UserError(
            f"train.pipeline_microbatches={M} does not divide the per-step batch of {rows} rows "
            f"(train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
            f"{cfg.train.microbatches}) into microbatches of a multiple of {data_parallel} "
            f"rows (the data-parallel devices, mesh.data x mesh.fsdp); valid: "
            f"{', '.join(map(str, valid)) or 'none: change the batch'}")
    return PipelineSpec(S, M, R, gather_once=cfg.train.pipeline_fsdp_gather == "step")


def token_losses(params, batch, cfg: Config, key: jax.Array | None = None):
    """(per-token losses -log p(target), [B, T] float32; loss mask, [B, T] float32). key:
    randomness of training (LoRA dropout); None for evaluation. Params without adapters run the
    base model (the frozen reference of preference tuning, train/dpo.py)."""
    slot_index = None
    if cfg.mesh.sequence > 1:
        # Context parallelism: rows permuted once into zig-zag order (equal causal work per
        # device); losses are summed over tokens, so the order does not change them.
        B, T = batch["tokens"].shape
        order = zigzag_order(T, cfg.mesh.sequence)
        batch = {k: constrain(v[:, order], ("batch", "seq")) for k, v in batch.items()}
        slot_index = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, T))
    logits, _ = forward(cfg.model, params, batch["tokens"], batch["positions"],
                        batch["segment_ids"], slot_index=slot_index,
                        kernels=model_kernels(cfg.model),
                        lora=LoraSpec.from_config(cfg.lora), lora_key=key,
                        pipeline=pipeline_spec(cfg))
    mask = batch["loss_mask"].astype(jnp.float32)
    return token_cross_entropy(logits, batch["targets"]), mask


def loss_sums(params, batch, cfg: Config, key: jax.Array | None = None):
    """(sum of masked token losses, number of counted tokens). key: randomness of training
    (LoRA dropout); None for evaluation."""
    losses, mask = token_losses(params, batch, cfg, key)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _grads(params, batch, cfg: Config, key: jax.Array, sums: Callable | None = None):
    """Summed loss, summed aux (the token count; or a dict of sums) and summed gradients of the
    trainable parameters (all, or the LoRA adapters: the frozen base gets no gradient),
    accumulated over `train.microbatches`. sums(params, batch, key) -> (loss sum, aux);
    default: `loss_sums` (language modelling)."""
    if sums is None:
        def sums(p, b, k):
            return loss_sums(p, b, cfg, k)

    def loss_of_trainable(train, batch, key):
        return sums(with_trainable(params, train), batch, key)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
    train = trainable(params)
    M = cfg.train.microbatches
    if M == 1:
        (loss, count), grads = grad_fn(train, batch, key)
        return loss, count, grads

    # Microbatch m takes rows m, m+M, m+2M, ... so every device holds a share of each one.
    def split(x):
        B = x.shape[0]
        x = x.reshape(B // M, M, *x.shape[1:]).swapaxes(0, 1)  # [M, B/M, T]
        return x

    micro = jax.tree.map(split, batch)

    def body(carry, xs):
        loss, count, grads = carry
        mb, m = xs
        mb = jax.tree.map(lambda x: constrain(x, ("batch", "seq")), mb)
        (l, c), g = grad_fn(train, mb, jax.random.fold_in(key, m))
        return (loss + l, jax.tree.map(jnp.add, count, c), jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, train)
    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(loss_of_trainable, train, first, key)[1]
    no_aux = jax.tree.map(lambda _: 0.0, aux_shape)  # the token count: a scalar 0.0
    (loss, count, grads), _ = jax.lax.scan(body, (0.0, no_aux, zeros), (micro, jnp.arange(M)))
    return loss, count, grads


def make_train_step(cfg: Config, tx: optax.GradientTransformation, schedule: Callable,
                    mesh: Mesh, rules: dict[str, MeshAxes], state_sh: TrainState):
    """Compile-ready train step: (state, batch) -> (state, metrics); the state is donated."""

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        # this step's key, a function of (seed, step) alone (train/state.py): dropout, if any
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.run.seed), 1), state.step)
        with activation_sharding(mesh, rules):
            loss_sum, count, grad_sums = _grads(state.params, batch, cfg, key)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sums)
        train = trainable(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        params = with_trainable(state.params, optax.apply_updates(train, updates))
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state.step),
            "tokens": count,
        }
        new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                        opt_state=opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    b_sh = batch_sharding(mesh, rules)
    return jax.jit(step, in_shardings=(state_sh, {k: b_sh for k in BATCH_KEYS}),
                   out_shardings=(state_sh, replicated), donate_argnums=0)


def make_eval_step(cfg: Config, mesh: Mesh, rules: dict[str, MeshAxes], params_sh):
    """(params, batch) -> (summed loss, token count), sharded like training."""

    def step(params, batch):
        with activation_sharding(mesh, rules):
            return loss_sums(params, batch, cfg)

    b_sh = batch_sharding(mesh, rules)
    return jax.jit(step, in_shardings=(params_sh, {k: b_sh for k in BATCH_KEYS}))
