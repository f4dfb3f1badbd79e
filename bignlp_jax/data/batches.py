"""Host-local batches -> one global, sharded batch; and which rows a process must read.

Each process reads only the rows of the global batch that live on its own devices, then
`jax.make_array_from_process_local_data` stitches the global array together without copies
between hosts. Row ownership comes from the batch sharding itself, so it is right for any mesh
and any number of processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

if TYPE_CHECKING:  # jax itself is imported where it is used: `data --help` must not load it
    import jax
    from jax.sharding import NamedSharding


class BatchSource(Protocol):
    """An iterator of host-local batches (dicts of [local_rows, T] numpy arrays) whose position
    can be saved and restored, so a resumed run reads exactly the batches it would have read."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def process_rows(sharding: NamedSharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """[start, stop) of the global batch rows this process's devices hold (must be contiguous)."""
    # jax annotates the values `Index | None`, but they come from devices_indices_map: never None
    index_map = cast("dict[Any, tuple[slice, ...]]",
                     sharding.addressable_devices_indices_map((global_batch, seq_len)))
    starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch)
                     for idx in index_map.values()})
    start, stop = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != stop - start:
        import jax  # only on this error path

        raise RuntimeError(
            f"process {jax.process_index()} holds non-contiguous batch rows {starts}; "
            "build the mesh with jax.make_mesh so each host owns a contiguous block"
        )
    return start, stop


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """Assemble the global [B, T] arrays from every process's rows."""
    import jax  # jax: loaded by the training run, not at import (`data --help` stays fast)

    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (global_batch_size, *np.shape(v)[1:])
        )
        for k, v in local.items()
    }
