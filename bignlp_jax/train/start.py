"""State start-up: its own newest checkpoint, `checkpoint.resume_from`, `init_from`, or new.

Order (STYLE.md): `checkpoint.resume_from` when given (once: a requeued job with the same
command then continues from its own newer checkpoints), else the run's newest complete
checkpoint, else parameters from `init_from`, else a fresh state. A checkpoint that exists but
cannot be read stops the run with the step, the problem and the previous good step; the run never
silently starts again from step 0. A start from another run's weights (`init_from`, or a
`resume_from` outside this run) must also use that run's tokenizer (init_from.py).

The result is a `Start`: the state, its step, what kind of start it was and (for a resume) the
step directory restored. Checks before it: preflight.py; writes after it: record.py.
This is run start-up, so it lives in train/; checkpoint/ only stores and restores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import optax

from bignlp_jax import storage
from bignlp_jax.checkpoint import integrity, local_tier
from bignlp_jax.checkpoint.manager import restore_data_state, restore_state
from bignlp_jax.checkpoint.params import check_shapes, saved_tree
from bignlp_jax.checkpoint.paths import STATE, checkpoints_dir, complete_steps
from bignlp_jax.checkpoint.read_errors import is_read_error
from bignlp_jax.config import Config, ModelConfig
from bignlp_jax.data import BatchSource
from bignlp_jax.errors import UserError
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.rundir import ABANDONED
from bignlp_jax.train.init_from import check_tokenizer, load_init_params
from bignlp_jax.train.local_resume import local_step_dir
from bignlp_jax.train.resume_from import apply_resume_from, pick_checkpoint
from bignlp_jax.train.state import TrainState, abstract_state, init_state, with_params

LEGACY_KEYS = ("rng",)  # saved by earlier versions, unused: restoring skips them
StartKind = Literal["fresh", "init_from", "resume", "resume_from", "local"]


@dataclass(frozen=True)
class StateLayout:
    """What start-up needs to create or restore a TrainState on a mesh."""

    model: ModelConfig
    tx: optax.GradientTransformation
    shardings: TrainState  # one sharding per leaf (train.state.state_shardings)
    seed: int
    lora: LoraSpec | None = None  # adapters beside the base params (model/lora.py)

    def fresh(self) -> TrainState:
        return init_state(self.model, self.tx, self.seed, self.shardings, self.lora)

    def abstract(self) -> TrainState:
        return abstract_state(self.model, self.tx, self.shardings, self.lora)


@dataclass(frozen=True)
class Start:
    """The state a run trains from, and where it came from."""

    state: TrainState
    step: int
    kind: StartKind
    origin: str  # for the log: where the state came from, in words
    # the durable step directory restored (kind "resume" / "resume_from"), else None
    restored: Path | None = None


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


def _readable(step_dir: Path, target: TrainState, shared: bool = True) -> str | None:
    """None if the step's metadata reads and matches the target's shapes and its files match
    their checksums; else the problem. `shared`: every process is here together and each
    verifies 1/N of the files (a collective); else this process verifies them all alone."""
    try:
        saved = {k: v for k, v in saved_tree(step_dir / STATE).items() if k not in LEGACY_KEYS}
        check_shapes(saved, target, f"checkpoint {step_dir}")
    except UserError as e:
        return str(e)
    if shared:
        return integrity.verify_step(step_dir)
    found = integrity.verify(step_dir)
    return found[1] if found else None


def _previous_good(step_dir: Path, target: TrainState) -> str:
    """A fix line naming the newest earlier step that looks intact."""
    here = int(step_dir.name) if step_dir.name.isdigit() else None
    earlier = [s for s in complete_steps(step_dir.parent) if here is None or s < here]
    for step in reversed(earlier):
        # alone: a restore may have failed on this process only, so no collective here
        if _readable(step_dir.parent / str(step), target, shared=False) is None:
            return (f"  fix: resume from the previous good checkpoint with "
                    f"checkpoint.resume_from={step} (newer steps are moved to {ABANDONED}/, "
                    "not deleted), or repair/remove the broken one")
    return ("  no earlier checkpoint of this run is intact and matches this config either; "
            "repair or remove the broken step, fix the config to match the checkpoint, or start "
            "a new run in another run.dir (this run's checkpoints are kept)")


def _short(error: Exception) -> str:
    """The first line of an exception, without TensorStore's multi-page spec dump."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text.split('. See full TensorStore details')[0][:500]}"


def restore_checkpoint(layout: StateLayout, step_dir: Path) -> tuple[TrainState, dict]:
    """The full TrainState of a step, resharded onto the layout's shardings, and the data
    position; UserError naming the step, the problem and the previous good step if either is
    unusable."""
    target = layout.abstract()
    problem, cause = _readable(step_dir, target), None
    if problem is None and not integrity.has_checksums(step_dir) and jax.process_index() == 0:
        print(f"checkpoint: step {step_dir.name} carries no checksums (written before they "
              "existed); restoring it unverified", flush=True)
    if problem is None:
        check_fits(target, f"restoring checkpoint {step_dir}")
        try:
            return restore_state(step_dir, target), restore_data_state(step_dir)
        except Exception as e:
            if not is_read_error(e):  # a damaged step is the user's; anything else is a bug
                raise
            problem, cause = _short(e), e
    raise UserError(f"cannot resume from checkpoint step {step_dir.name} ({step_dir}):\n"
                    f"  {problem}\n{_previous_good(step_dir, target)}") from cause


def load_local(target: TrainState, step_dir: Path) -> tuple[TrainState, dict]:
    """A local-tier step onto `target` (the abstract state): each process reads the shards it
    wrote from its own directory, checking their checksums from the bytes it loads
    (local_step_dir agrees on the verdict)."""
    check_fits(target, f"restoring local checkpoint {step_dir}")
    return (local_tier.restore_state(step_dir, target, verify=True),
            restore_data_state(step_dir))


def start_state(cfg: Config, layout: StateLayout, source: BatchSource,
                run_dir: str | Path) -> Start:
    """Restore or create the state to train from, and position `source` to match it."""
    run_dir = storage.path(run_dir)
    step_dir, pending = pick_checkpoint(cfg, run_dir)
    local = None
    if cfg.checkpoint.local_dir is not None:  # the abstract state is traced only for the tier
        target = layout.abstract()
        local = local_step_dir(cfg, run_dir, target, step_dir, pending,
                               lambda d: load_local(target, d))
    if local is not None:  # newer than (or as new as) the durable step, on every process
        local_dir, (state, data_state) = local
        source.set_state(data_state)
        return Start(state, int(state.step), "local",
                     f"resumed from local checkpoint {local_dir}")
    if step_dir is not None:
        if not storage.same(step_dir.parent, checkpoints_dir(run_dir)):
            # another run's checkpoint (this run's own tokenizer is checked when recorded)
            check_tokenizer(cfg, step_dir, f"checkpoint.resume_from={cfg.checkpoint.resume_from}")
        state, data_state = restore_checkpoint(layout, step_dir)
        if pending:
            apply_resume_from(cfg, run_dir, step_dir)
        source.set_state(data_state)
        return Start(state, int(state.step), "resume_from" if pending else "resume",
                     f"resumed from checkpoint {step_dir}", restored=step_dir)
    state = layout.fresh()
    if cfg.init_from:
        # the base model only: a LoRA run's adapters start fresh (B = 0: the base's outputs)
        base = {k: v for k, v in layout.shardings.params.items() if k != LORA_KEY}
        params = load_init_params(cfg, base)
        state = with_params(state, params, layout.tx, layout.shardings)
        return Start(state, 0, "init_from", f"parameters from init_from={cfg.init_from}")
    return Start(state, 0, "fresh", "new run")
