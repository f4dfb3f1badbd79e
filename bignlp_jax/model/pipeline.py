"""Pipeline parallelism over the scanned layer stack: GPipe and circular schedules, SPMD.

The stacked layers [L, ...] are cut into S stages x R repeats of K = ceil(L / (S*R)) layer
slots: group g = r*S + s (the next K layers in order) runs on stage s in repeat r, so with R > 1
each stage holds R non-adjacent groups (the circular / interleaved schedule) and R = 1 is GPipe.
A batch is cut into M microbatches; in iteration t stage s works on pass p = t - s (microbatch
p % M of repeat p // M) when 0 <= p < R*M, and idles otherwise, so one step takes R*M + S - 1
iterations of which S - 1 are the fill and drain bubble: a fraction (S-1)/(R*M+S-1) of the time.

Why SPMD in one program (the design of MaxText and Praxis) rather than one program per stage
(Megatron, torchtitan): every iteration is the same computation on every stage, written once as a
`vmap` over the stage axis of the weights and of a [S, mb, T, D] activation buffer, both sharded
over the `stage` mesh axis, so XLA gives each stage's devices their own slice; handing each
stage's output to the next stage is a `jnp.roll` of that buffer along the stage axis, which XLA
lowers to one collective-permute per iteration. Everything else (the optimizer, checkpoints,
gradient accumulation, the other mesh axes) is unchanged: one `jax.jit`, one set of global
arrays, and autodiff gives the backward schedule. The cost is that idle stages compute on
garbage in the bubble instead of sleeping, which is the same wall time.

Memory: each iteration (a stage's K layers on one microbatch) is rematerialised under the model's
remat policy (`jax.checkpoint` around the stage), on top of the per-layer policy inside it. The
weights are gathered over the fsdp axis once per step, before the iteration loop, not once per
microbatch: a stage's K*R layers sit unsharded over fsdp (still split over stage and tensor) for
the whole step, which pays with many stages and costs memory with few
(`train.pipeline_fsdp_gather=microbatch` gathers layer by layer in every iteration instead, as
without stages: R*M times the all-gather bytes, one layer's weights whole at a time).

Their gradients are summed over the data-parallel devices once per step too. Gathered weights
shared by every replica (data x fsdp) would make XLA keep the loop's gradient accumulator summed,
all-reducing each layer's gradient in every iteration (bytes growing with M). So the gathered
weights are broadcast to one copy per replica, [R, S, n, K, ...] split over data x fsdp along n
(each device still holds one copy), and the stage runs under a second `vmap` over n
(`replica_vmap`), each replica on its own rows: each device accumulates its own copy's gradient
in the loop, and the sum over n (the broadcast's transpose) happens once, after it
(benchmarks/pipeline_bubble.py measures the fsdp bytes, flat in M).

Uneven splits (L not a multiple of S*R, e.g. Llama 3 405B's 126 layers on 8 stages): the
schedule runs S*R*K slots, and the P = S*R*K - L slots no layer fills are identity slots, the last
slot of each of the last P groups (`group_layers`; 126 on 8 stages: 16 x 6 then 15 x 2). Inside
the pipeline only, the regrouped weights get zeros in those slots and the slot computes
`where(valid, layer(h), h)`: exactly the identity whatever the block, and no gradient reaches
the zeros (which are dropped anyway when the gradient is cut back to [L]). Every stage runs its K
slots in lock step, so an identity slot costs a layer's time whichever stage holds it: the waste
is P / L extra layer compute, placed where the code is simplest. (Megatron and Llama 3 take the
layer off the first and last stages because those also run the embedding and the loss; here the
embedding and the head run outside the pipeline on every stage, so no stage is heavier.) A split
with P >= K (a whole group's worth of slots idle: fewer groups would hold the layers) is refused
by the train step's configuration check (`split_fits`).

The checkpoint keeps the canonical layer order [L, ...] so a run resumes under any stage or
repeat count. When S divides L it is stored split contiguously over stages: for R = 1 and no
padding that is exactly the schedule's layout; otherwise (R > 1, or identity slots) XLA moves
the weights between stages once per step (and their gradients back), whatever M is. When S does
not divide L the stack cannot be split over `stage` along its layers (a sharded dimension must
divide evenly), so the rules table (parallel/rules.py) stores it split over `stage` along the
weights' `embed` dimension instead, with fsdp: storage per device stays the same, and the
regrouping gathers it over `stage` and splits it by groups, the same all-to-all-sized move.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bignlp_jax.parallel.rules import (
    batch_replicas,
    constrain,
    constrain_gathered,
    replica_vmap,
    stage_vmap,
)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """S stages, M microbatches per step and R repeats (1: GPipe, more: circular).
    gather_once: gather the fsdp-sharded weights once per step (else layer by layer in every
    iteration, as without stages: R*M times the bytes, a layer's weights in memory at a time)."""

    stages: int
    microbatches: int
    repeats: int = 1
    gather_once: bool = True

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The idle fraction of a step: (S-1) / (R*M + S-1)."""
        return (self.stages - 1) / self.iterations


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    return PipelineSpec(stages, microbatches, repeats).bubble


def group_layers(num_layers: int, stages: int, repeats: int = 1) -> tuple[int, ...]:
    """Real layers in each of the S*R groups (group r*S + s runs on stage s in repeat r), in
    layer order: K = ceil(L / (S*R)) slots per group, the last P = S*R*K - L groups one short
    (their last slot is an identity slot). P < S*R always, so one slot per group suffices."""
    groups = stages * repeats
    K = -(-num_layers // groups)
    P = groups * K - num_layers
    return tuple(K - (g >= groups - P) for g in range(groups))


def split_fits(num_layers: int, groups: int) -> bool:
    """Whether `groups` groups of K = ceil(L / groups) slots leave fewer than K identity slots;
    K or more would fit the layers in fewer groups, a group's worth of compute idle."""
    K = -(-num_layers // groups)
    return groups * K - num_layers < K


def _pad_groups(a: jax.Array, counts: tuple[int, ...], K: int) -> jax.Array:
    """[L, ...] -> [len(counts) * K, ...]: each group's layers, then its identity slots (zeros;
    a non-float leaf such as a dropout key repeats layer 0, unused)."""
    pieces, start = [], 0
    for c in counts:
        pieces.append(a[start:start + c])
        if c < K:
            filler = a[:1] if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(
                a[:1])
            pieces += [filler] * (K - c)
        start += c
    return jnp.concatenate(pieces)


def run_pipeline(layer: Callable, x: jax.Array, layer_xs: Any, layer_axes: Any, row_xs: Any,
                 spec: PipelineSpec, remat_policy=None) -> jax.Array:
    """Apply the L stacked layers to x [B, T, D] through the schedule of `spec`.

    layer(x, layer_params, rows) -> x runs one layer on one microbatch x [mb, T, D]; layer_xs
    holds every layer's inputs stacked on a leading [L] axis (weights, adapters, keys) and
    layer_axes their logical axis names (None: leave a leaf's sharding to XLA); row_xs holds
    per-row inputs with a leading [B] axis (rotary tables, segment ids, query positions).
    remat_policy: a `jax.checkpoint` policy for one stage iteration (None: keep everything)."""
    S, M, R = spec.stages, spec.microbatches, spec.repeats
    L = jax.tree.leaves(layer_xs)[0].shape[0]
    counts = group_layers(L, S, R)
    K = max(counts)
    padded = sum(counts) < S * R * K  # identity slots (see the docstring)
    B = x.shape[0]
    mb = B // M

    def split(a):  # [B, ...] -> [M, mb, ...]; microbatch m takes rows m, m+M, ... (as
        # train.microbatches does) so each data-parallel device holds a share of every one
        return a.reshape(mb, M, *a.shape[1:]).swapaxes(0, 1)

    rows = jax.tree.map(lambda a: split(jnp.asarray(a)), row_xs)

    def regroup(a, axes):  # [L, ...] -> [R, S, K, ...]: group r*S + s at [r, s]
        if padded:
            a = _pad_groups(a, counts, K)
        a = a.reshape(R, S, K, *a.shape[1:])
        if axes is None:
            return a
        # stage s keeps its groups (whatever `layers` maps to in storage); gathered over fsdp
        # here, once per step (see the docstring)
        laid_out = constrain_gathered if spec.gather_once else constrain
        return laid_out(a, (None, "pipeline_stage", None, *axes[1:]))

    _, n = batch_replicas()
    if not spec.gather_once or mb % n:
        n = 1

    def per_replica(a, axes):  # [R, S, K, ...] -> [R, S, n, K, ...]: one copy per replica
        if n == 1:
            return a
        a = jnp.broadcast_to(a[:, :, None], (R, S, n, *a.shape[2:]))
        if axes is None:
            return a
        return constrain(a, (None, "pipeline_stage", "batch", None, *axes[1:]))

    # layer_axes matches layer_xs down to its leaves (a tuple of names, or None, per array)
    weights = jax.tree.map(lambda a, axes: per_replica(regroup(a, axes), axes), layer_xs,
                           layer_axes)
    if padded:  # which slots hold a layer: [R, S, K], a constant
        valid = jnp.asarray([[slot < c for slot in range(K)] for c in counts]).reshape(R, S, K)
        weights = (weights, per_replica(valid, None))

    def stage(w, h, r):
        """One stage's K layers on one microbatch (or one replica's rows of it): w [K, ...],
        h [rows, T, D]."""
        def body(h, w_layer):
            return layer(h, w_layer, r), None

        def body_with_identity_slots(h, xs):
            w_layer, valid_slot = xs
            return jnp.where(valid_slot, layer(h, w_layer, r), h), None

        return jax.lax.scan(body_with_identity_slots if padded else body, h, w)[0]

    if remat_policy is not None:
        stage = jax.checkpoint(stage, policy=remat_policy, prevent_cse=False)
    if n == 1:
        run_stages = stage_vmap(stage)
    else:
        per_device = stage_vmap(replica_vmap(stage))

        def run_stages(w, h, r):  # rows [S, mb, ...] -> [S, n, mb / n, ...] and back
            def cut(a):
                return a.reshape(a.shape[0], n, a.shape[1] // n, *a.shape[2:])

            out = per_device(w, cut(h), jax.tree.map(cut, r))
            return out.reshape(h.shape)
    act = ("act_stage", "batch", "seq", "act_embed")
    stage_ids = jnp.arange(S)

    def iteration(carry, t):
        state, buffer = carry
        # Stage 0 takes microbatch t % M: fresh inputs in the first repeat, the last stage's
        # output of the previous repeat after (written M - S + 1 >= 1 iterations earlier).
        state = state.at[0].set(buffer[t % M])
        state = constrain(state, act)
        passes = t - stage_ids  # [S]
        repeat = jnp.clip(passes // M, 0, R - 1)
        if R == 1:
            w_t = jax.tree.map(lambda a: a[0], weights)
        else:  # each stage picks its own repeat's layers (a local slice)
            w_t = jax.vmap(lambda w, r: jax.tree.map(lambda a: a[r], w), in_axes=(1, 0))(
                weights, repeat)
        rows_t = jax.tree.map(lambda a: a[passes % M], rows)  # [S, mb, ...]
        out = constrain(run_stages(w_t, state, rows_t), act)
        # The last stage's result for microbatch (t - S + 1) % M; before t = S-1 it is the
        # fill's garbage and the buffer keeps what it holds.
        m_out = (t - (S - 1)) % M
        done = jnp.where(t >= S - 1, out[S - 1], buffer[m_out])
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, done, m_out, 0)
        # stage s's output becomes stage s+1's input: a collective-permute over `stage`
        return (jnp.roll(out, 1, axis=0), buffer), None

    state = constrain(jnp.zeros((S, mb, *x.shape[1:]), x.dtype), act)
    buffer = split(x)
    (_, buffer), _ = jax.lax.scan(iteration, (state, buffer), jnp.arange(spec.iterations))
    return buffer.swapaxes(0, 1).reshape(B, *x.shape[1:])
