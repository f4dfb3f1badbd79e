"""The training loop shared by pretraining and finetuning.

A run is a pure function of (config, seed, step): the state comes from the seed (or a
checkpoint), batch k is a function of (seed, k), and step keys are fold_in(rng, step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import jax

from bignlp_jax import outage
from bignlp_jax.checkpoint import local_tier
from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
from bignlp_jax.checkpoint.paths import complete_steps
from bignlp_jax.checkpoint.preemption import StopRequest
from bignlp_jax.config import Config
from bignlp_jax.data import BatchSource, make_source
from bignlp_jax.data.tfds.source import with_resolved_data_dir
from bignlp_jax.errors import REQUEUE_EXIT_CODE, Preempted, UserError
from bignlp_jax.parallel.mesh import mesh_text
from bignlp_jax.parallel.peer_watch import announce_failure
from bignlp_jax.train.metrics import MetricsLogger, read_metrics
from bignlp_jax.train.peak import mfu_meter
from bignlp_jax.train.preflight import Checked, preflight
from bignlp_jax.train.record import drop_metrics_after, record_start
from bignlp_jax.train.start import Start, start_state
from bignlp_jax.train.state import TrainState
from bignlp_jax.train.trainer import Trainer

__all__ = ["NonFiniteLoss", "Trainer", "train"]  # Trainer: built here, imported from here too


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops without saving the bad state."""


def train(cfg: Config, devices=None, allow_config_change: bool = False) -> dict:
    """Train until `train.steps`, resuming from the run's newest checkpoint; returns the last
    logged metrics. On SIGTERM/SIGINT or `train.max_time` it saves, waits until the checkpoint
    is durable and raises `Preempted` (the CLI exits with REQUEUE_EXIT_CODE).

    A rerun must keep the run's config (train/identity.py): only steps, time and cadence keys
    may change, unless `allow_config_change` (the change is then recorded in the run dir)."""
    # Signals are caught from the start: one arriving during the restore or the compile stops
    # the run after its first step, with a checkpoint. train.max_time counts from here too.
    cfg = with_resolved_data_dir(cfg)  # what the run records is what it used
    with StopRequest(cfg.train.max_time) as stop:
        return _train(cfg, devices, stop, allow_config_change)


def _train(cfg: Config, devices, stop: StopRequest, allow_config_change: bool) -> dict:
    checked = preflight(cfg, allow_config_change)  # nothing built or written yet
    cfg, run_dir = checked.cfg, checked.run.path
    trainer = Trainer.build(cfg, devices)  # the mesh and the batch split are checked here
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, run_dir)
    trainer.load_reference()  # preference tuning: the frozen init_from model (every start)
    record_start(checked, start)  # after the restore: a config its checkpoints refuse is not kept
    if start.step >= cfg.train.steps:
        if jax.process_index() == 0:
            print(f"{start.origin}: already at step {start.step} of {cfg.train.steps}; "
                  "nothing to do")
        done_records = read_metrics(run_dir)
        return {k: v for k, v in done_records[-1].items() if k not in ("step", "time")} \
            if done_records else {}
    drop_metrics_after(checked.run, start.step)
    return _loop(checked, trainer, source, start, stop)


def _loop(checked: Checked, trainer: Trainer, source: BatchSource, start: Start,
          stop: StopRequest) -> dict:
    """Steps start.step+1 .. train.steps: train, log, evaluate, save (durable and local tiers),
    stop on request; returns the last logged metrics."""
    cfg, run_dir = checked.cfg, checked.run.path
    state, first = start.state, start.step
    checkpointer = RunCheckpointer(run_dir, cfg.checkpoint)
    local = _local_checkpointer(cfg, run_dir, state, first)
    watch = outage.StorageWatch(cfg.checkpoint.storage_deadline_s,
                                safe_step=_safe_elsewhere(checkpointer, local),
                                requeue_code=REQUEUE_EXIT_CODE, announce=announce_failure)
    outage.StorageWatch.current = watch
    try:
        return _steps(checked, trainer, source, start, stop, checkpointer, local)
    finally:
        watch.close()


def _safe_elsewhere(checkpointer: RunCheckpointer, local: local_tier.LocalCheckpointer | None
                    ) -> Callable[[], str | None]:
    """For the storage watch: the local tier's newest complete step, if it is at least as new
    as the newest durable one (a rerun resumes from it), said as text; else None."""

    def safe() -> str | None:
        if local is None:
            return None
        held = complete_steps(local.directory)
        if held and held[-1] >= (checkpointer.durable_step or 0):
            return f"step {held[-1]} in the local tier ({local.directory / str(held[-1])})"
        return None

    return safe


def _steps(checked: Checked, trainer: Trainer, source: BatchSource, start: Start,
           stop: StopRequest, checkpointer: RunCheckpointer,
           local: local_tier.LocalCheckpointer | None) -> dict:
    cfg, run_dir = checked.cfg, checked.run.path
    state, first = start.state, start.step
    logger = MetricsLogger(run_dir, cfg.train.steps, first)
    logger.message(f"{start.origin}; training steps {first + 1}..{cfg.train.steps} on mesh "
                   f"{mesh_text(dict(trainer.mesh.shape), cfg.mesh)}")
    every, local_every = cfg.checkpoint.every_steps, cfg.checkpoint.local_every_steps
    last: dict = {}
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    mfu_of = mfu_meter(cfg, trainer.mesh.size)  # the figure `bignlp-jax bench` reports
    run_start = window_start = time.perf_counter()
    window_steps, compile_seconds = 0, None
    try:
        for step in range(first, cfg.train.steps):
            batch = trainer.device_batch(next(source))
            state, metrics = trainer.train_step(state, batch)
            done, window_steps = step + 1, window_steps + 1
            record: dict = {}
            # the first step of every start is logged (step 1 of a new run): it shows the loss
            # before training and, alone, the compile time, kept out of every throughput figure
            if done == first + 1 or done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                _check_finite(metrics, done, start)
                elapsed = time.perf_counter() - window_start
                last = {k: float(v) for k, v in metrics.items() if k != "tokens"}
                if compile_seconds is None:  # this step compiled the program: time it alone
                    compile_seconds = elapsed
                    last["compile_seconds"] = elapsed
                else:
                    last["tokens_per_sec"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    last["mfu"] = mfu_of(last["tokens_per_sec"])
                record.update(last)
            # evaluation has its own cadence: eval_every need not be a multiple of log_every
            if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                evaluated = trainer.evaluate(state.params, cfg.train.eval_batches)
                last.update(evaluated)
                record.update(evaluated)
            if record:
                logger.log(done, record)
                window_start, window_steps = time.perf_counter(), 0
            reason = stop.should_stop(done)
            durable_now = reason or done == cfg.train.steps or (every and done % every == 0)
            # the local tier: its cadence, and first of all when stopping (the final step has
            # its durable save and nothing to resume after it)
            local_now = local is not None and done < cfg.train.steps and bool(
                reason or (local_every and done % local_every == 0))
            if durable_now or local_now:
                _check_finite(metrics, done, start)  # never overwrite good checkpoints with NaNs
            # the source has just handed out batch `done`: its state is the next batch
            if local is not None and local_now:
                local.save(done, state, source.get_state(), step_meta(cfg, trainer.mesh, done))
                if reason:  # safe on every host in seconds, before the slower durable save
                    local.wait()
            if durable_now:
                checkpointer.save(done, state, source.get_state(),
                                  step_meta(cfg, trainer.mesh, done))
                logger.flush()  # a bucket's metrics.jsonl is rewritten here, not every step
            if reason and done < cfg.train.steps:  # a finished run is done, not preempted
                # as long as the job's time allows: a kill now leaves the local step
                checkpointer.wait()
                also = (f" (and in the local tier, {local.directory / str(done)})"
                        if local is not None else "")
                raise Preempted(
                    f"stopped after step {done} of {cfg.train.steps} ({reason}); checkpoint "
                    f"saved in {checkpointer.directory / str(done)}{also}; run the same "
                    "command again to continue"
                )
    except BaseException:
        # the error in flight is the one to report: closing can fail for the same cause (a
        # full disk also refuses the last metrics) and must not replace it
        closers = [checkpointer.close, logger.close] + ([local.close] if local else [])
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        raise
    checkpointer.close()  # blocks until every started save is durable
    if local is not None:
        local.close()
    logger.close()
    if jax.process_index() == 0:
        loss = last.get("loss")
        print(f"done: step {cfg.train.steps} of {cfg.train.steps}, "
              + (f"final loss {loss:.4f}, " if loss is not None else "")
              + f"{cfg.train.steps - first} steps in {time.perf_counter() - run_start:.1f} s "
              f"(compile {compile_seconds or 0.0:.1f} s); checkpoint "
              f"{checkpointer.directory / str(cfg.train.steps)}", flush=True)
    return last


def _local_checkpointer(cfg: Config, run_dir: Path, state: TrainState,
                        first: int) -> local_tier.LocalCheckpointer | None:
    """The run's local tier, if configured, with its steps newer than `first` deleted: held by
    some processes only, or from a trajectory this start does not continue."""
    if cfg.checkpoint.local_dir is None:
        return None
    root = local_tier.tier_root(cfg.checkpoint.local_dir, run_dir)
    gone = local_tier.discard_after(root, first)
    if gone:
        print(f"checkpoint: process {jax.process_index()} deleted its local step(s) "
              f"{', '.join(map(str, gone))} (newer than the start, step {first})", flush=True)
    return local_tier.LocalCheckpointer(run_dir, cfg.checkpoint,
                                        local_tier.layout_fingerprint(state))


# a NaN this soon after a restore points at the checkpoint as much as at the learning rate
SUSPECT_STEPS = 10


def _check_finite(metrics: dict, done: int, start: Start | None = None) -> None:
    # the gradient norm too: finite gradients (and learning rate) keep the updated state finite
    values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        suspect = ""
        if start is not None and start.restored is not None \
                and done - start.step <= SUSPECT_STEPS:
            step_dir = start.restored
            earlier = [s for s in complete_steps(step_dir.parent) if s < start.step]
            fix = (f"checkpoint.resume_from={earlier[-1]}" if earlier
                   else "an earlier checkpoint (none is left in this run)")
            suspect = (f"\n  suspect: checkpoint step {start.step} ({step_dir}), restored "
                       f"{done - start.step} step(s) ago; if it is damaged, resume from {fix}")
        raise NonFiniteLoss(
            f"{' and '.join(f'{k} is {v}' for k, v in bad.items())} at step {done}; stopping "
            f"without saving (earlier checkpoints are kept).{suspect}\n"
            "  fix: lower optimizer.lr, raise optimizer.warmup_steps, or check the data"
        )
