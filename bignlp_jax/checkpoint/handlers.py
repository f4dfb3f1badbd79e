"""The Orbax handlers a checkpoint step is written and read with.

- `ProcessJsonHandler` (`ProcessJsonSave`/`ProcessJsonRestore`): the `data` item, one small JSON
  file per process;
- `state_handler()` reads the `state` item (the sharded TrainState) with our type handlers;
  `saving_state_handler()` writes it and checksums what it wrote (use with `StateSave`;
  checksum_writer.py, integrity.py).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bignlp_jax import storage
from bignlp_jax.checkpoint import checksum_writer
from bignlp_jax.compat import orbax as orbax_compat
from bignlp_jax.errors import UserError


class ProcessJsonHandler(ocp.CheckpointHandler):
    """One small JSON file per process (`process_<i>-of-<n>.json`): data iterator positions.

    Each process reads its own rows of every batch, so each has its own position. Restoring with
    another process count hands every process the position of process 0; the source's
    `set_state` then continues from it exactly (the synthetic and Grain sources are functions of
    the global step) or says why it cannot."""

    def save(self, directory, args: ProcessJsonSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (storage.path(directory) / name).write_text(json.dumps(args.item), encoding="utf-8")

    def restore(self, directory, args: ProcessJsonRestore | None = None) -> dict:
        directory = storage.path(directory)
        mine = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not mine.is_file():
            mine = directory / f"process_0-of-{_saved_process_count(directory)}.json"
        return json.loads(mine.read_text(encoding="utf-8"))

    def metadata(self, directory) -> None:
        return None


def _saved_process_count(directory: Path) -> int:
    files = list(directory.glob("process_0-of-*.json"))
    if not files:
        raise UserError(f"{directory} holds no data iterator state (process_0-of-N.json)")
    return int(files[0].stem.rsplit("-", 1)[1])


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# Orbax's "replica-parallel" save splits each replicated array among its replicas, which
# compiles one slicing program per array and sharding on the first save (15 s for the tiny model
# on CPU). It only pays off for big arrays, so it is limited to slices of at least this size.
REPLICA_PARALLEL_MIN_BYTES = 16 * 2**20


class ChecksummedPyTreeHandler(ocp.PyTreeCheckpointHandler):
    """The PyTree handler, plus CRC-32C checksums of every file it writes (see integrity.py):
    each process sums its own files once they are written, the primary the rest at finalize."""

    # set by RunCheckpointer: called with a write error of this process
    on_write_failure: Callable[[BaseException], None] | None = None

    async def async_save(self, directory, *args, **kwargs):
        futures = await super().async_save(directory, *args, **kwargs)
        return [checksum_writer.ChecksumAfter(futures, directory, jax.process_index(),
                                              self.on_write_failure)]

    def save(self, directory, *args, **kwargs) -> None:
        async def run():  # the base class's save would bypass our async_save
            for f in await self.async_save(directory, *args, **kwargs):
                f.result()

        orbax_compat.run_sync(run())

    def finalize(self, directory) -> None:
        super().finalize(directory)
        checksum_writer.write_primary_sums(storage.path(str(directory)), jax.process_count())


# Orbax maps each argument class to one handler: saves through the checksumming handler use
# their own subclass, so the plain PyTreeSave/PyTreeRestore keep meaning the plain handler.
@ocp.args.register_with_handler(ChecksummedPyTreeHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.PyTreeSave):
    pass


@ocp.args.register_with_handler(ChecksummedPyTreeHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.PyTreeRestore):  # Orbax wants a restore pair for every handler
    pass


def _type_handlers():
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(
            array_metadata_store=orbax_compat.array_metadata_store(),
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)),
    )


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """PyTree handler for reading the train state: the default type handlers, with the
    jax.Array one tuned as above."""
    return ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers())


def saving_state_handler() -> ChecksummedPyTreeHandler:
    """The same, for saving: it also checksums the files it writes (use with `StateSave`)."""
    return ChecksummedPyTreeHandler(type_handler_registry=_type_handlers())
