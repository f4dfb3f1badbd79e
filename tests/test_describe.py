"""`bignlp-jax describe`: parameter counts and FLOPs without allocating the model."""

import json
from pathlib import Path

import pytest
from conftest import REPO

from bignlp_jax import cli
from bignlp_jax.config import load_config
from bignlp_jax.model.flops import flops_per_token

PRESETS = sorted(p.stem for p in (REPO / "configs" / "models").glob("*.yaml"))


def gpt_param_formula(V, T, L, D):
    """GPT-2/3 layout: embeddings + L * (12 D^2 + 13 D) + final LayerNorm."""
    return V * D + T * D + L * (12 * D * D + 13 * D) + 2 * D


@pytest.mark.parametrize("preset", PRESETS)
def test_describe_every_preset(preset, capsys):
    assert cli.main(["describe", f"models/{preset}.yaml", "--devices", "512",
                     "mesh.data=8", "mesh.fsdp=-1", "mesh.tensor=8"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["parameters"] > 0 and info["flops_per_token"] > 6 * info["parameters"] * 0.5
    assert info["param_bytes_per_device"] <= 4 * info["parameters"] / 8  # split at least 8 ways


def test_gpt3_sizes_match_the_paper():
    small = load_config("models/gpt3_126m.yaml").model
    info_count = gpt_param_formula(50304, 2048, 12, 768)
    from bignlp_jax.model import abstract_params, count_params

    assert count_params(abstract_params(small)) == info_count  # 125.3M ("125M" in the paper)
    big = load_config("models/gpt3_175b.yaml").model
    assert count_params(abstract_params(big)) == pytest.approx(175e9, rel=0.005)


def test_flops_formula_by_hand():
    cfg = load_config("models/gpt3_126m.yaml").model
    n = gpt_param_formula(50304, 2048, 12, 768) - 2048 * 768  # tied: input table is the head
    assert flops_per_token(cfg, 2048) == 6 * n + 12 * 12 * 12 * 64 * 2048
    llama = load_config("models/llama_126m.yaml").model
    D, L, V, F = 768, 12, 32000, 2048
    per_layer = D * 3 * D + D * D + 3 * D * F + 2 * D  # qkv, out, gate/up/down, two RMSNorms
    n = L * per_layer + D + D * V  # + final norm + untied head (input table excluded)
    assert flops_per_token(llama, 1024) == 6 * n + 12 * L * 12 * 64 * 1024


def test_describe_needs_no_devices_for_175b(capsys):
    # 512-device mesh described on this 8-device process: analytic, nothing allocated
    assert cli.main(["describe", "models/gpt3_175b.yaml", "--devices", "512", "mesh.data=1",
                     "mesh.fsdp=64", "mesh.tensor=8"]) == 0
    out = capsys.readouterr().out
    assert "174,6" in out and "fsdp=64" in out
    assert Path(REPO / "configs/models/gpt3_175b.yaml").exists()


@pytest.mark.parametrize("preset, published", [("llama3_8b", 8_030_261_248),
                                               ("llama3_70b", 70_553_706_496),
                                               ("llama3_405b", 405_853_388_800)])
def test_llama3_presets_have_the_published_parameter_counts(preset, published, capsys):
    # Meta's model cards round these to 8.03B and 70.6B; the exact counts are the sums of the
    # tensors in the released safetensors files.
    assert cli.main(["describe", f"models/{preset}.yaml", "--devices", "8", "mesh.data=-1"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["parameters"] == published
    m = load_config(f"models/{preset}.yaml").model
    assert (m.kv_heads, m.vocab_size, m.rope_theta, m.norm_eps, m.tie_embeddings) == (
        8, 128256, 500000.0, 1e-5, False)


def test_describe_names_the_axes_that_cross_dcn(capsys):
    assert cli.main(["describe", "models/llama3_70b.yaml", "--devices", "256", "mesh.data=-1",
                     "mesh.fsdp=16", "mesh.tensor=8", "mesh.dcn_data=2", "mesh.dcn_fsdp=4"]) == 0
    out = capsys.readouterr().out
    assert "data=2 (2 over DCN) x fsdp=16 (4 over DCN) x sequence=1 x tensor=8" in out
    assert json.loads(out.strip().splitlines()[-1])["dcn"] == {"data": 2, "fsdp": 4}
