"""Where checkpoints live, and which of them are complete: plain file-system reads, no devices.

Layout of a checkpoints directory (RUN_DIR/checkpoints/, see rundir.py for the run dir):

    RUN_DIR/checkpoints/<step>/state     params, opt_state, step (Orbax PyTree, sharded)
    RUN_DIR/checkpoints/<step>/data      data iterator state, one JSON file per process
    RUN_DIR/checkpoints/<step>/meta      config, tokenizer reference, mesh and process count

On a file system Orbax writes each step into a temporary directory and renames it when every
process has finished, so a step directory with a plain integer name is complete; anything else
(a `<step>.orbax-checkpoint-tmp-*` directory left by a crash) is ignored here and removed by the
manager on the next start. A bucket has no rename: on gs:// (and s3://, see orbax_compat.py)
the step is written in place and is complete once Orbax's `commit_success.txt` is in it, which
Orbax's step listing (used below) checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import orbax.checkpoint as ocp

from bignlp_jax import storage
from bignlp_jax.checkpoint import integrity
from bignlp_jax.config.loader import validate
from bignlp_jax.containment import check_tree
from bignlp_jax.errors import UserError
from bignlp_jax.rundir import CHECKPOINTS, RunDir

STATE, DATA, META = "state", "data", "meta"
SHARD_INDEX = "shards.json"  # the local tier's list of its shard files (shard_files.py)
# the file that indexes a step's arrays: Orbax's PyTree metadata, or the local tier's list
STATE_INDEXES = ("_METADATA", SHARD_INDEX)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoints


def complete_steps(ckpt_dir: str | Path) -> list[int]:
    """Finalized steps under a checkpoints directory, ascending ([] if it does not exist).

    Orbax deletes old steps in place, so a kill during that cleanup leaves an integer-named
    directory with some files gone. Such a step (its state metadata or a file its checksums
    list is missing; stat only, no reads) does not count when a newer intact step exists: that
    is exactly the state a cleanup leaves. The newest step always counts, so damage to it is
    reported when it is restored, never skipped silently."""
    ckpt_dir = storage.path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    steps = sorted(ocp.step.checkpoint_steps(ckpt_dir))
    intact = [any((ckpt_dir / str(s) / STATE / name).is_file() for name in STATE_INDEXES)
              and integrity.missing_file(ckpt_dir / str(s)) is None for s in steps]
    return [s for i, s in enumerate(steps) if intact[i] or not any(intact[i + 1:])]


def latest_step(run_dir: str | Path) -> int | None:
    """The newest complete checkpoint step of a run (or of a checkpoints directory), or None."""
    run_dir = storage.path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir
    steps = complete_steps(ckpt_dir)
    return steps[-1] if steps else None


def is_complete(run_dir: str | Path, cfg) -> bool:
    """True when the run's final checkpoint (step == train.steps, or later) exists."""
    last = latest_step(run_dir)
    return last is not None and last >= cfg.train.steps


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and (path / STATE).is_dir()


def resolve_step_dir(path: str | Path, step: int | None = None) -> Path:
    """Find one step directory from a run dir, its checkpoints dir, or a step dir itself.

    `step` picks a step (default: the newest complete one). Raises UserError naming what was
    looked for and what exists."""
    path = storage.path(path)
    if _is_step_dir(path):
        if step is not None and path.name.isdigit() and int(path.name) != step:
            raise UserError(f"{path} is the checkpoint of step {path.name}, not step {step}")
        check_tree(path, run_root(path))  # a symlink out of the run is refused before reading
        return path
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not ckpt_dir.is_dir():
        raise UserError(
            f"no checkpoint at {path}: expected a run directory (with {CHECKPOINTS}/), a "
            f"checkpoints directory, or one step directory (with {STATE}/)"
        )
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise UserError(
            f"no complete checkpoint in {ckpt_dir} (a run that has not saved yet, or whose "
            "saves were all interrupted)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(
            f"no complete checkpoint of step {step} in {ckpt_dir}; complete steps: "
            f"{', '.join(map(str, steps))}"
        )
    check_tree(ckpt_dir / str(step), run_root(ckpt_dir))
    return ckpt_dir / str(step)


def run_root(path: str | Path) -> Path:
    """The run directory of a run dir, its checkpoints dir or one of its step dirs."""
    path = storage.path(path)
    if path.name == CHECKPOINTS:
        return path.parent
    if _is_step_dir(path) and path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return path


def load_run_config(run_dir: str | Path):
    """The resolved `Config` a run was trained with (its recorded config, else the newest
    checkpoint's copy). Accepts a run dir, its checkpoints dir or a step dir."""
    run_dir = storage.path(run_dir)
    for candidate in dict.fromkeys([run_dir, run_root(run_dir)]):
        recorded = RunDir(candidate).recorded_config()  # a symlink out of the run is refused
        if recorded is not None:
            return recorded
    try:
        step_dir = resolve_step_dir(run_dir)
    except UserError:
        raise UserError(
            f"no {RunDir(run_dir).config_file.name} in {run_dir} and no checkpoint to read one "
            "from; is it a run directory written by `bignlp-jax train`?"
        ) from None
    meta = json.loads((step_dir / META / "metadata").read_text(encoding="utf-8"))
    return validate(meta["config"])

