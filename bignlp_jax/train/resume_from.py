"""`checkpoint.resume_from`: continue from a chosen step (of this run or another), once.

The value is applied once: a marker in the run dir records it, so a requeued job with the same
command continues from its own newer checkpoints, and a new value applies again. Resuming an
older step of this run sets the newer steps aside, never deletes them: each abandoned trajectory
gets its own folder, RUN_DIR/checkpoints_abandoned/<step>.<UTC time>/<newer steps>, so any
number of resumes never collide. The moves are planned and checked (every source there, no
target taken) before anything moves, happen only after the chosen step restored completely,
and a failure part-way moves back what had moved: a refused or failed resume leaves the run
directory as it was.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint.paths import checkpoints_dir, complete_steps, resolve_step_dir
from bignlp_jax.config import Config
from bignlp_jax.errors import UserError
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


@dataclass(frozen=True)
class SetAside:
    """The moves that set the steps newer than `step` aside: (source, target) pairs, all
    into `folder`."""

    step: int
    folder: storage.AnyPath
    moves: tuple[tuple[storage.AnyPath, storage.AnyPath], ...]


def plan_set_aside(run: RunDir, step: int, now: float | None = None) -> SetAside:
    """Which steps of the run move where when it resumes from `step`: every step directory
    newer than `step` (complete or not: none may be saved over) into a folder of its own,
    named by the step and the UTC time; UserError if the plan cannot be carried out."""
    ckpt_dir = run.checkpoints
    newer = sorted(int(d.name) for d in ckpt_dir.iterdir()
                   if d.is_dir() and d.name.isdigit() and int(d.name) > step) \
        if ckpt_dir.is_dir() else []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    folder, n = run.abandoned / f"{step}.{stamp}", 1
    while folder.exists():  # two resumes within a second: never reuse a folder
        n += 1
        folder = run.abandoned / f"{step}.{stamp}.{n}"
    moves = tuple((ckpt_dir / str(s), folder / str(s)) for s in newer)
    for source, target in moves:
        if not source.is_dir() or target.exists():
            raise UserError(f"cannot set step {source.name} aside: {source} -> {target} "
                            "(the source is gone or the target is taken); nothing was moved\n"
                            "  fix: check what else writes to this run directory, then rerun")
    return SetAside(step, folder, moves)


def carry_out(plan: SetAside) -> None:
    """Move every step of `plan`; if one move fails, move back the ones done and raise
    UserError naming the failure."""
    if not plan.moves:
        return
    done: list[tuple[storage.AnyPath, storage.AnyPath]] = []
    try:
        plan.folder.mkdir(parents=True, exist_ok=True)
        for source, target in plan.moves:
            storage.move(source, target)
            done.append((source, target))
    except OSError as e:
        undo(plan, done)
        raise UserError(
            f"could not set the steps after {plan.step} aside into {plan.folder} ({e}); "
            "everything moved was moved back, the run directory is as it was\n"
            "  fix: make the run directory writable (or free space), then rerun") from e
    for source, target in plan.moves:
        print(f"checkpoint: moved step {source.name} aside to {target} "
              f"(resuming from step {plan.step})", flush=True)


def undo(plan: SetAside, done: list[tuple[storage.AnyPath, storage.AnyPath]] | None = None
         ) -> None:
    """Move the steps of `plan` that moved (default: all) back, newest move first, and remove
    its folder (and checkpoints_abandoned/ if that is left empty)."""
    for source, target in reversed(plan.moves if done is None else done):
        storage.move(target, source)
    for folder in (plan.folder, plan.folder.parent):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def apply_resume_from(cfg: Config, run_dir: Path, step_dir: Path) -> None:
    """After `step_dir` restored completely (metadata, checksums, arrays, data position): set
    newer steps of this run aside and record that this resume_from was applied. Done only now,
    so a refused resume leaves the run directory as it was."""
    run = RunDir(run_dir)
    _barrier("bignlp_resume_restored")  # every process has read the step before anything moves
    if jax.process_index() == 0:
        plan = None
        if storage.same(step_dir.parent, run.checkpoints):
            plan = plan_set_aside(run, int(step_dir.name))
            carry_out(plan)
        try:
            run.path.mkdir(parents=True, exist_ok=True)  # a new run resuming another's step
            run.resume_marker.write_text(json.dumps({
                "resume_from": cfg.checkpoint.resume_from, "step_dir": str(step_dir),
                "set_aside": str(plan.folder) if plan and plan.moves else None}))
        except OSError:
            if plan is not None:  # the resume is not recorded: put the steps back
                undo(plan)
            raise
    _barrier("bignlp_resume_marker_written")
