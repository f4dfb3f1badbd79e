"""Flax NNX decoder-only transformer and its functional (params-dict) interface."""

from bignlp_jax.model.functional import (
    abstract_params,
    count_params,
    forward,
    init_params,
    model_kernels,
    param_axes,
    param_shardings,
)
from bignlp_jax.model.kernels import REFERENCE, Kernels, select_kernels
from bignlp_jax.model.transformer import Transformer, init_cache

__all__ = [
    "REFERENCE", "Kernels", "Transformer", "abstract_params", "count_params", "forward",
    "init_cache", "init_params", "model_kernels", "param_axes", "param_shardings",
    "select_kernels",
]
