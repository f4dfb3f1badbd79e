"""Scoring held-out task data with a model: label log-likelihoods, target loss, generation.

Classification never parses generated text: each record is written once per label, with that
label's word in the target slot, and the label whose tokens (and the closing </s>) have the
highest summed log-likelihood wins. All candidate rows of a split are laid out as one list and
cut into global batches; each process builds only its own rows of each batch, and the jitted
scorer returns every row's score to every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bignlp_jax.data.tasks.formats import ROW_KEYS, TaskFormat, empty_row, make_row, stack_rows
from bignlp_jax.infer.generate import generate
from bignlp_jax.model import forward
from bignlp_jax.model.loss import token_cross_entropy
from bignlp_jax.parallel.rules import activation_sharding, rules_for

ScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]  # local rows -> [global rows] scores


def sequence_log_likelihood(model_cfg, params, batch) -> jax.Array:
    """[B]: sum over counted targets of log p(target) (pure; call inside jit)."""
    logits, _ = forward(model_cfg, params, batch["tokens"], batch["positions"],
                        batch["segment_ids"])
    nll = token_cross_entropy(logits, batch["targets"])
    return -jnp.sum(nll * batch["loss_mask"], axis=-1)


def make_score_fn(trainer, params) -> ScoreFn:
    """Jitted scorer of `params` on the trainer's mesh: batch rows sharded like training, scores
    replicated to every process."""
    mesh, cfg = trainer.mesh, trainer.cfg
    rules = rules_for(cfg)

    def step(params, batch):
        with activation_sharding(mesh, rules):
            return sequence_log_likelihood(cfg.model, params, batch)

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(trainer.state_sh.params,
                                         {k: trainer.batch_sh for k in ROW_KEYS}),
                     out_shardings=replicated)
    return lambda local: np.asarray(jitted(params, trainer.device_batch(local)))


def score_rows(score: ScoreFn, rows: Sequence[dict], batch_rows: int,
               local: tuple[int, int]) -> np.ndarray:
    """Scores of `rows` (padded dicts), cut into global batches of `batch_rows`; this process
    builds rows local[0]..local[1]-1 of each batch."""
    lo, hi = local
    seq_len = len(rows[0]["tokens"]) if rows else 1
    out = []
    for start in range(0, len(rows), batch_rows):
        chunk = [rows[start + r] if start + r < len(rows) else empty_row(seq_len)
                 for r in range(lo, hi)]
        out.append(score(stack_rows(chunk))[: len(rows) - start])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def label_log_likelihoods(score: ScoreFn, fmt: TaskFormat, records: Sequence,
                          batch_rows: int, local: tuple[int, int]) -> np.ndarray:
    """[N, C]: summed log-likelihood of each label word (+ </s>) after each record's prompt.

    Every label sees the same (equally truncated) prompt, so only the answers differ."""
    words = [[*ids, fmt.tokenizer.eos_id] for ids in fmt.word_ids]
    longest = max(len(w) for w in words) - 1
    rows: list[dict] = []
    for record in records:
        prompt = fmt.prompt_ids(record, longest)
        rows.extend(make_row(prompt, word, fmt.seq_len) for word in words)
    scores = score_rows(score, rows, batch_rows, local)
    return scores.reshape(len(records), len(words))


def target_nll(score: ScoreFn, fmt: TaskFormat, records: Sequence, batch_rows: int,
               local: tuple[int, int]) -> tuple[float, int]:
    """(summed negative log-likelihood of every gold target token, number of those tokens)."""
    rows, count = [], 0
    for i, record in enumerate(records):
        rows.append(fmt.row(record, i))
        count += int(rows[-1]["loss_mask"].sum())
    return float(-score_rows(score, rows, batch_rows, local).sum()), count


def generate_targets(model_cfg, params, fmt: TaskFormat, records: Sequence,
                     batch_size: int) -> list[str]:
    """Greedy answers (decoded text) to each record's prompt, up to `task.max_target_tokens`."""
    tok, budget = fmt.tokenizer, fmt.task.max_target_tokens
    texts: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        prompts = [fmt.prompt_ids(record, budget) for record in chunk]
        outputs = generate(model_cfg, params, prompts, budget, eos_id=tok.eos_id,
                           pad_id=tok.pad_id, overflow="truncate")
        texts.extend(tok.decode(ids) for ids in outputs)
    return texts
