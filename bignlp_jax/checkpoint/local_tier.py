"""The local fast tier: frequent checkpoints on node-local disk or RAM, one directory per process.

The durable tier is the run dir's `checkpoints/` (shared storage or a bucket, every
`checkpoint.every_steps`). The local tier saves every `checkpoint.local_every_steps` (and first
when the run is told to stop) into `checkpoint.local_dir`, which is NOT shared between hosts:

    LOCAL_DIR/run-<hash of the run dir>/process_<i>/<step>/{state,data,meta}

Each process writes only the shards it holds (its Orbax CheckpointManager has
`primary_host=None`: every process is the primary of its own directory, as MaxText's emergency
checkpointing does), as raw shard files read back in one copy (shard_files.py: Orbax's own
array format restored only about 2x faster than the durable tier from RAM), its own data
position and the step's metadata, so a step restores on the same process layout and mesh only
(the layout fingerprint in `meta` says which). A step counts only when it is complete on EVERY
process (`agreed_steps`, one all-gather): a host that lost its RAM disk makes the run fall back.

Why not `orbax.checkpoint.experimental.emergency.CheckpointManager` (orbax 0.12.8): with one
data-parallel replica it ignores the local directory altogether (it needs >= 2 replicas and
restores by broadcasting from a replica that holds the step), its local tier takes the state
PyTree only (no data position or metadata beside it), and it is marked experimental. Our states
are often sharded over every process (fsdp), so the design here keeps Orbax's building blocks
(per-process primaries, its atomic step directories and retention) and does the agreement itself.

The run dir names the tier's directory, so two runs sharing `local_dir` never mix their steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint import fs_probe, integrity, shard_files
from bignlp_jax.checkpoint.handlers import ProcessJsonHandler, ProcessJsonSave
from bignlp_jax.checkpoint.manager import read_meta
from bignlp_jax.checkpoint.paths import DATA, META, STATE, complete_steps
from bignlp_jax.checkpoint.read_errors import DamagedCheckpoint, is_read_error
from bignlp_jax.checkpoint.step_metadata_log import quiet_step_metadata
from bignlp_jax.config import CheckpointConfig
from bignlp_jax.errors import UserError

LOCAL_KEY = "local"  # in a local step's meta: run dir, process index, layout fingerprint


class _QuietPerProcess(logging.Filter):
    """Orbax warns on every save that it cannot log a global size without a primary host."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "logging disabled for `primary_host=None`" not in record.getMessage()


_QUIET = _QuietPerProcess()


def _options() -> ocp.options.MultiprocessingOptions:
    # every process is the primary of its own, unshared directory; the barriers of the two
    # tiers' managers must not share names, the tiers save at different steps
    if _QUIET not in logging.getLogger("absl").filters:
        logging.getLogger("absl").addFilter(_QUIET)
    return ocp.options.MultiprocessingOptions(primary_host=None, barrier_sync_key_prefix="local")


def tier_root(local_dir: str | Path, run_dir: str | Path) -> Path:
    """This process's directory of the local tier for the run at `run_dir`."""
    run = str(storage.absolute(run_dir))
    digest = hashlib.sha256(run.encode()).hexdigest()[:12]
    return Path(local_dir).expanduser() / f"run-{digest}" / f"process_{jax.process_index()}"


def layout_fingerprint(target: Any) -> str:
    """Which slice of every array this process holds (device ids and index ranges), and the
    process layout: a local step restores only where this is unchanged, since each process
    reads back exactly the shards it wrote."""

    def leaf(x) -> list:
        indices = x.sharding.addressable_devices_indices_map(x.shape)
        return sorted([d.id, [[s.start, s.stop] for s in index]] for d, index in indices.items())

    text = json.dumps([jax.process_index(), jax.process_count(),
                       [leaf(x) for x in jax.tree.leaves(target)]], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_holds_whole_shards(state: Any) -> None:
    """Refuse a layout where this process's devices hold different replicas of different
    slices: writing one replica (what a per-process directory allows) would then miss a slice
    this process needs back."""
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        shards = getattr(x, "addressable_shards", None)
        if not shards:
            continue
        first = shards[0].replica_id
        wanted = {str(s.index) for s in shards}
        written = {str(s.index) for s in shards if s.replica_id == first}
        if wanted != written:
            raise UserError(
                f"checkpoint.local_dir cannot hold this mesh's state: process "
                f"{jax.process_index()} holds replicas of {jax.tree_util.keystr(path)} that "
                "one per-process directory cannot store\n"
                "  fix: lay the mesh out so each process's devices are one data-parallel "
                "replica (the default mesh order does), or unset checkpoint.local_dir")


class LocalCheckpointer:
    """This process's local tier: save asynchronously every few steps, keep `local_keep`."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, fingerprint: str):
        if cfg.local_dir is None:
            raise ValueError("LocalCheckpointer needs checkpoint.local_dir")
        self.directory = tier_root(cfg.local_dir, run_dir)
        self.run_dir = str(storage.absolute(run_dir))
        self.fingerprint = fingerprint
        self._checked = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.local_keep,  # pruning stays inside this directory
            enable_async_checkpointing=cfg.async_save,
            multiprocessing_options=_options(),
            enable_per_process_directory_creation=True,
            save_root_metadata=False,
            cleanup_tmp_directories=True,
            enable_background_delete=False,  # old steps go before the next save starts
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            create=True,
        )
        fs_probe.quiet_storage_errors()
        quiet_step_metadata()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: shard_files.ShardFilesHandler(), DATA: ProcessJsonHandler(),
                           META: ocp.JsonCheckpointHandler(multiprocessing_options=_options())},
        )

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        """Start saving `step` (returns once the arrays are off the devices); False if this
        process already holds it."""
        if not self._checked:
            check_holds_whole_shards(state)
            self._checked = True
        if step in self.manager.all_steps():
            return False
        self.wait()
        meta = {**meta, LOCAL_KEY: {"run_dir": self.run_dir, "process_index":
                                    jax.process_index(), "layout": self.fingerprint}}
        data_state = json.loads(json.dumps(data_state))  # the source moves on meanwhile
        with self._storage_errors(step):
            return self.manager.save(step, force=True, args=ocp.args.Composite(**{
                STATE: shard_files.ShardFilesSave(state), DATA: ProcessJsonSave(data_state),
                META: ocp.args.JsonSave(meta)}))

    def wait(self) -> None:
        with self._storage_errors(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()

    @contextlib.contextmanager
    def _storage_errors(self, step: int | None):
        try:
            yield
        except Exception as e:  # only storage errors are translated; others re-raised
            failure = fs_probe.save_failure(e, step or -1, self.directory, None)
            if failure is None:
                raise
            fs_probe.silence_leftovers()
            raise failure from None


def own_steps(root: Path, fingerprint: str) -> list[int]:
    """Complete steps in this process's local directory (`tier_root`: the run is in its name)
    saved on this layout (metadata readable, every checksummed file present), ascending."""
    usable = []
    for step in complete_steps(root):
        try:
            local = read_meta(root / str(step)).get(LOCAL_KEY, {})
        except UserError:
            continue
        if local.get("layout") == fingerprint:
            usable.append(step)
    return usable


def gather_steps(mine: list[int]) -> list[list[int]]:
    """Every process's list of steps (one or two small all-gathers), in process order."""
    if jax.process_count() == 1:
        return [list(mine)]
    counts = multihost_utils.process_allgather(np.array([len(mine)], np.int32))
    width = max(int(np.max(counts)), 1)
    padded = np.full((width,), -1, np.int64)
    padded[:len(mine)] = mine
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, width)
    return [[int(s) for s in row if s >= 0] for row in rows]


def agreed(per_process: list[list[int]]) -> list[int]:
    """The steps every process holds, ascending."""
    common = set(per_process[0]) if per_process else set()
    for steps in per_process[1:]:
        common &= set(steps)
    return sorted(common)


def discard_after(root: Path, step: int) -> list[int]:
    """Delete this process's local steps newer than `step` (held by some processes only, or
    from a trajectory a resume abandoned); returns them."""
    gone = [s for s in complete_steps(root) if s > step]
    for s in gone:
        shutil.rmtree(root / str(s), ignore_errors=True)
    return gone


def load_everywhere(step_dir: Path, load: Callable[[Path], Any]) -> tuple[Any, str | None]:
    """Each process loads its own copy of the step with `load` (`restore_state(verify=True)`
    checks the checksums on the bytes it loads: no separate read to verify first); the same
    verdict on every process: (what `load` returned, None), or (None, the first problem, with
    the process that found it) for a step damaged or unreadable on any process."""
    try:
        loaded, problem = load(step_dir), None
    except Exception as e:  # only a damaged step is a verdict; anything else is a bug
        if not is_read_error(e):
            raise
        loaded, problem = None, f"process {jax.process_index()}: {e}"
    if jax.process_count() > 1:
        flags = multihost_utils.process_allgather(np.array([problem is not None], np.int32))
        bad = [i for i, f in enumerate(np.asarray(flags).reshape(-1)) if f]
        if bad and problem is None:
            problem = f"process {bad[0]} found a damaged file (see its log)"
    return (None, problem) if problem else (loaded, None)


def restore_state(step_dir: Path, target: Any, verify: bool = False) -> Any:
    """The train state of a local step (this process's copy), laid out as `target` says: the
    layout it was saved on (`layout_fingerprint`), each shard from its own file; `verify`:
    every file checked against its checksum as it is read (ValueError naming the first bad),
    and the step's data position and metadata against theirs."""
    if verify and (problem := integrity.verify_items(step_dir)):
        raise DamagedCheckpoint(problem)
    return shard_files.read_tree(storage.path(step_dir) / STATE, target, verify)
