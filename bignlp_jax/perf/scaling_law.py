"""Compute-optimal model size, token count, batch size and learning rate for a FLOPs budget.

Parametric loss fit (Hoffmann et al. 2022, approach 3):  L(N, D) = E + A / N^a + B / D^b,
N parameters, D training tokens, spent as C = 6 N D FLOPs. Minimising L on that constraint
(substitute D = C / (6N), set dL/dN = 0) gives the closed form

    N_opt = G * (C/6)^(b/(a+b)),   D_opt = (C/6)^(a/(a+b)) / G,   G = (a A / (b B))^(1/(a+b)).

Batch size and peak learning rate follow the compute fits of DeepSeek LLM (DeepSeek-AI 2024,
arXiv:2401.02954, section 3.1): B_opt = 0.2920 C^0.3271 tokens, eta_opt = 0.3118 C^-0.1250,
trained with their multi-step schedule: warmup, then x0.316 at 80% and x0.1 at 90% of the
tokens. Pure arithmetic: no jax here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class Law:
    """One published fit of L(N, D) = E + A / N^a + B / D^b (loss in nats per token)."""

    name: str
    E: float
    A: float
    B: float
    a: float
    b: float
    source: str

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.a + self.B / d**self.b


LAWS: dict[str, Law] = {
    "epoch": Law("epoch", 1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                 "Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt' "
                 "(arXiv:2404.10102), refit of Hoffmann et al. 2022 approach 3"),
    "hoffmann": Law("hoffmann", 1.69, 406.4, 410.7, 0.34, 0.28,
                    "Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models' "
                    "(arXiv:2203.15556), approach 3"),
}

# DeepSeek LLM (arXiv:2401.02954) eq. 1: compute-optimal batch (tokens) and peak learning rate
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271
LR_COEF, LR_EXP = 0.3118, -0.1250
DEEPSEEK_SOURCE = "DeepSeek-AI 2024, 'DeepSeek LLM' (arXiv:2401.02954), eq. 1 and section 2.3"
# the multi-step schedule of DeepSeek LLM: (fraction of training, lr multiplier from there on)
STEP_DECAYS = ((0.8, 0.1**0.5), (0.9, 0.1))  # 0.316 then 0.1 (two equal factors of sqrt(0.1))
WARMUP_STEPS = 2000  # DeepSeek LLM's warmup, capped at a share of short runs (budget.py)


@dataclass(frozen=True)
class Optimum:
    flops: float
    params: float  # N_opt
    tokens: float  # D_opt
    loss: float  # L(N_opt, D_opt)
    law: Law

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def compute_optimal(flops: float, law: Law) -> Optimum:
    """N and D minimising `law`'s loss at C = 6 N D = `flops` (closed form, module docstring)."""
    if not flops > 0:
        raise ValueError(f"the FLOPs budget must be positive, got {flops}")
    a, b = law.a, law.b
    g = (a * law.A / (b * law.B)) ** (1 / (a + b))
    n = g * (flops / 6) ** (b / (a + b))
    d = flops / (6 * n)
    return Optimum(flops, n, d, law.loss(n, d), law)


def optimal_batch_tokens(flops: float) -> float:
    """DeepSeek LLM's compute-optimal batch size in tokens."""
    return BATCH_COEF * flops**BATCH_EXP


def optimal_lr(flops: float) -> float:
    """DeepSeek LLM's compute-optimal peak learning rate (AdamW, their multi-step schedule)."""
    return LR_COEF * flops**LR_EXP


def budget_flops(devices: int, peak_tflops: float, mfu: float, days: float) -> float:
    """Training FLOPs that `devices` accelerators of `peak_tflops` deliver in `days` at `mfu`:
    devices x peak x MFU x days x 86400 (evaluated in that order)."""
    return devices * (peak_tflops * 1e12) * mfu * days * SECONDS_PER_DAY


def days_for(flops: float, devices: int, peak_tflops: float, mfu: float) -> float:
    """Wall-clock days that `flops` take on `devices` at `mfu` of `peak_tflops` each."""
    return flops / (devices * peak_tflops * 1e12 * mfu) / SECONDS_PER_DAY


def step_boundaries(steps: int) -> list[int]:
    """The global steps where the step schedule decays (80% and 90% of `steps`)."""
    return [max(1, round(frac * steps)) for frac, _ in STEP_DECAYS]


def decay_gamma() -> float:
    """The factor applied at each boundary (sqrt(0.1): 0.316 after the first, 0.1 after both)."""
    gamma = STEP_DECAYS[0][1]
    assert math.isclose(gamma**2, STEP_DECAYS[1][1])  # optimizer.schedule=step has one gamma
    return gamma
