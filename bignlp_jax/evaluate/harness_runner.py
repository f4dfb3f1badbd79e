"""The model side of the lm-evaluation-harness backend: score and generate token ids on a mesh.

No lm_eval import here: the harness's requests arrive already tokenised (harness.py turns them
into token lists), so this module is plain JAX and testable alone.

Scoring. A (context, continuation) pair is laid out as the harness's Hugging Face backend does,
keeping the last `max_length + 1` tokens of context + continuation:

    ids:      c0 c1 c2 c3 | k0 k1 k2          (context | continuation)
    inputs:   c0 c1 c2 c3   k0 k1             (the last token is never an input)
    targets:  c1 c2 c3 k0   k1 k2
    counted:            ^^  ^^ ^^             (the continuation's positions)

Rows are right-padded (segment id 0) to one of a few fixed lengths (`length_buckets`) and cut
into batches of a fixed number of rows, so a task compiles once per bucket it uses, not once
per request length. Rows are sorted by (length, ids) before batching: the batches depend only on
the set of requests, not on the order the harness hands them over, so every process of a
multi-process job builds the same batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from bignlp_jax.config import ModelConfig
from bignlp_jax.data.batches import process_rows
from bignlp_jax.errors import UserError
from bignlp_jax.infer.generate import generate
from bignlp_jax.model import forward
from bignlp_jax.parallel.rules import activation_sharding, logical_to_spec

# Rows lengths are rounded up to a multiple of this, then to the smallest bucket that holds them.
LENGTH_QUANTUM = 16
# Buckets: max_length / 2**k for k < BUCKETS (rounded up to LENGTH_QUANTUM).
BUCKETS = 4


def length_buckets(max_length: int) -> list[int]:
    """The fixed row lengths scoring pads to, shortest first (the longest is `max_length`)."""
    sizes = {max_length}
    for k in range(1, BUCKETS):
        size = -(-(max_length >> k) // LENGTH_QUANTUM) * LENGTH_QUANTUM
        if 0 < size < max_length:
            sizes.add(size)
    return sorted(sizes)


def score_layout(context: Sequence[int], continuation: Sequence[int], max_length: int
                 ) -> tuple[list[int], list[int], int]:
    """(inputs, targets, continuation length) of one pair, left-truncated like the HF backend."""
    if not context or not continuation:
        raise ValueError("a scored pair needs a non-empty context and continuation")
    if len(continuation) > max_length:
        raise UserError(f"lm-eval: a continuation of {len(continuation)} tokens does not fit "
                        f"the model's {max_length}-token window\n  fix: raise max_length (at "
                        "most model.max_seq_len) or shorten the task's continuations")
    whole = [*context, *continuation][-(max_length + 1):]
    return whole[:-1], whole[1:], len(continuation)


def _score_rows(model_cfg: ModelConfig, params, tokens, segment_ids, targets, counted,
                is_last):
    """[B, T] rows -> (summed log p of the counted targets before the last one [B], all of them
    greedy [B], log p of every token at the last scored position [B, V]).

    The last position is returned whole so that rows differing only in their final token (the
    one-token answers of a multiple-choice question) are computed once (`score`)."""
    logits, _ = forward(model_cfg, params, tokens, None, segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    greedy = jnp.argmax(logp, axis=-1) == targets  # [B, T]
    total = jnp.sum(jnp.where(counted, picked, 0.0), axis=-1)
    last = jnp.sum(jnp.where(is_last[..., None], logp, 0.0), axis=1)  # [B, V]
    return total, jnp.all(greedy | ~counted, axis=-1), last


class HarnessRunner:
    """Score and generate with `params` (placed by `param_sh`) on `mesh`, in batches of
    `batch_size` rows (rounded up to the data-parallel device count)."""

    def __init__(self, model_cfg: ModelConfig, params: dict[str, Any], mesh, rules,
                 param_sh, batch_size: int, max_length: int):
        if not 1 < max_length <= model_cfg.max_seq_len:
            raise UserError(f"lm-eval: max_length={max_length} must be in "
                            f"2..{model_cfg.max_seq_len} (model.max_seq_len)\n  fix: pass a "
                            "smaller --max-length")
        self.model_cfg, self.params, self.mesh, self.rules = model_cfg, params, mesh, rules
        self.max_length = max_length
        self.batch_sh = NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-max(batch_size, 1) // dp) * dp
        self.buckets = length_buckets(max_length)
        self.shapes_scored: set[tuple[int, int]] = set()  # one compiled program each

        def step(params, tokens, segment_ids, targets, counted, is_last):
            with activation_sharding(mesh, rules):
                return _score_rows(model_cfg, params, tokens, segment_ids, targets, counted,
                                   is_last)

        replicated = NamedSharding(mesh, PartitionSpec())
        self._score = jax.jit(step, in_shardings=(param_sh, *[self.batch_sh] * 5),
                              out_shardings=(replicated, replicated, replicated))

    def bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _place(self, rows: np.ndarray) -> jax.Array:
        """A global [B, T] array from the full batch every process holds (its own rows)."""
        lo, hi = process_rows(self.batch_sh, rows.shape[0], rows.shape[1])
        return jax.make_array_from_process_local_data(self.batch_sh, rows[lo:hi], rows.shape)

    def _replicate(self, value: np.ndarray) -> jax.Array:
        """`value` (the same on every process) as one array replicated over the mesh."""
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
              ) -> list[tuple[float, bool]]:
        """(summed log-likelihood of the continuation, is it the greedy continuation) per pair.

        Pairs whose model inputs are the same (all tokens but the last, and the same number
        scored) share one row: only their last target differs, and the row returns that
        position's whole distribution."""
        layouts = [score_layout(c, k, self.max_length) for c, k in pairs]
        rows: dict[tuple, list[int]] = {}  # (inputs, scored count) -> the pairs it serves
        for i, (inputs, _, n) in enumerate(layouts):
            rows.setdefault((tuple(inputs), n), []).append(i)
        keys = sorted(rows, key=lambda key: (-len(key[0]), key))  # longest first, then by ids
        results: list[tuple[float, bool]] = [(0.0, False)] * len(layouts)
        B = self.batch_size
        for start in range(0, len(keys), B):
            chunk = keys[start:start + B]
            T = self.bucket(len(chunk[0][0]))  # sorted: the first row is the longest
            tokens = np.zeros((B, T), np.int32)
            segment_ids = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            counted = np.zeros((B, T), bool)  # scored positions before the last
            is_last = np.zeros((B, T), bool)
            for r, (inputs, n) in enumerate(chunk):
                L = len(inputs)
                tokens[r, :L] = inputs
                segment_ids[r, :L] = 1
                targets[r, :L] = layouts[rows[(inputs, n)][0]][1]
                counted[r, L - n:L - 1] = True
                is_last[r, L - 1] = True
            self.shapes_scored.add((B, T))
            total, greedy, last = (np.asarray(a) for a in self._score(
                self.params, *map(self._place, (tokens, segment_ids, targets, counted,
                                                is_last))))
            best = last.argmax(axis=-1)
            for r, key in enumerate(chunk):
                for i in rows[key]:
                    final = layouts[i][1][-1]  # the pair's own last target
                    results[i] = (float(total[r]) + float(last[r, final]),
                                  bool(greedy[r]) and int(best[r]) == final)
        return results

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float, top_k: int | None, top_p: float | None, seed: int,
                 eos_id: int | None, pad_id: int) -> list[list[int]]:
        """New tokens after each prompt (cut to fit `max_length`, oldest tokens first), in
        batches of `batch_size`; prompts sorted by length so a batch shares one bucket."""
        if max_new_tokens >= self.max_length:
            raise UserError(f"lm-eval: max_gen_toks={max_new_tokens} leaves no room for a prompt "
                            f"in max_length={self.max_length} tokens\n  fix: lower the task's "
                            "max_gen_toks or raise max_length")
        room = self.max_length - max_new_tokens
        fitted = [list(p)[-room:] for p in prompts]
        order = sorted(range(len(fitted)), key=lambda i: (-len(fitted[i]), fitted[i]))
        out: list[list[int]] = [[] for _ in fitted]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # a short last batch is filled with copies of its first prompt (outputs dropped):
            # every batch has the same number of rows, so one program per prompt bucket
            batch = [fitted[i] for i in chunk]
            batch += [batch[0]] * (self.batch_size - len(batch))
            # sampling: each batch draws from its own stream (seed + its first slot)
            new = generate(self.model_cfg, self.params, batch,
                           max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed + start, eos_id=eos_id, pad_id=pad_id, overflow="error",
                           place=self._replicate)
            for i, ids in zip(chunk, new):
                out[i] = ids
        return out


def requests_digest(items: Sequence[Any]) -> str:
    """sha256 of a request list's repr: equal on every process iff they got the same requests."""
    return hashlib.sha256(repr(list(items)).encode("utf-8")).hexdigest()


def check_same_requests(items: Sequence[Any], what: str) -> None:
    """Stop with one message when the processes of a job were handed different requests."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(bytes.fromhex(requests_digest(items)), np.uint8)
    ours = np.asarray(multihost_utils.broadcast_one_to_all(digest))
    mismatch = np.asarray(multihost_utils.process_allgather(
        np.asarray([int((ours != digest).any())], np.int32)))
    if mismatch.any():
        raise UserError(f"lm-eval: the processes of this job built different {what} requests "
                        "(the task data or its order differs between hosts)\n  fix: give every "
                        "process the same task files and lm-eval version")

