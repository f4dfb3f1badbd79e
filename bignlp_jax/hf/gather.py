"""Bring one parameter (or one layer of a stacked one) to host memory, from any sharding.

Export walks the model tensor by tensor: each call gathers a single array to every process
(`process_allgather` across hosts), so host memory stays near one layer's tensor however large
the model. Every process must make the same calls in the same order (they are collectives);
only process 0 writes files. The cast to the export dtype happens on device, before the copy.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax.errors import UserError


@functools.partial(jax.jit, static_argnames="dtype")
def _layer(x: jax.Array, i, dtype) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _whole(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype)


def to_host(x, dtype: np.dtype, layer: int | None = None) -> np.ndarray:
    """`x` (or `x[layer]`) cast to `dtype`, as a numpy array on this host."""
    dtype = np.dtype(dtype)
    if not isinstance(x, jax.Array):  # already on the host (numpy)
        return np.asarray(x if layer is None else x[layer]).astype(dtype)
    y = _whole(x, dtype) if layer is None else _layer(x, layer, dtype)
    if y.is_fully_addressable:
        return np.asarray(jax.device_get(y))
    return np.asarray(multihost_utils.process_allgather(y, tiled=True))


def is_writer() -> bool:
    """Only process 0 writes export files; the others only take part in the gathers."""
    return jax.process_index() == 0


def check_on_writer(check) -> None:
    """Run `check()` (raises UserError) on process 0 and make every process raise with it.

    Without this, a refusal on process 0 (say, an --out directory it will not overwrite) would
    leave the other processes waiting in the next collective."""
    error = None
    if is_writer():
        try:
            check()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            raise UserError("process 0 refused to write the export (its log says why)")
    if error is not None:
        raise error
