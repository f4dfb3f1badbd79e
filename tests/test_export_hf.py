"""Hugging Face export/import, checked against transformers itself (CPU, float32, offline).

Golden: a random model of each supported family, exported, loaded with
`AutoModelForCausalLM.from_pretrained`, gives our logits within 1e-4 of the logit scale, and
greedy generation gives the same 20 tokens. Import of a transformers-made model matches its
logits and exports back to the same tensors. Sharded export equals single-device export.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from required_tests import required_import  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bignlp_jax.config import MeshConfig, ModelConfig  # noqa: E402
from bignlp_jax.hf.layout import hf_layout  # noqa: E402
from bignlp_jax.hf.weights import export_hf, hf_model_config, load_hf_params  # noqa: E402
from bignlp_jax.model import abstract_params, forward, param_shardings  # noqa: E402
from bignlp_jax.parallel.mesh import build_mesh  # noqa: E402
from bignlp_jax.parallel.rules import rules_table  # noqa: E402

torch = required_import("torch")
transformers = required_import("transformers")
pytestmark = pytest.mark.required

TOL = 1e-4  # max |ours - theirs| <= TOL * max |logits|, float32; never loosened
VOCAB = 512
GPT = dict(name="gpt_t", family="gpt", vocab_size=VOCAB, num_layers=2, hidden=24, num_heads=4,
           mlp_dim=40, max_seq_len=64, norm_eps=1e-5, init_std=0.2)
# GQA (6 query heads over 2 kv heads), head_dim 10 != hidden/heads, non-default theta and eps.
LLAMA = dict(name="llama_t", family="llama", vocab_size=VOCAB, num_layers=2, hidden=24,
             num_heads=6, num_kv_heads=2, head_dim=10, mlp_dim=36, mlp="swiglu", norm="rmsnorm",
             norm_eps=1e-6, position="rope", rope_theta=500.0, use_bias=False,
             tie_embeddings=False, max_seq_len=64, init_std=0.2)
VARIANTS = {
    "gpt": ModelConfig(**GPT),
    "gpt_untied": ModelConfig(**{**GPT, "tie_embeddings": False}),
    "llama_gqa": ModelConfig(**LLAMA),
    "llama_mha_bias_tied": ModelConfig(**{**LLAMA, "num_kv_heads": None, "head_dim": None,
                                          "use_bias": True, "tie_embeddings": True}),
}

GENERATE = ("gpt", "llama_gqa")  # greedy generation: one variant per family (it compiles a loop)


def random_params(cfg: ModelConfig, seed: int = 0, shardings=None):
    """Random weights (std init_std) with norms near 1 and non-zero biases, drawn with numpy:
    jax.random would compile a program per shape, which is slow on a busy CPU."""
    rng = np.random.default_rng(seed)

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "scale" in name else 0.0
        std = 0.1 if ("scale" in name or "bias" in name or name.endswith("['bi']")
                      or name.endswith("['bo']")) else cfg.init_std
        return (base + std * rng.standard_normal(spec.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(one, abstract_params(cfg))
    return params if shardings is None else jax.device_put(params, shardings)


def our_logits(cfg, params, tokens) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: forward(cfg, p, t)[0])(params, tokens))


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def assert_logits_close(ours, theirs):
    scale = float(np.abs(theirs).max())
    assert scale > 1.0, "logits ~0: the test would not see a wrong layout"
    diff = float(np.abs(ours - theirs).max())
    assert diff <= TOL * scale, f"max |diff| {diff:.3g} > {TOL} * logit scale {scale:.3g}"


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), output_loading_info=True, dtype=torch.float32)
    # nothing silently left at its random init, nothing ignored
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def tokens_for(cfg, rows=2, length=17, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (rows, length)).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_logits_and_greedy_generation(tmp_path, variant):
    from bignlp_jax.infer.generate import generate

    cfg = VARIANTS[variant]
    params = random_params(cfg)
    # a small shard size on one variant: transformers must load the index + several files
    shard = "8KB" if variant == "llama_gqa" else "5GB"
    export_hf(params, cfg, tmp_path / "hf", max_shard_size=shard)
    if variant == "llama_gqa":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_hf(tmp_path / "hf")
    tokens = tokens_for(cfg)
    assert_logits_close(our_logits(cfg, params, tokens), hf_logits(model, tokens))

    if variant not in GENERATE:
        return
    prompts = [[5, 17, 250, 9, 33], [42, 7]]
    ours = generate(cfg, params, prompts, max_new_tokens=20)
    for prompt, our_new in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == our_new


def _hf_random_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=24, intermediate_size=36, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            initializer_range=0.2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4,
                                         n_positions=64, initializer_range=0.2)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # norms and biases away from 1 and 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_import_transformers_model_then_export_round_trips(tmp_path, kind):
    model = _hf_random_model(kind)
    model.save_pretrained(tmp_path / "hf")
    cfg = hf_model_config(tmp_path / "hf")
    assert cfg.family == ("llama" if kind == "llama" else "gpt")
    params = load_hf_params(tmp_path / "hf", cfg)
    tokens = tokens_for(cfg)
    assert_logits_close(our_logits(cfg, params, tokens), hf_logits(model, tokens))

    export_hf(params, cfg, tmp_path / "back")
    original, back = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_sharded_export_is_byte_identical_to_single_device(tmp_path):
    cfg = VARIANTS["llama_gqa"]
    mesh = build_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    shardings = param_shardings(cfg, mesh, rules_table("default"))
    sharded = random_params(cfg, shardings=shardings)
    assert len(sharded["blocks"]["attn"]["qkv"].sharding.device_set) == 8
    single = jax.device_put(sharded, jax.devices()[0])
    for name, params in (("sharded", sharded), ("single", single)):
        export_hf(params, cfg, tmp_path / name, dtype="bfloat16", max_shard_size="4KB")
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert files == sorted(p.name for p in (tmp_path / "sharded").iterdir())
    for f in files:
        assert (tmp_path / "single" / f).read_bytes() == (tmp_path / "sharded" / f).read_bytes(), f


def test_layout_round_trips_without_loss_for_odd_shapes():
    """to_hf then back is the identity for MQA, GQA and MHA, biases, tied and untied."""
    configs = [ModelConfig(**{**LLAMA, "num_kv_heads": 1, "use_bias": True}),
               ModelConfig(**{**LLAMA, "num_heads": 4, "num_kv_heads": 4, "head_dim": 8}),
               ModelConfig(**{**GPT, "num_heads": 3, "hidden": 21})]
    rng = np.random.RandomState(0)
    for cfg in configs:
        shapes = abstract_params(cfg)
        for entry in hf_layout(cfg):
            spec = shapes
            for key in entry.path:
                spec = spec[key]
            ours = rng.randn(*spec.shape).astype(np.float32)
            one = ours[1] if entry.stacked else ours
            back = np.full_like(one, np.nan)
            for piece in entry.pieces:
                hf = piece.to_hf(one)
                assert hf.shape == piece.shapes(one.shape)[-1]
                piece.into_ours(hf, back)
            assert np.array_equal(back, one), entry.path


@pytest.mark.slow
def test_import_llama3_family_model(tmp_path):
    """A transformers LlamaForCausalLM with Llama 3's settings (8 kv heads shared by 4 query
    heads each, RoPE theta 500000, eps 1e-5, the 128256-token vocabulary, untied) at a small
    width imports into the llama3_8b preset with only the widths changed."""
    from bignlp_jax.cli import main
    from bignlp_jax.config import load_config

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, head_dim=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        initializer_range=0.2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path / "hf")
    assert main(["import", "--format", "hf", "--from", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "run")]) == 0
    preset = load_config("models/llama3_8b.yaml", [
        "model.num_layers=2", "model.hidden=64", "model.head_dim=8", "model.mlp_dim=96",
        "model.dtype=float32"]).model
    params = load_hf_params(tmp_path / "hf", preset)  # refuses any mismatching field
    tokens = tokens_for(preset)
    assert_logits_close(our_logits(preset, params, tokens), hf_logits(model, tokens))
