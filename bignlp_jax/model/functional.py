"""A functional view of the NNX model: parameters are a plain nested dict of arrays.

Training, checkpointing and export all work on that dict; `forward` merges it back into the module
graph inside jit. Parameters are born sharded: `init_params` is jitted with output shardings
derived from each parameter's logical axes. The kernels each op runs are resolved once per
config here (`model_kernels`) and handed to the layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from bignlp_jax.config import ModelConfig
from bignlp_jax.model.kernels import REFERENCE, Kernels, select_kernels
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.model.pipeline import PipelineSpec
from bignlp_jax.model.transformer import Transformer
from bignlp_jax.parallel.rules import MeshAxes, sharding_for

Params = dict[str, Any]


@functools.lru_cache(maxsize=16)
def model_kernels(cfg: ModelConfig) -> Kernels:
    """The kernels this process runs for `cfg`: `model.kernels` resolved for the platform of
    the default devices. The one place the model looks at the backend, once per config."""
    return select_kernels(cfg, jax.devices()[0].platform)


@functools.lru_cache(maxsize=16)
def _template(cfg: ModelConfig, kernels: Kernels = REFERENCE):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), kernels=kernels))
    return nnx.split(abstract)


def graphdef(cfg: ModelConfig, kernels: Kernels | None = None):
    """The module graph (no parameters) running `kernels` (default: `model_kernels(cfg)`)."""
    return _template(cfg, kernels or model_kernels(cfg))[0]


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of every parameter (ShapeDtypeStruct leaves); nothing is allocated."""
    return nnx.to_pure_dict(_template(cfg)[1])


def param_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, as tuples, in the params dict's structure."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(_template(cfg)[1]))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes]) -> Params:
    """NamedSharding of every parameter under `rules` (checks that each split divides evenly)."""
    shapes = abstract_params(cfg)
    axes = param_axes(cfg)

    def one(path, shape):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        return sharding_for(mesh, get_path(axes, path), rules, shape.shape,
                            name=f"parameter {name}")

    return jax.tree_util.tree_map_with_path(one, shapes)


def get_path(tree, path):
    for p in path:
        tree = tree[getattr(p, "key", p)]
    return tree


def init_params(cfg: ModelConfig, key: jax.Array, shardings: Params | None = None) -> Params:
    """Initialise parameters from `key`, compiled so each one is created already sharded."""

    def make(key):
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=key)), nnx.Param))

    return jax.jit(make, out_shardings=shardings)(key)


def forward(cfg: ModelConfig, params: Params, tokens, positions=None, segment_ids=None, *,
            cache=None, cache_index=None, slot_index=None, kernels: Kernels | None = None,
            lora: LoraSpec | None = None, lora_key: jax.Array | None = None,
            pipeline: PipelineSpec | None = None):
    """Run the model on `params` (pure function; call it inside jit). kernels: default
    `model_kernels(cfg)`; tests pass others (the reference, another backend's choice).
    Adapters under params["lora"] run beside their projections (`lora` says how; lora_key:
    adapter dropout, training only). pipeline: run the layers as pipeline stages."""
    adapters = None
    if LORA_KEY in params:
        if lora is None:
            raise ValueError("params hold LoRA adapters but no LoraSpec was given")
        params = dict(params)
        adapters = (lora, params.pop(LORA_KEY), lora_key)
    model = nnx.merge(graphdef(cfg, kernels), params)
    return model(tokens, positions, segment_ids, cache=cache, cache_index=cache_index,
                 slot_index=slot_index, lora=adapters, pipeline=pipeline)


def count_params(params_or_shapes: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params_or_shapes))
