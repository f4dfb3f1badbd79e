"""Batched autoregressive generation with a key/value cache: one jitted prefill + decode loop.

Prompts of different lengths share one batch by left-padding: the padding slots carry segment id
0 (never attended to) and each row's positions restart at 0 on its first real token, so a padded
row computes exactly what it would alone. Every row then writes its new token into the same
cache slot per step, which keeps `cache_index` a scalar.

    slots:     0   1   2   3 | 4    5   ...      (P = 4 prompt slots, then max_new_tokens)
    row 0:     a   b   c   d | n0   n1
    row 1:     .   .   x   y | m0   m1           (. = padding, segment id 0)
    positions: row 0: 0 1 2 3 4 5;  row 1: - - 0 1 2 3
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax.config import ModelConfig
from bignlp_jax.errors import UserError
from bignlp_jax.model import forward, init_cache

log = logging.getLogger(__name__)

# Prompt slots are rounded up to a multiple of this, so prompts of similar length share one
# compiled program instead of compiling once per exact length.
PROMPT_BUCKET = 16


def sample_next(logits: jax.Array, key: jax.Array, *, greedy: bool, temperature, top_k: int | None,
                top_p) -> jax.Array:
    """logits [B, V] float32 -> next token ids [B].

    greedy: argmax (temperature 0). Otherwise sample from softmax(logits / temperature) after
    keeping only the `top_k` largest logits and the smallest set whose probability reaches
    `top_p` (top_p=None or 1.0 keeps everything)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] the k-th largest logit
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is below top_p (the first always stays)
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = before < top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p"))
def _generate(params, tokens, positions, segment_ids, key, temperature, top_p, eos_id, *,
              cfg: ModelConfig, max_new_tokens: int, greedy: bool, top_k: int | None,
              use_top_p: bool):
    """tokens/positions/segment_ids [B, P] (left-padded) -> (new tokens [B, N], lengths [B])."""
    B, P = tokens.shape
    N = max_new_tokens
    sample = functools.partial(sample_next, greedy=greedy, temperature=temperature, top_k=top_k,
                               top_p=top_p if use_top_p else None)

    # Prefill: the whole prompt in one pass; its keys/values fill slots 0..P-1.
    cache = init_cache(cfg, B, P + N)
    logits, cache = forward(cfg, params, tokens, positions, segment_ids, cache=cache,
                            cache_index=0)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0))
    next_pos = positions[:, -1] + 1  # [B]
    out = jnp.zeros((B, N), jnp.int32).at[:, 0].set(first)
    done = first == eos_id
    lengths = jnp.where(done, 0, 1).astype(jnp.int32)  # tokens before the first EOS

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, last, pos, cache, done, out, lengths = carry
        # Decode one token per row: it sits in slot P + t - 1 and attends to everything before.
        logits, cache = forward(cfg, params, last[:, None], pos[:, None],
                                jnp.ones((B, 1), jnp.int32), cache=cache, cache_index=P + t - 1)
        token = sample(logits[:, 0], jax.random.fold_in(key, t))
        token = jnp.where(done, eos_id, token)  # finished rows emit EOS (ignored) from now on
        out = out.at[:, t].set(token)
        done = done | (token == eos_id)
        lengths = lengths + (~done).astype(jnp.int32)
        return t + 1, token, pos + 1, cache, done, out, lengths

    carry = (jnp.int32(1), first, next_pos, cache, done, out, lengths)
    _, _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths


def prepare_prompts(prompt_ids: list[list[int]], max_new_tokens: int, context: int,
                    overflow: str = "truncate") -> list[list[int]]:
    """Check prompts and fit each into `context - max_new_tokens` tokens.

    overflow="truncate" drops the oldest tokens (with a warning); "error" raises UserError."""
    if not prompt_ids:
        raise UserError("generate: no prompts given; pass at least one non-empty prompt")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    room = context - max_new_tokens
    if room < 1:
        raise UserError(
            f"generate: max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {context} tokens (model.max_seq_len)\n"
            f"  fix: ask for at most {context - 1} new tokens"
        )
    fitted = []
    for i, ids in enumerate(prompt_ids):
        ids = [int(t) for t in ids]
        if not ids:
            raise UserError(
                f"generate: prompt {i} is empty (no tokens); give it some text to continue"
            )
        if len(ids) > room:
            message = (f"prompt {i} has {len(ids)} tokens but only {room} fit in the context "
                       f"({context} = model.max_seq_len, minus max_new_tokens={max_new_tokens})")
            if overflow == "error":
                raise UserError(f"generate: {message}\n  fix: shorten the prompt, lower "
                                "max_new_tokens, or allow truncation (overflow=truncate)")
            if overflow != "truncate":
                raise UserError(
                    f"generate: overflow must be 'truncate' or 'error', got {overflow!r}")
            log.warning("%s; keeping its last %d tokens", message, room)
            ids = ids[-room:]
        fitted.append(ids)
    return fitted


def left_pad(prompts: list[list[int]], pad_id: int = 0, bucket: int = PROMPT_BUCKET):
    """-> tokens, positions, segment_ids [B, P] numpy int32, P = longest prompt rounded up."""
    longest = max(len(p) for p in prompts)
    P = -(-longest // bucket) * bucket
    B = len(prompts)
    tokens = np.full((B, P), pad_id, np.int32)
    positions = np.zeros((B, P), np.int32)
    segment_ids = np.zeros((B, P), np.int32)
    for b, ids in enumerate(prompts):
        n = len(ids)
        tokens[b, P - n:] = ids
        positions[b, P - n:] = np.arange(n)
        segment_ids[b, P - n:] = 1
    return tokens, positions, segment_ids


def generate(model_cfg: ModelConfig, params: dict[str, Any], prompt_ids: list[list[int]],
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None, *,
             overflow: str = "truncate", pad_id: int = 0, place=None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns only the new tokens.

    temperature 0 is greedy decoding; otherwise tokens are sampled (top_k / top_p filtering
    optional) from a stream fixed by `seed`. A row stops at `eos_id` (not included in its
    output). Prompts too long for the context are cut from the left, or rejected with
    overflow="error". place: puts each host input where `params` live (a multi-process mesh
    takes only global arrays: e.g. replicated over it); default: as given."""
    if temperature < 0:
        raise UserError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model_cfg.vocab_size:
        raise UserError(f"generate: top_k must be in 1..{model_cfg.vocab_size}, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"generate: top_p must be in (0, 1], got {top_p}")
    prompts = prepare_prompts(prompt_ids, max_new_tokens, model_cfg.max_seq_len, overflow)
    greedy = temperature == 0.0
    host = (*left_pad(prompts, pad_id), jax.random.key_data(jax.random.key(seed)),
            np.float32(temperature if not greedy else 1.0), np.float32(top_p or 1.0),
            np.int32(-1 if eos_id is None else eos_id))
    tokens, positions, segment_ids, key, temperature_, top_p_, eos = (
        host if place is None else tuple(place(np.asarray(a)) for a in host))
    out, lengths = _generate(
        params, tokens, positions, segment_ids, jax.random.wrap_key_data(key),
        temperature_, top_p_, eos, cfg=model_cfg,
        max_new_tokens=max_new_tokens, greedy=greedy, top_k=None if greedy else top_k,
        use_top_p=not greedy and top_p is not None and top_p < 1.0,
    )
    if place is not None:  # the outputs may be spread over processes: every one gets all rows
        out, lengths = (multihost_utils.process_allgather(a, tiled=True) for a in (out, lengths))
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[b, : lengths[b]].tolist() for b in range(len(prompts))]
