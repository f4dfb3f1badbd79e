"""The training loop shared by pretraining and finetuning.

A run is a pure function of (config, seed, step): the state comes from the seed (or a
checkpoint), batch k is a function of (seed, k), and step keys are fold_in(rng, step).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from bignlp_jax import storage
from bignlp_jax.checkpoint import local_tier
from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
from bignlp_jax.checkpoint.paths import checkpoints_dir, complete_steps
from bignlp_jax.checkpoint.preemption import StopRequest
from bignlp_jax.config import Config
from bignlp_jax.data import (
    global_batch,
    make_eval_sources,
    make_source,
    process_rows,
    record_run_data,
)
from bignlp_jax.data.run_identity import with_store_identities
from bignlp_jax.data.tfds_source import with_resolved_data_dir
from bignlp_jax.errors import Preempted, UserError
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.model.preference_loss import REWARD_METRICS
from bignlp_jax.parallel.mesh import build_mesh, mesh_text
from bignlp_jax.parallel.rules import rules_table
from bignlp_jax.train.dpo import (
    PAIRS,
    is_preference,
    make_dpo_eval_step,
    make_dpo_train_step,
    needs_reference_copy,
    pair_means,
)
from bignlp_jax.train.identity import config_changes, record_config, refuse_unless_allowed
from bignlp_jax.train.inputs import check_source_runs
from bignlp_jax.train.metrics import MetricsLogger, read_metrics
from bignlp_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bignlp_jax.train.peak import mfu_meter
from bignlp_jax.train.start import StateLayout, drop_metrics_after, load_init_params, start_state
from bignlp_jax.train.state import TrainState, init_state, state_shardings
from bignlp_jax.train.step import batch_sharding, make_eval_step, make_train_step
from bignlp_jax.writable import require_writable


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops without saving the bad state."""


@dataclass
class Trainer:
    """Everything compiled for one config on one mesh."""

    cfg: Config
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation
    state_sh: TrainState
    train_step: Any  # jitted (state, batch) -> (state, metrics); .lower() compiles ahead
    eval_step: Any  # jitted (params, batch) -> (loss sum, token count)
    batch_sh: jax.sharding.NamedSharding
    rows: tuple[int, int]
    # held-out streams and their start states: built at the first evaluation, reused after
    _eval: dict | None = field(default=None, repr=False)

    @classmethod
    def build(cfg_cls, cfg: Config, devices=None) -> Trainer:
        mesh = build_mesh(cfg.mesh, devices)
        rules = rules_table(cfg.mesh.rules)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        micro = cfg.train.global_batch_size // cfg.train.microbatches
        if micro % dp:
            raise UserError(
                f"train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
                f"{cfg.train.microbatches} = {micro} rows per microbatch cannot be split over "
                f"the {dp} data-parallel devices (mesh.data x mesh.fsdp)\n"
                f"  fix: make the microbatch a multiple of {dp}"
            )
        tx = make_optimizer(cfg.optimizer, cfg.train.steps)
        schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
        state_sh = state_shardings(cfg.model, tx, mesh, rules, LoraSpec.from_config(cfg.lora))
        batch_sh = batch_sharding(mesh, rules)
        rows = process_rows(batch_sh, cfg.train.global_batch_size, cfg.data.seq_len)
        # preference tuning: its own steps, with the frozen reference beside (train/dpo.py)
        dpo = is_preference(cfg)
        return cfg_cls(
            cfg=cfg, mesh=mesh, tx=tx, state_sh=state_sh,
            train_step=(make_dpo_train_step if dpo else make_train_step)(
                cfg, tx, schedule, mesh, rules, state_sh),
            eval_step=(make_dpo_eval_step if dpo else make_eval_step)(
                cfg, mesh, rules, state_sh.params),
            batch_sh=batch_sh, rows=rows,
        )

    def load_reference(self) -> None:
        """Preference tuning without LoRA: read the frozen reference (the init_from model)."""
        if needs_reference_copy(self.cfg):
            base = {k: v for k, v in self.state_sh.params.items() if k != LORA_KEY}
            self.set_reference(load_init_params(self.cfg, base))

    def set_reference(self, params) -> None:
        self.train_step.reference = params
        self.eval_step.reference = params

    def fresh_state(self) -> TrainState:
        return init_state(self.cfg.model, self.tx, self.cfg.run.seed, self.state_sh,
                          LoraSpec.from_config(self.cfg.lora))

    @property
    def layout(self) -> StateLayout:
        """What run start-up (train/start.py) needs to create or restore the state."""
        return StateLayout(self.cfg.model, self.tx, self.state_sh, self.cfg.run.seed,
                           LoraSpec.from_config(self.cfg.lora))

    def device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(local, self.batch_sh, self.cfg.train.global_batch_size)

    def evaluate(self, params, num_batches: int) -> dict[str, float]:
        """Mean loss and perplexity over the first `num_batches` of the held-out stream; with a
        `data.mixture`, also `eval_loss/<dataset>` per held-out set (the total weighs every
        set by its target tokens)."""
        if self._eval is None:
            sources = make_eval_sources(self.cfg, self.rows)
            self._eval = {name: (s, s.get_state()) for name, s in sources.items()}
        out, total_sum, total_count = {}, 0.0, 0.0
        for name, (source, start) in self._eval.items():
            source.set_state(start)  # every evaluation reads the same batches
            if is_preference(self.cfg):
                out.update(self.evaluate_pairs(params, source, num_batches))
                continue
            loss_sum = count = 0.0
            for _ in range(num_batches):
                batch = next(source, None)
                if batch is None:
                    break
                s, c = self.eval_step(params, self.device_batch(batch))
                loss_sum, count = loss_sum + float(s), count + float(c)
            if name:
                out[f"eval_loss/{name}"] = loss_sum / max(count, 1.0)
            total_sum, total_count = total_sum + loss_sum, total_count + count
        if is_preference(self.cfg):
            return out
        loss = total_sum / max(total_count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), **out}

    def evaluate_pairs(self, params, source, num_batches: int | None) -> dict[str, float]:
        """Preference tuning: loss and TRL's reward metrics, means over the held-out pairs of
        `num_batches` batches (None: all), prefixed `eval_`, and the number of pairs."""
        loss_sum, sums = 0.0, None
        for _ in range(num_batches) if num_batches is not None else iter(int, 1):
            batch = next(source, None)
            if batch is None:
                break
            s, aux = jax.device_get(self.eval_step(params, self.device_batch(batch)))
            loss_sum += float(s)
            sums = {k: float(v) + (sums or {}).get(k, 0.0) for k, v in aux.items()}
        sums = sums or {PAIRS: 0.0}
        means = pair_means(loss_sum, {k: sums.get(k, 0.0) for k in ("pairs", *REWARD_METRICS)})
        return {**{f"eval_{k}": float(v) for k, v in means.items()},
                "eval_pairs": sums[PAIRS]}


def train(cfg: Config, devices=None, allow_config_change: bool = False) -> dict:
    """Train until `train.steps`, resuming from the run's newest checkpoint; returns the last
    logged metrics. On SIGTERM/SIGINT or `train.max_time` it saves, waits until the checkpoint
    is durable and raises `Preempted` (the CLI exits with REQUEUE_EXIT_CODE).

    A rerun must keep the run's config (train/identity.py): only steps, time and cadence keys
    may change, unless `allow_config_change` (the change is then recorded in the run dir)."""
    # Signals are caught from the start: one arriving during the restore or the compile stops
    # the run after its first step, with a checkpoint. train.max_time counts from here too.
    cfg = with_resolved_data_dir(cfg)  # what config.yaml records is what the run used
    with StopRequest(cfg.train.max_time) as stop:
        return _train(cfg, devices, stop, allow_config_change)


def _train(cfg: Config, devices, stop: StopRequest, allow_config_change: bool) -> dict:
    run_dir = storage.path(cfg.run.dir)
    storage.check_access(cfg.run.dir, "run.dir")  # before anything is built
    if cfg.init_from:
        storage.check_access(cfg.init_from.removeprefix("hf:"), "init_from", write=False)
    cfg = with_store_identities(cfg, run_dir)  # the stores read go into config.yaml
    changes = config_changes(cfg, cfg.run.dir)  # before building anything: refusing is instant
    refuse_unless_allowed(changes, allow_config_change)
    if not changes.has_checkpoints:  # a resumed run no longer reads init_from
        check_source_runs(cfg)
    if not storage.is_remote(cfg.run.dir):  # (a bucket was probed by check_access above)
        # before minutes of compiling, not at the first save
        require_writable(run_dir, "run.dir", "run.dir=DIR")
        require_writable(checkpoints_dir(run_dir), "the checkpoint directory", "run.dir=DIR")
    if cfg.checkpoint.local_dir is not None:  # each host probes its own local directory
        require_writable(local_tier.tier_root(cfg.checkpoint.local_dir, run_dir),
                         "checkpoint.local_dir", "checkpoint.local_dir=DIR")
    if jax.process_index() == 0:
        record_run_data(cfg, run_dir)  # vocab check; copies the tokenizer into the run
    trainer = Trainer.build(cfg, devices)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(cfg, trainer.layout, source, run_dir)
    state, first = start.state, start.step
    trainer.load_reference()  # preference tuning: the frozen init_from model (every start)
    if jax.process_index() == 0:  # after the restore: a config its checkpoints refuse is not kept
        record_config(cfg, changes, first)
    if first >= cfg.train.steps:
        if jax.process_index() == 0:
            print(f"{start.origin}: already at step {first} of {cfg.train.steps}; nothing to do")
        done_records = read_metrics(run_dir)
        return {k: v for k, v in done_records[-1].items() if k not in ("step", "time")} \
            if done_records else {}
    drop_metrics_after(run_dir, first)
    checkpointer = RunCheckpointer(run_dir, cfg.checkpoint)
    local = _local_checkpointer(cfg, run_dir, state, first)
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


def _check_finite(metrics: dict, done: int, start=None) -> None:
    # the gradient norm too: finite gradients (and learning rate) keep the updated state finite
    values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        suspect = ""
        if start is not None and start.origin.startswith("resumed from checkpoint ") \
                and done - start.step <= SUSPECT_STEPS:
            step_dir = Path(start.origin.removeprefix("resumed from checkpoint "))
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
