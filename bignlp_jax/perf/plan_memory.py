"""Analytic bytes per device of a `plan --search` candidate: what decides whether it fits.

The search compiles only a handful of candidates (a 405B step on 1,024 simulated devices takes
minutes to compile), so this estimate decides which ones it compiles first. Terms, per device:

  static    parameters + AdamW moments (exactly what `describe` computes) and a float32
            gradient the size of the parameters;
  weights   fsdp-gathered working copies of the layer weights. Layer by layer (no stages, or
            stages with `train.pipeline_fsdp_gather=microbatch`) a few layers' float32 weights
            split over tensor live at once; with stages and `pipeline_fsdp_gather=step` (or
            no fsdp) a stage's layers sit whole over fsdp for the step, as float32 weights,
            their cast, the gradient and its accumulator (STEP_GATHER_COPIES);
  saved     what each layer keeps for the backward pass, per token a device runs at once, by
            remat policy: for the whole stack without stages; with stages, for one iteration's
            layers (the backward recomputes them iteration by iteration) or, with remat=none,
            for every iteration's;
  working   one layer's forward and backward temporaries and the logits, per token;
  pipeline  the stage inputs kept per iteration of the schedule (R*M+S-1 of them) and the
            buffer of M microbatches; with repeats, the slice of layers each iteration picks
            by index, which the backward pass keeps per iteration too.

"Tokens a device runs at once" are the rows of one gradient-accumulation microbatch
(`train.microbatches`), cut again into `train.pipeline_microbatches` with stages, over the
data x fsdp devices, times seq_len / sequence. The per-token coefficients are fitted to XLA:CPU's
compiled memory analysis (what `plan` reports) of Llama 3 405B layers in bfloat16 with the
blocked attention kernel at tensor 4 and 8: one layer costs 4 x hidden bytes per token under
remat=full (its float32 input), 35 x hidden under dots and (75 + 280/tensor) x hidden under
none. They are a ranking aid for the search, not a promise: the compiled figure decides.
"""

from __future__ import annotations

import functools
import math

# Function-level imports: plan_command.py imports this module (through plan_search.py) before
# its re-exec gives the process its devices, and jax may be imported only after that.

# Layer-by-layer fsdp gathering keeps about this many layers' float32 weights (split over
# tensor) alive at once: the gathered weights, their cast, the layer's gradient before its
# reduce-scatter, and the next layer's prefetch; fewer without fsdp (nothing to gather).
GATHERED_COPIES = {True: 12, False: 6}  # keyed by fsdp > 1
# A stage's weights gathered once per step: float32 weights, their cast, gradient, accumulator.
STEP_GATHER_COPIES = 4
# Bytes per token and layer kept for the backward pass, as (a, b): (a + b / tensor) x hidden.
SAVED_PER_TOKEN = {"full": (4.0, 0.0), "dots": (35.0, 0.0), "none": (75.0, 280.0)}
# One layer's forward + backward temporaries per token: (a + b / tensor) x hidden, plus the
# float32 logits (vocab / tensor per token).
WORKING_PER_TOKEN = (67.0, 307.0)
ACTIVATION_BYTES = 4  # the residual stream handed between layers and stages is float32


@functools.lru_cache(maxsize=64)
def layer_params(model) -> float:
    """Parameters of one transformer layer (everything but the embedding table and the head,
    spread evenly over the layers)."""
    from bignlp_jax.model.functional import abstract_params, count_params

    tables = model.vocab_size * model.hidden * (1 if model.tie_embeddings else 2)
    return (count_params(abstract_params(model)) - tables) / model.num_layers


def analytic_bytes(cfg, shape: dict[str, int]) -> float:
    """Parameters + AdamW moments per device, as `describe` computes them."""
    from bignlp_jax.model.flops import describe

    info = describe(cfg, shape)
    return info["param_bytes_per_device"] + info["optimizer_bytes_per_device"]


def layers_per_stage(num_layers: int, stages: int, repeats: int) -> int:
    """Layers one stage holds: R groups of L / (S*R) layers, rounded up (a split that does not
    come out even pads its last groups)."""
    return math.ceil(num_layers / (stages * repeats)) * repeats


def tokens_at_once(cfg, shape: dict[str, int], microbatches: int,
                   pipeline_microbatches: int) -> float:
    """Tokens one device runs forward and backward at once (see the module docstring)."""
    rows = cfg.train.global_batch_size / (
        microbatches * pipeline_microbatches * shape["data"] * shape["fsdp"])
    return rows * cfg.data.seq_len / shape.get("sequence", 1)


def memory_terms(cfg, shape: dict[str, int], remat: str, microbatches: int = 1,
                 pipeline_microbatches: int | None = None, gather: str = "step",
                 static: float | None = None) -> dict[str, float]:
    """The module docstring's terms for one candidate, and their `total`, in bytes per device.
    shape: mesh sizes (stage counts all stages) and `repeats`; static: parameters + moments
    if already known (`analytic_bytes`)."""
    m = cfg.model
    S, R, t = shape.get("stage", 1), shape.get("repeats", 1), shape["tensor"]
    M = (pipeline_microbatches or 2 * S) if S > 1 else 1
    D = m.hidden
    static = analytic_bytes(cfg, shape) if static is None else static
    layer_f32 = layer_params(m) * 4 / t  # one layer's float32 weights, split over tensor
    per_stage = layers_per_stage(m.num_layers, S, R)
    f = shape["fsdp"]
    whole = S > 1 and (gather == "step" or f == 1)  # a stage's weights at hand for the step
    if whole:
        weights = STEP_GATHER_COPIES * per_stage * layer_f32
    else:
        weights = GATHERED_COPIES[f > 1] * layer_f32
    tokens = tokens_at_once(cfg, shape, microbatches, M)
    a, b = SAVED_PER_TOKEN[remat]
    # One stage iteration runs per_stage / R layers. Under a remat policy the iteration is
    # checkpointed: the backward pass recomputes one iteration's layers at a time. Without one
    # every iteration's activations stay until the backward pass.
    iterations = R * M + S - 1 if S > 1 else 1
    kept = per_stage / R * (iterations if remat == "none" else 1)
    saved = kept * tokens * D * (a + b / t)
    wa, wb = WORKING_PER_TOKEN
    working = tokens * (D * (wa + wb / t) + 4 * m.vocab_size / t)
    pipeline = (iterations + M) * tokens * D * ACTIVATION_BYTES if S > 1 else 0.0
    if R > 1:  # each iteration picks its repeat's layers by index: the backward keeps the slice
        pipeline += iterations * per_stage / R * layer_f32 / (1 if whole else f)
    terms = {"static": static * 4 / 3, "weights": weights, "saved": saved,
             "working": working, "pipeline": pipeline}
    return {**terms, "total": sum(terms.values())}
