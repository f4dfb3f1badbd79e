"""`checkpoint.resume_from`: continue from a chosen step (of this run or another), once.

The value is applied once: a marker in the run dir records it, so a requeued job with the same
command continues from its own newer checkpoints. Resuming an older step of this run sets the
newer steps aside (kept, not deleted), only after the chosen step restored completely.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint.paths import checkpoints_dir, complete_steps, resolve_step_dir
from bignlp_jax.config import Config
from bignlp_jax.rundir import RunDir


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def pick_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path | None, bool]:
    """The step directory to resume from (None for a run without checkpoints), and whether it
    is a `checkpoint.resume_from` not applied yet (see `apply_resume_from`)."""
    ckpt_dir = checkpoints_dir(run_dir)
    wanted = cfg.checkpoint.resume_from
    marker = RunDir(run_dir).resume_marker
    applied = marker.is_file() and json.loads(marker.read_text())["resume_from"] == wanted
    _barrier("bignlp_resume_marker_read")  # every process decides before process 0 writes
    if wanted is not None and not applied:
        if wanted.isdigit():
            return resolve_step_dir(ckpt_dir, int(wanted)), True
        return resolve_step_dir(wanted), True
    steps = complete_steps(ckpt_dir)
    return (ckpt_dir / str(steps[-1]) if steps else None), False


def apply_resume_from(cfg, run_dir: Path, step_dir: Path) -> None:
    """After `step_dir` restored completely (metadata, checksums, arrays, data position): set
    newer steps of this run aside and record that this resume_from was applied. Done only now,
    so a refused resume leaves the run directory as it was."""
    ckpt_dir = checkpoints_dir(run_dir)
    marker = RunDir(run_dir).resume_marker
    _barrier("bignlp_resume_restored")  # every process has read the step before anything moves
    if jax.process_index() == 0:
        if storage.same(step_dir.parent, ckpt_dir):
            _set_aside_newer(ckpt_dir, int(step_dir.name), RunDir(run_dir).abandoned)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"resume_from": cfg.checkpoint.resume_from,
                                      "step_dir": str(step_dir)}))
    _barrier("bignlp_resume_marker_written")


def _set_aside_newer(ckpt_dir: Path, step: int, abandoned: Path) -> None:
    """Resuming an older step of this run: move newer steps out of the way (kept, not deleted),
    so the run can save those step numbers again."""
    for newer in [s for s in complete_steps(ckpt_dir) if s > step]:
        abandoned.mkdir(parents=True, exist_ok=True)
        storage.move(ckpt_dir / str(newer), abandoned / str(newer))
        print(f"checkpoint: moved step {newer} aside to {abandoned / str(newer)} "
              f"(resuming from step {step})", flush=True)
