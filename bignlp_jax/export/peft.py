"""LoRA adapters as a Hugging Face `peft` adapter: adapter_model.safetensors + adapter_config.json.

`peft.PeftModel.from_pretrained(base, DIR)` loads it on top of our `--format hf` export of the
base model. Our adapters sit beside fused weights (QKV [D, K, G+2, H], gate/up [D, 2, F]); peft
has one module per projection, so each target maps to its Llama module: q, k, v, o -> q_proj,
k_proj, v_proj, o_proj; gate, up, down -> gate_proj, up_proj, down_proj. torch Linear stores
[out, in], so lora_A is A^T [r, in] and lora_B is B^T [out, r], with the input and output axes
flattened in the same order as the base weights' export (head n = k * G + g). peft scales by
lora_alpha / r, as we do. Only the Llama architecture: GPT-2's fused Conv1D c_attn has no
per-projection module for peft to adapt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from bignlp_jax.config import LoraConfig, ModelConfig
from bignlp_jax.errors import UserError
from bignlp_jax.hf.weights import check_out_dir, export_dtype, finish_out_dir, prepare_out_dir

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
PREFIX = "base_model.model.model.layers.{i}."


def peft_tensors(adapters: dict[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
    """peft's tensor name -> array for every layer and target of `adapters` (stacked)."""
    np_dtype = export_dtype(dtype)
    out = {}
    for target, pair in adapters.items():
        a, b = np.asarray(jax.device_get(pair["a"])), np.asarray(jax.device_get(pair["b"]))
        L, r = a.shape[0], a.shape[-1]
        for i in range(L):
            name = PREFIX.format(i=i) + MODULES[target]
            lora_a = a[i].reshape(-1, r).T  # [r, in]
            lora_b = b[i].reshape(r, -1).T  # [out, r]
            out[name + ".lora_A.weight"] = np.ascontiguousarray(lora_a.astype(np_dtype))
            out[name + ".lora_B.weight"] = np.ascontiguousarray(lora_b.astype(np_dtype))
    return out


def peft_config(lora: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json: what peft needs to rebuild the LoRA layers."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(MODULES[t].split(".")[1] for t in lora.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": base_model,
    }


def export_peft(adapters: dict[str, Any], model_cfg: ModelConfig, lora: LoraConfig,
                out_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the adapters of a LoRA run as a peft adapter directory; returns its path."""
    if model_cfg.family != "llama":
        raise UserError(f"--format peft needs a Llama model (model.family={model_cfg.family}: "
                        "GPT-2's fused c_attn has no per-projection modules for peft)\n"
                        "  fix: export merged weights with --format hf --merge")
    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    check_out_dir(out_dir, overwrite)
    tensors = peft_tensors(adapters, dtype)
    tmp = prepare_out_dir(out_dir)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(peft_config(lora), indent=2) + "\n")
    finish_out_dir(tmp, out_dir)
    return out_dir
