"""What one config compiles to on one mesh: the train and eval steps, shardings, and the
rows of each global batch this process reads. Built once per run (and by bench, plan, eval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax

from bignlp_jax.config import Config
from bignlp_jax.data import global_batch, make_eval_sources, process_rows
from bignlp_jax.errors import UserError
from bignlp_jax.model.lora import KEY as LORA_KEY
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.model.preference_loss import REWARD_METRICS
from bignlp_jax.parallel.mesh import build_mesh
from bignlp_jax.parallel.rules import rules_for
from bignlp_jax.train.dpo import (
    PAIRS,
    is_preference,
    make_dpo_eval_step,
    make_dpo_train_step,
    needs_reference_copy,
    pair_means,
)
from bignlp_jax.train.init_from import load_init_params
from bignlp_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bignlp_jax.train.start import StateLayout
from bignlp_jax.train.state import TrainState, state_shardings
from bignlp_jax.train.step import (
    batch_sharding,
    make_eval_step,
    make_train_step,
    pipeline_spec,
)


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
        rules = rules_for(cfg)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        micro = cfg.train.global_batch_size // cfg.train.microbatches
        if micro % dp:
            raise UserError(
                f"train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
                f"{cfg.train.microbatches} = {micro} rows per microbatch cannot be split over "
                f"the {dp} data-parallel devices (mesh.data x mesh.fsdp)\n"
                f"  fix: make the microbatch a multiple of {dp}"
            )
        pipeline_spec(cfg, dp)  # a schedule that does not fit: one line, before compiling
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
