"""The train state (everything needed to continue a run exactly) and its shardings.

With LoRA (model/lora.py) the params dict also holds the adapters under `lora`: the base
parameters are frozen, so only the adapters (`trainable`) get gradients and optimizer state."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bignlp_jax.config import ModelConfig
from bignlp_jax.model import abstract_params, param_shardings
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec, adapter_axes, adapter_shapes, init_adapters
from bignlp_jax.model.transformer import Transformer
from bignlp_jax.parallel.rules import MeshAxes, sharding_for


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]
    opt_state: Any
    # No RNG leaf: the one random part of a step (LoRA dropout) is keyed by
    # fold_in(fold_in(key(run.seed), 1), step), a function of the config and the step alone.


def trainable(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that train: the adapters with LoRA, else all of them."""
    return params.get(LORA_KEY, params)


def with_trainable(params: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`params` with its trainable part replaced by `new` (the frozen part passed through)."""
    return {**params, LORA_KEY: new} if LORA_KEY in params else new


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: dict[str, MeshAxes], lora: LoraSpec | None = None) -> TrainState:
    """Shardings for every leaf: optimizer moments follow their parameter, scalars replicate.
    With `lora`, adapters shard by their logical axes like the layers they adapt."""
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = param_shardings(model_cfg, mesh, rules)
    shapes = abstract_params(model_cfg)
    if lora is not None:
        axes, a_shapes = adapter_axes(model_cfg, lora), adapter_shapes(model_cfg, lora)
        p_sh[LORA_KEY] = jax.tree.map(
            lambda ax, s: sharding_for(mesh, ax, rules, s.shape, name="a LoRA adapter"),
            axes, a_shapes, is_leaf=lambda x: isinstance(x, tuple))
        shapes = {**shapes, LORA_KEY: a_shapes}
    abstract_opt = jax.eval_shape(tx.init, trainable(shapes))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, trainable(p_sh),
                                   transform_non_params=lambda _: replicated)
    # a TrainState-shaped tree of shardings (what jit's in/out_shardings take)
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh)  # type: ignore[arg-type]


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                   shardings: TrainState, lora: LoraSpec | None = None) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints and AOT compiles."""
    shapes = jax.eval_shape(lambda: _fresh_state(model_cfg, tx, jax.random.key(0), lora))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def _fresh_state(model_cfg, tx, key, lora=None) -> TrainState:
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if lora is not None:  # adapters from their own key: the base init is the same as without
        params[LORA_KEY] = init_adapters(model_cfg, lora, jax.random.fold_in(key, 1))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(trainable(params)))


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState, lora: LoraSpec | None = None) -> TrainState:
    """A new state from `seed`, compiled so every array is created already sharded.

    The seed is split by purpose: fold_in(seed, 0) initialises parameters (fold_in of that by 1
    the LoRA adapters), fold_in(seed, 1) keys the random parts of a step (LoRA dropout; see
    train/step.py); the data order uses the seed on the host side."""
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    make = jax.jit(lambda k: _fresh_state(model_cfg, tx, k, lora), out_shardings=shardings)
    return make(init_key)


def with_params(state: TrainState, params: dict[str, Any], tx: optax.GradientTransformation,
                shardings: TrainState) -> TrainState:
    """A step-0 state around given parameters (fresh optimizer state): for `init_from`. With
    LoRA, `params` are the base parameters and the state's fresh adapters are kept."""

    def make(s, p):
        if LORA_KEY in s.params:
            p = {**p, LORA_KEY: s.params[LORA_KEY]}
        return s.replace(params=p, opt_state=tx.init(trainable(p)),
                         step=jnp.zeros((), jnp.int32))

    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(state, params)
