"""Which Hugging Face architecture matches a model config exactly, and `config.json` both ways.

`family: llama` maps to `LlamaForCausalLM` and `family: gpt` to `GPT2LMHeadModel` (learned
positions, LayerNorm, tanh GELU = `gelu_new`, biases). A config that the architecture cannot
express exactly (so the exported model would compute something else) is refused, naming the
config field. Importing reads `config.json` without transformers and refuses what our model
cannot compute (other architectures, activations, RoPE scaling...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bignlp_jax.config import ModelConfig
from bignlp_jax.containment import contained
from bignlp_jax.errors import UserError

LLAMA, GPT2 = "LlamaForCausalLM", "GPT2LMHeadModel"
ARCHITECTURES = {"llama": LLAMA, "gpt": GPT2}
MODEL_TYPES = {LLAMA: "llama", GPT2: "gpt2"}
# What each architecture hard-wires, as (field, required value, why).
REQUIRED: dict[str, list[tuple[str, object, str]]] = {
    LLAMA: [("position", "rope", "Llama uses rotary positions"),
            ("norm", "rmsnorm", "Llama uses RMSNorm"),
            ("mlp", "swiglu", "Llama uses a SwiGLU MLP")],
    GPT2: [("position", "learned", "GPT-2 uses learned positions"),
           ("norm", "layernorm", "GPT-2 uses LayerNorm"),
           ("mlp", "gelu", "GPT-2 uses a GELU MLP"),
           ("use_bias", True, "GPT-2 has biases in every projection and norm")],
}
# The tanh approximation of GELU under the names transformers gives it.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
TORCH_DTYPES = ("float32", "bfloat16", "float16")


def architecture_of(cfg: ModelConfig) -> str:
    """The transformers class that computes exactly what `cfg` does, or a UserError why not."""
    arch = ARCHITECTURES[cfg.family]
    problems = [f"model.{field}={getattr(cfg, field)!r} (needs {want!r}: {why})"
                for field, want, why in REQUIRED[arch] if getattr(cfg, field) != want]
    if arch == GPT2:
        if cfg.kv_heads != cfg.num_heads:
            problems.append(f"model.num_kv_heads={cfg.num_kv_heads} (GPT-2 has no grouped-query "
                            "attention: needs num_kv_heads = num_heads or unset)")
        if cfg.dim_per_head * cfg.num_heads != cfg.hidden:
            problems.append(f"model.head_dim={cfg.dim_per_head} (GPT-2 needs head_dim * "
                            f"num_heads = hidden = {cfg.hidden}, got "
                            f"{cfg.dim_per_head * cfg.num_heads})")
    elif cfg.hidden % cfg.num_heads:
        problems.append(f"model.hidden={cfg.hidden} (transformers' LlamaConfig requires hidden "
                        f"to be a multiple of num_heads={cfg.num_heads})")
    if problems:
        raise UserError(
            f"model {cfg.name!r} (family {cfg.family}) has no exact {arch} equivalent:\n  "
            + "\n  ".join(problems)
            + "\n  fix: export with `--format params` (our own layout) instead"
        )
    return arch


def to_hf_config(cfg: ModelConfig, dtype: str, special_ids: dict[str, int | None]) -> dict:
    """config.json for `cfg` (dropout 0: we train without it; `dtype` as saved)."""
    arch = architecture_of(cfg)
    ids = {f"{k}_token_id": special_ids.get(k) for k in ("bos", "eos", "pad")}
    common = {"architectures": [arch], "model_type": MODEL_TYPES[arch],
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "dtype": dtype, "torch_dtype": dtype,
              "use_cache": True, **ids}
    if arch == GPT2:
        return {**common, "n_embd": cfg.hidden, "n_layer": cfg.num_layers,
                "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_seq_len,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    return {**common, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "intermediate_size": cfg.mlp_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta,
            "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias,
            "attention_dropout": 0.0, "pretraining_tp": 1}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = contained(hf_dir, "config.json")
    if not path.is_file():
        raise UserError(f"no config.json in {hf_dir}: expected a Hugging Face model directory "
                        "(save_pretrained output)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def hf_architecture(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    by_type = {v: k for k, v in MODEL_TYPES.items()}
    arch = archs[0] if archs else by_type.get(hf.get("model_type", ""))
    if arch not in MODEL_TYPES or hf.get("model_type", MODEL_TYPES[arch]) != MODEL_TYPES[arch]:
        raise UserError(
            f"{where}: unsupported architecture {arch or '(none)'} (model_type "
            f"{hf.get('model_type')!r}); supported: {', '.join(MODEL_TYPES)}"
        )
    return arch


def _refuse(where: str, key: str, value: Any, why: str) -> None:
    raise UserError(f"{where}: {key}={value!r} is not supported ({why})")


def _dtype(hf: dict) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in TORCH_DTYPES else "float32"


def hf_model_config(hf_dir: str | Path) -> ModelConfig:
    """Our ModelConfig for a local Hugging Face model directory (refuses what we cannot compute).

    Missing keys take transformers' own defaults for the architecture."""
    hf = read_hf_config(hf_dir)
    where = f"{Path(hf_dir) / 'config.json'}"
    arch = hf_architecture(hf, where)
    name = Path(hf_dir).resolve().name
    if arch == GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in TANH_GELU:
            _refuse(where, "activation_function", act, f"our GELU MLP is {' = '.join(TANH_GELU)}")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if hf.get(key, want) != want:
                _refuse(where, key, hf[key], f"our attention needs {key}={want}")
        hidden = hf.get("n_embd", 768)
        return ModelConfig(
            name=name, family="gpt", vocab_size=hf.get("vocab_size", 50257),
            num_layers=hf.get("n_layer", 12), hidden=hidden, num_heads=hf.get("n_head", 12),
            mlp_dim=hf.get("n_inner") or 4 * hidden, mlp="gelu", norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
            max_seq_len=hf.get("n_positions", 1024), use_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02), dtype=_dtype(hf),
        )
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", hf["hidden_act"], "our SwiGLU MLP uses silu")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or hf.get("rope_scaling"):
        _refuse(where, "rope_parameters/rope_scaling", hf.get("rope_scaling") or rope,
                "only plain RoPE (rope_type default) is implemented")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        _refuse(where, "attention_bias/mlp_bias", (attention_bias, mlp_bias),
                "our model.use_bias turns both on or off together")
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelConfig(
        name=name, family="llama", vocab_size=hf.get("vocab_size", 32000),
        num_layers=hf.get("num_hidden_layers", 32), hidden=hidden, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim == hidden // heads else head_dim,
        mlp_dim=hf.get("intermediate_size", 11008), mlp="swiglu", norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope",
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        max_seq_len=hf.get("max_position_embeddings", 2048), use_bias=bool(attention_bias),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02), dtype=_dtype(hf),
    )


# Fields that decide the parameter shapes or the numbers the model computes.
_MUST_MATCH = ("family", "vocab_size", "num_layers", "hidden", "num_heads", "kv_heads",
               "dim_per_head", "mlp_dim", "mlp", "norm", "norm_eps", "position", "use_bias",
               "tie_embeddings")


def check_matches(hf_cfg: ModelConfig, cfg: ModelConfig, where: str) -> None:
    """Refuse to load a Hugging Face model into a config with other shapes or numerics."""
    fields = list(_MUST_MATCH)
    if cfg.position == "rope":
        fields.append("rope_theta")
    else:  # learned positions: the table's length is a parameter shape
        fields.append("max_seq_len")
    diffs = [f"model.{f}: {where} has {getattr(hf_cfg, f)!r}, the config has {getattr(cfg, f)!r}"
             for f in fields if getattr(hf_cfg, f) != getattr(cfg, f)]
    if diffs:
        raise UserError(
            f"the Hugging Face model {where} does not match the model config:\n  "
            + "\n  ".join(diffs)
            + "\n  fix: set those model fields (`bignlp-jax import` writes a config that matches)"
        )
