"""The train state (everything needed to continue a run exactly) and its shardings."""

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
from bignlp_jax.model.transformer import Transformer
from bignlp_jax.parallel.rules import MeshAxes


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: dict[str, Any]
    opt_state: Any
    # No RNG: nothing in the step is random (no dropout). A key would go here, with per-step
    # keys fold_in(key, step), when something is.


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: dict[str, MeshAxes]) -> TrainState:
    """Shardings for every leaf: optimizer moments follow their parameter, scalars replicate."""
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = param_shardings(model_cfg, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params(model_cfg))
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated)
    # a TrainState-shaped tree of shardings (what jit's in/out_shardings take)
    return TrainState(step=replicated, params=p_sh, opt_state=opt_sh)  # type: ignore[arg-type]


def abstract_state(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                   shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for checkpoints and AOT compiles."""
    shapes = jax.eval_shape(lambda: _fresh_state(model_cfg, tx, jax.random.key(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def _fresh_state(model_cfg, tx, key) -> TrainState:
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
    """A new state from `seed`, compiled so every array is created already sharded.

    The seed is split by purpose: fold_in(seed, 0) initialises parameters; the data order uses
    the seed on the host side."""
    init_key = jax.random.fold_in(jax.random.key(seed), 0)
    make = jax.jit(lambda k: _fresh_state(model_cfg, tx, k), out_shardings=shardings)
    return make(init_key)


def with_params(state: TrainState, params: dict[str, Any], tx: optax.GradientTransformation,
                shardings: TrainState) -> TrainState:
    """A step-0 state around given parameters (fresh optimizer state): for `init_from`."""
    make = jax.jit(lambda s, p: s.replace(params=p, opt_state=tx.init(p),
                                          step=jnp.zeros((), jnp.int32)),
                   out_shardings=shardings, donate_argnums=0)
    return make(state, params)
