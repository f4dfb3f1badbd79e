"""A transformer shape of about N parameters in a family's proportions (`plan --budget`).

The proportions, read off the presets in configs/models/:
  llama  Llama 3 (8B, 70B): head dim 128, 8 KV heads (grouped-query attention), SwiGLU FFN of
         3.5 x hidden, RMSNorm, RoPE, untied head, 128256-token vocabulary.
  gpt3   GPT-3 (Brown et al. 2020, 6.7B-175B): head dim 128, one KV head per query head, GELU
         FFN of 4 x hidden, LayerNorm, learned positions, biases, tied embeddings, 50304 tokens.
  Both:  depth from the aspect ratio hidden / layers, 64 up to 1B parameters (GPT-3 125M-760M,
         our Llama 126M/760M presets) rising log-linearly to 128 at 10B and beyond (GPT-3 6.7B-
         175B, Llama 3 8B; 70B has 102, 405B 130).
Below 1024 the hidden size steps by 128 with head dim 64 (head dim 128 would leave a handful of
heads), so heads come in pairs; from 1024 on it steps by 1024, so heads come in multiples of 8
and hidden, heads, KV heads and FFN all split over 8 tensor-parallel devices and the hidden
size over a power-of-two fsdp axis. For each width the layer count that best matches N is
exact: parameters are counted by the model's own shapes (`model.functional.abstract_params`)
at 1 and 2 layers, and grow linearly with depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bignlp_jax.config import ModelConfig, load_config
from bignlp_jax.errors import UserError
from bignlp_jax.model.functional import abstract_params, count_params

FAMILIES = ("llama", "gpt3")
DEFAULT_VOCAB = {"llama": 128256, "gpt3": 50304}
FFN_RATIO = {"llama": 3.5, "gpt3": 4.0}
PRESET_PREFIX = {"llama": "llama", "gpt3": "gpt3_"}
TOLERANCE = 0.10  # parameters within 10% of the law's N
MIN_ASPECT, MAX_ASPECT = 16, 512  # hidden / layers outside this is no sensible transformer


def target_aspect(n: float) -> float:
    """hidden / layers the family presets use at about n parameters (module docstring)."""
    x = min(max((math.log10(n) - 9.0), 0.0), 1.0)
    return 64.0 * 2.0**x


def widths() -> list[int]:
    """Candidate hidden sizes, smallest first: 64, 128..896 by 128, then 1024..32768 by 1024."""
    return [64, *range(128, 1024, 128), *range(1024, 32768 + 1, 1024)]


def model_config(family: str, hidden: int, layers: int, vocab: int, seq_len: int) -> ModelConfig:
    """The ModelConfig of one candidate: the family's fixed choices plus this width and depth."""
    head_dim = 128 if hidden >= 1024 else 64
    heads = hidden // head_dim
    ffn_q = 256 if hidden >= 1024 else 32  # FFN rounded to a multiple that splits 8 ways
    mlp_dim = max(ffn_q, round(FFN_RATIO[family] * hidden / ffn_q) * ffn_q)
    common = dict(name=f"budget_{family}", vocab_size=vocab, num_layers=layers, hidden=hidden,
                  num_heads=heads, head_dim=head_dim, mlp_dim=mlp_dim, max_seq_len=seq_len,
                  dtype="bfloat16", remat="full")
    if family == "llama":
        return ModelConfig(family="llama", num_kv_heads=math.gcd(heads, 8), mlp="swiglu",
                           norm="rmsnorm", position="rope", rope_theta=500000.0,
                           use_bias=False, tie_embeddings=False, **common)
    return ModelConfig(family="gpt", mlp="gelu", norm="layernorm", position="learned",
                       use_bias=True, tie_embeddings=True, **common)


def params_of(cfg: ModelConfig) -> int:
    return count_params(abstract_params(cfg))


@dataclass(frozen=True)
class Shape:
    model: ModelConfig
    params: int
    target: float  # the law's N

    @property
    def error(self) -> float:
        return self.params / self.target - 1


def choose_shape(family: str, n: float, vocab: int, seq_len: int) -> Shape:
    """The shape within 10% of n parameters whose aspect ratio is nearest the family's
    (parameter error counting four times as much), among aspect ratios 16..512; UserError when
    there is none (the vocabulary alone may outweigh n)."""
    aspect = target_aspect(n)
    grid = widths()
    fits: dict[int, tuple[int, int] | None] = {}

    def fit(i: int) -> tuple[int, int] | None:
        """(layers, parameters) nearest n at width grid[i]; None if even 1 layer is too big."""
        if i not in fits:
            one = params_of(model_config(family, grid[i], 1, vocab, seq_len))
            per_layer = params_of(model_config(family, grid[i], 2, vocab, seq_len)) - one
            layers = max(1, round((n - one) / per_layer) + 1)
            fits[i] = None if one > n * (1 + TOLERANCE) else (
                layers, one + (layers - 1) * per_layer)
        return fits[i]

    def too_wide(i: int) -> bool:  # wider means fewer layers: the aspect ratio only grows
        f = fit(i)
        return f is None or grid[i] / f[0] >= aspect

    lo, hi = 0, len(grid)  # binary search: the first width at or past the target aspect ratio
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if too_wide(mid) else (mid + 1, hi)
    best: tuple[float, Shape] | None = None
    for i in range(max(0, lo - 3), min(len(grid), lo + 4)):
        f = fit(i)
        if f is None or abs(f[1] / n - 1) > TOLERANCE or not MIN_ASPECT <= grid[i] / f[0] <= \
                MAX_ASPECT:
            continue
        layers, params = f
        score = abs(math.log(grid[i] / layers / aspect)) + 4 * abs(math.log(params / n))
        if best is None or score < best[0]:
            best = (score, Shape(model_config(family, grid[i], layers, vocab, seq_len), params, n))
    if best is None:
        smallest = params_of(model_config(family, grid[0], 1, vocab, seq_len))
        raise UserError(
            f"the budget is too small for any {family} model with a {vocab}-token vocabulary: "
            f"the law's optimum is {n:,.0f} parameters, and no shape within 10% of it has "
            f"hidden/layers in {MIN_ASPECT}..{MAX_ASPECT} (hidden 64 with 1 layer alone has "
            f"{smallest:,}); raise the budget (--flops, or --devices/--days) or lower --vocab")
    return best[1]


def closest_preset(family: str, params: int, models_dir: Path) -> tuple[str, int] | None:
    """(preset file name, its parameters) of the family's preset nearest `params` in log."""
    found = []
    for path in sorted(models_dir.glob(f"{PRESET_PREFIX[family]}*.yaml")):
        found.append((path.name, params_of(load_config(str(path), []).model)))
    if not found:
        return None
    return min(found, key=lambda p: abs(math.log(p[1] / params)))
