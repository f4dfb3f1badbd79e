"""Where a run starts: its own newest checkpoint, `checkpoint.resume_from`, `init_from`, or new.

Order (STYLE.md): `checkpoint.resume_from` when given (once: a requeued job with the same
command then continues from its own newer checkpoints), else the run's newest complete
checkpoint, else parameters from `init_from`, else a fresh state. A checkpoint that exists but
cannot be read stops the run with the step, the problem and the previous good step; the run never
silently starts again from step 0.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax.checkpoint.manager import restore_data_state, restore_state
from bignlp_jax.checkpoint.params import check_shapes, load_init_params, saved_tree
from bignlp_jax.checkpoint.paths import (
    STATE,
    checkpoints_dir,
    complete_steps,
    resolve_step_dir,
)
from bignlp_jax.errors import UserError
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.train.state import TrainState, abstract_state, with_params

RESUME_MARKER = "resume_from.json"  # in RUN_DIR: which resume_from value was already applied
ABANDONED = "checkpoints_abandoned"  # in RUN_DIR: newer steps set aside by resume_from=<step>


@dataclass
class Start:
    state: TrainState
    step: int
    origin: str  # for the log: where the state came from


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def pick_checkpoint(cfg, run_dir: Path) -> Path | None:
    """The step directory to resume from, or None for a run without checkpoints."""
    ckpt_dir = checkpoints_dir(run_dir)
    wanted = cfg.checkpoint.resume_from
    marker = run_dir / RESUME_MARKER
    applied = marker.is_file() and json.loads(marker.read_text())["resume_from"] == wanted
    _barrier("bignlp_resume_marker_read")  # every process decides before process 0 writes
    if wanted is not None and not applied:
        if wanted.isdigit():
            step_dir = resolve_step_dir(ckpt_dir, int(wanted))
        else:
            step_dir = resolve_step_dir(wanted)
        if jax.process_index() == 0:
            if step_dir.parent.resolve() == ckpt_dir.resolve():
                _set_aside_newer(ckpt_dir, int(step_dir.name), run_dir / ABANDONED)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"resume_from": wanted, "step_dir": str(step_dir)}))
        _barrier("bignlp_resume_marker_written")
        return step_dir
    steps = complete_steps(ckpt_dir)
    return ckpt_dir / str(steps[-1]) if steps else None


def _set_aside_newer(ckpt_dir: Path, step: int, abandoned: Path) -> None:
    """Resuming an older step of this run: move newer steps out of the way (kept, not deleted),
    so the run can save those step numbers again."""
    for newer in [s for s in complete_steps(ckpt_dir) if s > step]:
        abandoned.mkdir(parents=True, exist_ok=True)
        shutil.move(str(ckpt_dir / str(newer)), str(abandoned / str(newer)))
        print(f"checkpoint: moved step {newer} aside to {abandoned / str(newer)} "
              f"(resuming from step {step})", flush=True)


def check_fits(target: TrainState, where: str, limit: int | None = None) -> None:
    """Refuse a restore whose per-device share of the state exceeds device memory (`limit`
    bytes; default: what the first local device reports)."""
    if limit is None:
        limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return  # CPU and some backends do not report a limit
    per_device = sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(target)
    )
    if per_device > limit:
        raise UserError(
            f"{where} does not fit: the train state needs {_size(per_device)} per device on "
            f"this mesh, and each device has {_size(limit)}\n"
            "  fix: use more devices, or shard the state further (raise mesh.fsdp)"
        )


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.4g} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _readable(step_dir: Path, target: TrainState) -> str | None:
    """None if the step's metadata reads and matches the target's shapes; else the problem."""
    try:
        check_shapes(saved_tree(step_dir / STATE), target, f"checkpoint {step_dir}")
    except UserError as e:
        return str(e)
    return None


def _previous_good(step_dir: Path, target: TrainState) -> str:
    """A fix line naming the newest earlier step that looks intact."""
    here = int(step_dir.name) if step_dir.name.isdigit() else None
    earlier = [s for s in complete_steps(step_dir.parent) if here is None or s < here]
    for step in reversed(earlier):
        if _readable(step_dir.parent / str(step), target) is None:
            return (f"  fix: resume from the previous good checkpoint with "
                    f"checkpoint.resume_from={step} (newer steps are moved to {ABANDONED}/, "
                    "not deleted), or repair/remove the broken one")
    return ("  no earlier checkpoint matches either; fix the config to match the checkpoint, "
            "or start a new run in another run.dir (this run's checkpoints are kept)")


def _short(error: Exception) -> str:
    """The first line of an exception, without TensorStore's multi-page spec dump."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text.split('. See full TensorStore details')[0][:500]}"


def restore_checkpoint(trainer, step_dir: Path) -> tuple[TrainState, dict]:
    """The full TrainState of a step, resharded onto the trainer's mesh, and the data position;
    UserError naming the step, the problem and the previous good step if either is unusable."""
    target = abstract_state(trainer.cfg.model, trainer.tx, trainer.state_sh,
                            LoraSpec.from_config(trainer.cfg.lora))
    problem = _readable(step_dir, target)
    if problem is None:
        check_fits(target, f"restoring checkpoint {step_dir}")
        try:
            return restore_state(step_dir, target), restore_data_state(step_dir)
        except Exception as e:  # noqa: BLE001 - any read failure means the same to the user
            problem = _short(e)
    raise UserError(f"cannot resume from checkpoint step {step_dir.name} ({step_dir}):\n"
                    f"  {problem}\n{_previous_good(step_dir, target)}")


def start_state(trainer, source, run_dir: str | Path) -> Start:
    """Restore or create the state to train from, and position `source` to match it."""
    cfg = trainer.cfg
    run_dir = Path(run_dir)
    step_dir = pick_checkpoint(cfg, run_dir)
    if step_dir is not None:
        state, data_state = restore_checkpoint(trainer, step_dir)
        source.set_state(data_state)
        return Start(state, int(state.step), f"resumed from checkpoint {step_dir}")
    state = trainer.fresh_state()
    if cfg.init_from:
        base_sh = {k: v for k, v in trainer.state_sh.params.items() if k != LORA_KEY}
        params = load_init_params(cfg.init_from, cfg.model, base_sh)
        state = with_params(state, params, trainer.tx, trainer.state_sh)
        return Start(state, 0, f"parameters from init_from={cfg.init_from}")
    return Start(state, 0, "new run")


def drop_metrics_after(run_dir: str | Path, step: int) -> None:
    """Resuming at `step`: forget logged steps after it (a crashed run logged steps its
    checkpoints do not hold; they are trained again), so metrics.jsonl stays one trajectory."""
    path = Path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash here leaves the old or the new file, never half

