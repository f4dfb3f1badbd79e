"""Save and restore whole training states with an Orbax `CheckpointManager`.

One step directory holds three items: `state` (the sharded TrainState: every process writes its
own shards into the same directory), `data` (each process's data iterator position, one JSON
file per process) and `meta` (resolved config, tokenizer reference, mesh, process count).
Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the
write finishes in a background thread while training continues; `wait`/`close` block until it is
durable. Orbax writes into a temporary directory and renames it only when every process is
done, so a crash mid-save never leaves a step that looks complete. The handlers each item is
written and read with are in handlers.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy

from bignlp_jax import outage, storage
from bignlp_jax.checkpoint import fs_probe
from bignlp_jax.checkpoint.handlers import (
    ProcessJsonHandler,
    ProcessJsonSave,
    StateSave,
    saving_state_handler,
    state_handler,
)
from bignlp_jax.checkpoint.paths import DATA, META, STATE, checkpoints_dir, complete_steps
from bignlp_jax.checkpoint.step_metadata_log import quiet_step_metadata
from bignlp_jax.config import CheckpointConfig
from bignlp_jax.errors import UserError
from bignlp_jax.parallel import peer_watch


def preservation(cfg: CheckpointConfig):
    """Keep the newest `keep` steps, plus every multiple of `keep_every` for good."""
    policies = [keep_policy.LatestN(n=cfg.keep)]
    if cfg.keep_every:
        policies.append(keep_policy.EveryNSteps(interval_steps=cfg.keep_every))
    return keep_policy.AnyPreservationPolicy(policies)


class RunCheckpointer:
    """The checkpoints of one run (`RUN_DIR/checkpoints`): save asynchronously, list, wait."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.directory = checkpoints_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation(cfg),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by a crash
            # the step directory is made in `save` itself: made in the background, a failure
            # (read-only mount, permission) left the save waiting ~300 s for a signal
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            create=True,
        )
        self.failed = False
        self.durable_step: int | None = None  # the newest step known durable (set in `wait`)
        self._pending: tuple[int, int] | None = None  # (step, bytes) of the newest save
        fs_probe.quiet_storage_errors()
        quiet_step_metadata()
        state_saver = saving_state_handler()
        state_saver.on_write_failure = self._write_failed
        self.manager = ocp.CheckpointManager(
            storage.absolute(self.directory), options=options,
            item_handlers={STATE: state_saver, DATA: ProcessJsonHandler(),
                           META: ocp.JsonCheckpointHandler()},
        )
        self.durable_step = max(self.manager.all_steps(), default=None)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        """Start saving `step` (returns once the arrays are off the devices); False if the step
        already exists (e.g. a run resumed at its final step). A storage failure (full disk,
        read-only, quota, permission) raises CheckpointWriteError naming step, path and error."""
        with outage.bounded(f"saving checkpoint step {step}", self.directory):
            return self._save(step, state, data_state, meta)

    def _save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        if step in self.manager.all_steps():
            return False
        self.wait()  # the previous save (Orbax waits for it anyway): its failure surfaces here
        needed = self._step_bytes(state)
        self._pending = (step, needed)
        self._check_space(step, needed)
        # a copy taken now: the source moves on while the save finishes in the background
        data_state = json.loads(json.dumps(data_state))
        with self._storage_errors():
            return self.manager.save(step, force=True, args=ocp.args.Composite(**{
                STATE: StateSave(state),
                DATA: ProcessJsonSave(data_state),
                META: ocp.args.JsonSave(meta),
            }))

    def wait(self) -> None:
        """Block until every started save is durable (committed by all processes)."""
        operation = (f"the save of checkpoint step {self._pending[0]}" if self._pending
                     else "a checkpoint save")
        with outage.bounded(operation, self.directory), self._storage_errors():
            self.manager.wait_until_finished()
        if self._pending is not None:
            self.durable_step = max(self.durable_step or 0, self._pending[0])

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.failed:  # already reported: do not bury the message under Orbax's
                with contextlib.suppress(Exception):
                    self.manager.close()
            else:
                self.manager.close()

    def _step_bytes(self, state: Any) -> int:
        """What the next step will take on disk: the newest complete step's size, else the
        state's array bytes (the first save)."""
        steps = complete_steps(self.directory)
        if steps:
            return fs_probe.size_on_disk(self.directory / str(steps[-1]))
        return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))

    def _check_space(self, step: int, needed: int) -> None:
        """Every process stops (or none does), so no process waits at a save barrier alone."""
        try:
            fs_probe.check_space(self.directory, step, needed)
            short = None
        except fs_probe.CheckpointWriteError as e:
            short = e
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.array([short is not None], np.int32))
            if short is None and int(np.max(flags)):
                short = fs_probe.CheckpointWriteError(
                    f"cannot save checkpoint step {step} in {self.directory}: another process "
                    "found too little free space (see its message)")
        if short is not None:
            self.failed = True
            raise short

    def _write_failed(self, error: BaseException) -> None:
        """This process's share of a save failed on storage (its disk only, perhaps). In a job of
        several processes Orbax would now wait at a barrier for the others, who wait for this
        process's commit: a deadlock until Orbax's barrier timeout. So this process reports
        the failure and leaves at once, and the others stop within a second naming it
        (peer_watch.stop_job). One process: the error surfaces in `save`/`wait` as usual."""
        if self._pending is None or jax.process_count() == 1:
            return
        step, needed = self._pending
        failure = fs_probe.save_failure(error, step, self.directory, needed)
        if failure is None:
            return
        self.failed = True
        fs_probe.silence_leftovers()
        peer_watch.stop_job(str(failure), failure.exit_code)

    @contextlib.contextmanager
    def _storage_errors(self):
        """Storage failures from Orbax/TensorStore -> one CheckpointWriteError; Orbax's own
        logged tracebacks of the same failure are dropped (see fs_probe.QuietStorageErrors)."""
        try:
            yield
        except Exception as e:  # only storage errors are translated; others re-raised
            step, needed = self._pending or (None, None)
            failure = fs_probe.save_failure(e, step, self.directory, needed)
            if failure is None:
                raise
            self.failed = True
            fs_probe.silence_leftovers()
            raise failure from None


def step_meta(cfg, mesh: jax.sharding.Mesh, step: int) -> dict:
    """What a checkpoint says about itself besides the arrays (JSON)."""
    return {
        "step": step,
        "config": cfg.model_dump(mode="json"),
        "tokenizer": cfg.data.tokenizer,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }


def read_meta(step_dir: Path) -> dict:
    path = storage.path(step_dir) / META / "metadata"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def restore_state(step_dir: Path, target: Any,
                  handler: ocp.PyTreeCheckpointHandler | None = None) -> Any:
    """The saved TrainState, laid out as `target` says (ShapeDtypeStructs with the shardings of
    the current mesh: any mesh or device count works, Orbax reads the needed slices).
    `handler`: another reading handler (the local tier's, local_tier.py)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.Checkpointer(handler or state_handler()) as checkpointer:
        # partial: keys the target leaves out (an older version's unused `rng`) are not read
        return checkpointer.restore(storage.absolute(step_dir) / STATE, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))


def restore_data_state(step_dir: Path) -> dict:
    return ProcessJsonHandler().restore(storage.path(step_dir) / DATA)
