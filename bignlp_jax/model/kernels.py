"""Which implementation of each op the model runs: chosen once, when the model is built.

Every op has a `reference` implementation (plain jnp / einsum, gradients by autodiff) that the
tests always run. An optimised kernel sits beside it under its own name and is used only where
`model.kernels=auto` picks it for the backend, or where a `model.kernel_<op>` key names it:

| op | kernels | `auto` picks |
| --- | --- | --- |
| projection | reference (einsum), cpu_transposed (`matmul.py`) | cpu_transposed on CPU |
| attention | reference (einsum), blocked (`attention.py`), cudnn | see `AUTO` |

A kernel is kept only
while `benchmarks/kernel_ablation.py` shows it pays (>= 3%) on a backend where `auto` uses it;
the measurements are in benchmarks/RESULTS.md. Removed that way: the hand-written
backward passes of the qkv split, RoPE and SwiGLU, and of the cross-entropy. Layers receive the
resolved `Kernels` as an explicit argument and never look at the backend themselves.
"""

from __future__ import annotations

import dataclasses

from bignlp_jax.config import ModelConfig

OPS: dict[str, tuple[str, ...]] = {
    "projection": ("reference", "cpu_transposed"),
    "attention": ("reference", "blocked", "cudnn"),
}

# What `model.kernels=auto` runs on each backend (anything not listed: reference). Only kernels
# measured to pay on that backend are listed; GPU and TPU run the reference ops (XLA fuses the
# elementwise work itself there) unless a config names a kernel, e.g. model.kernel_attention=cudnn.
AUTO: dict[str, dict[str, str]] = {
    "cpu": {"projection": "cpu_transposed", "attention": "blocked"},
}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One kernel name per op; hashable, so it can be a static attribute of the module graph."""

    projection: str = "reference"
    attention: str = "reference"

    def __post_init__(self):
        for op, choices in OPS.items():
            if getattr(self, op) not in choices:
                raise ValueError(f"unknown {op} kernel {getattr(self, op)!r}; one of {choices}")


REFERENCE = Kernels()


def select_kernels(cfg: ModelConfig, platform: str) -> Kernels:
    """The kernels `cfg` asks for on `platform` ("cpu", "gpu", "tpu", ...): `model.kernels`
    (auto or reference) for every op, then the per-op `model.kernel_<op>` keys on top."""
    chosen = dict(AUTO.get(platform, {})) if cfg.kernels == "auto" else {}
    for op in OPS:
        name = getattr(cfg, f"kernel_{op}")
        if name != "auto":
            chosen[op] = name
    return Kernels(**chosen)
