"""Where a run starts: its own newest checkpoint, `checkpoint.resume_from`, `init_from`, or new.

Order (STYLE.md): `checkpoint.resume_from` when given (once: a requeued job with the same
command then continues from its own newer checkpoints), else the run's newest complete
checkpoint, else parameters from `init_from`, else a fresh state. A checkpoint that exists but
cannot be read stops the run with the step, the problem and the previous good step; the run never
silently starts again from step 0. A start from another run's weights (`init_from`, or a
`resume_from` outside this run) must also use that run's tokenizer.

This is run start-up, so it lives in train/; checkpoint/ only stores and restores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from bignlp_jax import storage
from bignlp_jax.checkpoint import integrity, local_tier
from bignlp_jax.checkpoint.manager import restore_data_state, restore_state
from bignlp_jax.checkpoint.params import Params, check_shapes, load_params, saved_tree
from bignlp_jax.checkpoint.paths import (
    STATE,
    checkpoints_dir,
    complete_steps,
    resolve_step_dir,
)
from bignlp_jax.checkpoint.read_errors import is_read_error
from bignlp_jax.config import Config, ModelConfig
from bignlp_jax.data import BatchSource
from bignlp_jax.errors import UserError
from bignlp_jax.hf.weights import load_hf_params
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.train.local_resume import local_step_dir
from bignlp_jax.train.state import TrainState, abstract_state, init_state, with_params

RESUME_MARKER = "resume_from.json"  # in RUN_DIR: which resume_from value was already applied
ABANDONED = "checkpoints_abandoned"  # in RUN_DIR: newer steps set aside by resume_from=<step>
LEGACY_KEYS = ("rng",)  # saved by earlier versions, unused: restoring skips them
HF_PREFIX = "hf:"  # init_from=hf:DIR reads a Hugging Face model directory


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


@dataclass
class Start:
    state: TrainState
    step: int
    origin: str  # for the log: where the state came from


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def pick_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path | None, bool]:
    """The step directory to resume from (None for a run without checkpoints), and whether it
    is a `checkpoint.resume_from` not applied yet (see `apply_resume_from`)."""
    ckpt_dir = checkpoints_dir(run_dir)
    wanted = cfg.checkpoint.resume_from
    marker = run_dir / RESUME_MARKER
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
    marker = run_dir / RESUME_MARKER
    _barrier("bignlp_resume_restored")  # every process has read the step before anything moves
    if jax.process_index() == 0:
        if storage.same(step_dir.parent, ckpt_dir):
            _set_aside_newer(ckpt_dir, int(step_dir.name), run_dir / ABANDONED)
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
    # checksums first: a damaged index or metadata file is then named in one line before
    # Orbax or TensorStore reads it
    if shared:
        damaged = integrity.verify_step(step_dir)
    else:
        found = integrity.verify(step_dir)
        damaged = found[1] if found else None
    if damaged:
        return damaged
    try:
        saved = {k: v for k, v in saved_tree(step_dir / STATE).items() if k not in LEGACY_KEYS}
        check_shapes(saved, target, f"checkpoint {step_dir}")
    except UserError as e:
        return str(e)
    return None


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
        return Start(state, int(state.step), f"resumed from local checkpoint {local_dir}")
    if step_dir is not None:
        if not storage.same(step_dir.parent, checkpoints_dir(run_dir)):
            # another run's checkpoint (this run's own tokenizer is checked when recorded)
            check_tokenizer(cfg, step_dir, f"checkpoint.resume_from={cfg.checkpoint.resume_from}")
        state, data_state = restore_checkpoint(layout, step_dir)
        if pending:
            apply_resume_from(cfg, run_dir, step_dir)
        source.set_state(data_state)
        return Start(state, int(state.step), f"resumed from checkpoint {step_dir}")
    state = layout.fresh()
    if cfg.init_from:
        # the base model only: a LoRA run's adapters start fresh (B = 0: the base's outputs)
        base = {k: v for k, v in layout.shardings.params.items() if k != LORA_KEY}
        params = load_init_params(cfg, base)
        state = with_params(state, params, layout.tx, layout.shardings)
        return Start(state, 0, f"parameters from init_from={cfg.init_from}")
    return Start(state, 0, "new run")


def load_init_params(cfg: Config, shardings: Params) -> Params:
    """Parameters for `init_from`: a checkpoint path (its run's tokenizer must be this run's),
    or `hf:DIR` (a Hugging Face model)."""
    spec = cfg.init_from
    if spec is None:
        raise ValueError("load_init_params needs a config with init_from")
    if spec.startswith(HF_PREFIX):
        # it checks the architecture, names and shapes itself, and places each tensor as read
        # safetensors reads local files: an `hf:gs://...` model is copied to a temporary dir
        return load_hf_params(storage.fetch_dir(spec[len(HF_PREFIX):]), cfg.model,
                              shardings=shardings)
    check_tokenizer(cfg, resolve_step_dir(spec), f"init_from={spec}")
    return load_params(spec, cfg.model, shardings)


def check_tokenizer(cfg: Config, step_dir: Path, what: str) -> None:
    """Refuse to start from the weights of a run trained with another tokenizer: every token
    id would mean something else, and with equal vocabulary sizes nothing else would notice."""
    if cfg.data.source != "tfds":
        return  # synthetic data has no tokenizer to compare
    for run_dir in (step_dir.parent.parent, step_dir.parent, step_dir):
        recorded = run_dir / "tokenizer" / "tokenizer.json"
        if recorded.is_file():
            break
    else:
        return  # a run without a recorded tokenizer (synthetic data): nothing to compare
    from bignlp_jax.data.text_source import resolve_tokenizer  # grain, tfds: tfds runs only

    tokenizer = resolve_tokenizer(cfg)
    theirs = json.loads(recorded.read_text(encoding="utf-8"))
    ours = tokenizer.describe()
    if theirs.get("model_sha256") != ours["model_sha256"]:
        raise UserError(
            f"{what} was trained with another tokenizer ({recorded}: vocab "
            f"{theirs.get('vocab_size')}, sha256 {str(theirs.get('model_sha256'))[:12]}) than "
            f"this run's ({tokenizer.model_path}: vocab {ours['vocab_size']}, sha256 "
            f"{ours['model_sha256'][:12]})\n"
            f"  fix: set data.tokenizer={run_dir} to use that run's tokenizer"
        )


def drop_metrics_after(run_dir: str | Path, step: int) -> None:
    """Resuming at `step`: forget logged steps after it (a crashed run logged steps its
    checkpoints do not hold; they are trained again), so metrics.jsonl stays one trajectory."""
    path = storage.path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash here leaves the old or the new file, never half

