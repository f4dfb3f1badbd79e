"""The training loop shared by pretraining and finetuning.

A run is a pure function of (config, seed, step): the state comes from the seed (or a
checkpoint), batch k is a function of (seed, k), and step keys are fold_in(rng, step).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
from bignlp_jax.checkpoint.preemption import StopRequest
from bignlp_jax.checkpoint.resume import drop_metrics_after, start_state
from bignlp_jax.config import Config, save_config
from bignlp_jax.data import global_batch, make_source, process_rows, record_run_data
from bignlp_jax.errors import Preempted, UserError
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.parallel.mesh import build_mesh
from bignlp_jax.parallel.rules import rules_table
from bignlp_jax.perf.peak import mfu_meter
from bignlp_jax.train.metrics import MetricsLogger, read_metrics
from bignlp_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bignlp_jax.train.state import TrainState, init_state, state_shardings
from bignlp_jax.train.step import batch_sharding, make_eval_step, make_train_step


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops without saving the bad state."""


@dataclass
class Trainer:
    """Everything compiled for one config on one mesh."""

    cfg: Config
    mesh: jax.sharding.Mesh
    tx: object
    state_sh: TrainState
    train_step: object
    eval_step: object
    batch_sh: jax.sharding.NamedSharding
    rows: tuple[int, int]

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
        return cfg_cls(
            cfg=cfg, mesh=mesh, tx=tx, state_sh=state_sh,
            train_step=make_train_step(cfg, tx, schedule, mesh, rules, state_sh),
            eval_step=make_eval_step(cfg, mesh, rules, state_sh.params),
            batch_sh=batch_sh, rows=rows,
        )

    def fresh_state(self) -> TrainState:
        return init_state(self.cfg.model, self.tx, self.cfg.run.seed, self.state_sh,
                          LoraSpec.from_config(self.cfg.lora))

    def device_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(local, self.batch_sh, self.cfg.train.global_batch_size)

    def evaluate(self, params, num_batches: int) -> dict[str, float]:
        """Mean loss and perplexity over the first `num_batches` of the held-out stream."""
        source = make_source(self.cfg, "validation", self.rows)
        loss_sum = count = 0.0
        for _ in range(num_batches):
            batch = next(source, None)
            if batch is None:
                break
            s, c = self.eval_step(params, self.device_batch(batch))
            loss_sum, count = loss_sum + float(s), count + float(c)
        loss = loss_sum / max(count, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}


def train(cfg: Config, devices=None) -> dict:
    """Train until `train.steps`, resuming from the run's newest checkpoint; returns the last
    logged metrics. On SIGTERM/SIGINT or `train.max_time` it saves, waits until the checkpoint
    is durable and raises `Preempted` (the CLI exits with REQUEUE_EXIT_CODE)."""
    # Signals are caught from the start: one arriving during the restore or the compile stops
    # the run after its first step, with a checkpoint. train.max_time counts from here too.
    with StopRequest(cfg.train.max_time) as stop:
        return _train(cfg, devices, stop)


def _train(cfg: Config, devices, stop: StopRequest) -> dict:
    run_dir = Path(cfg.run.dir)
    if jax.process_index() == 0:
        record_run_data(cfg, run_dir)  # vocab check; copies the tokenizer into the run
    trainer = Trainer.build(cfg, devices)
    source = make_source(cfg, "train", trainer.rows)
    start = start_state(trainer, source, run_dir)
    state, first = start.state, start.step
    if jax.process_index() == 0:  # after the restore: a config its checkpoints refuse is not kept
        save_config(cfg, run_dir / "config.yaml")
    if first >= cfg.train.steps:
        if jax.process_index() == 0:
            print(f"{start.origin}: already at step {first} of {cfg.train.steps}; nothing to do")
        done_records = read_metrics(run_dir)
        return {k: v for k, v in done_records[-1].items() if k not in ("step", "time")} \
            if done_records else {}
    drop_metrics_after(run_dir, first)
    checkpointer = RunCheckpointer(run_dir, cfg.checkpoint)
    logger = MetricsLogger(run_dir, cfg.train.steps, first)
    logger.message(f"{start.origin}; training steps {first + 1}..{cfg.train.steps}")
    every = cfg.checkpoint.every_steps
    last: dict = {}
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    mfu_of = mfu_meter(cfg, trainer.mesh.size)  # the figure `bignlp-jax bench` reports
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in range(first, cfg.train.steps):
            batch = trainer.device_batch(next(source))
            state, metrics = trainer.train_step(state, batch)
            done, window_steps = step + 1, window_steps + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                metrics = jax.device_get(metrics)
                _check_finite(metrics, done)
                elapsed = time.perf_counter() - window_start
                last = {k: float(v) for k, v in metrics.items() if k != "tokens"}
                last["tokens_per_sec"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
                last["mfu"] = mfu_of(last["tokens_per_sec"])
                if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                    last.update(trainer.evaluate(state.params, cfg.train.eval_batches))
                logger.log(done, last)
                window_start, window_steps = time.perf_counter(), 0
            reason = stop.should_stop(done)
            if reason or done == cfg.train.steps or (every and done % every == 0):
                _check_finite(metrics, done)  # never overwrite good checkpoints with NaNs
                # the source has just handed out batch `done`: its state is the next batch
                checkpointer.save(done, state, source.get_state(),
                                  step_meta(cfg, trainer.mesh, done))
            if reason:
                checkpointer.wait()
                raise Preempted(
                    f"stopped after step {done} of {cfg.train.steps} ({reason}); checkpoint "
                    f"saved in {checkpointer.directory / str(done)}; run the same command "
                    "again to continue"
                )
    finally:
        checkpointer.close()  # blocks until every started save is durable
        logger.close()
    return last


def _check_finite(metrics: dict, done: int) -> None:
    # the gradient norm too: finite gradients (and learning rate) keep the updated state finite
    values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm")}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLoss(
            f"{' and '.join(f'{k} is {v}' for k, v in bad.items())} at step {done}; stopping "
            "without saving (earlier checkpoints are kept).\n"
            "  fix: lower optimizer.lr, raise optimizer.warmup_steps, or check the data"
        )
