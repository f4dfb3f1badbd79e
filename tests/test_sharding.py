"""Sharded training equals single-device training; parameters are laid out as the rules say."""

import jax
import numpy as np
import pytest
from helpers import tiny_config
from jax.sharding import PartitionSpec as P

from bignlp_jax.config import MeshConfig
from bignlp_jax.errors import UserError
from bignlp_jax.parallel.mesh import mesh_shape
from bignlp_jax.train.loop import Trainer

# GQA with 4 kv heads (2 query heads each) so tensor=4 splits kv heads evenly.
GQA = ("model.num_heads=8", "model.num_kv_heads=4")
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Different device counts reorder float32 reductions (gradient all-reduce, sharded matmuls), so
# losses agree to float32 rounding accumulated over a few steps, not bitwise.
LOSS_RTOL = 2e-5


def run_losses(cfg, devices, steps=3):
    trainer = Trainer.build(cfg, devices)
    state = trainer.layout.fresh()
    from bignlp_jax.data import make_source

    source = make_source(cfg, "train", trainer.rows)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(source)))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), "mesh.data=1", *GQA, llama=True)
    return run_losses(cfg, jax.devices()[:1])


# one mesh in the fast tier, every mesh in the full suite
@pytest.mark.parametrize("mesh", [m if m == (2, 2, 2) else pytest.param(m, marks=pytest.mark.slow)
                                  for m in MESHES], ids=lambda m: "x".join(map(str, m)))
def test_sharded_losses_match_single_device(tmp_path, reference, mesh):
    d, f, t = mesh
    cfg = tiny_config(tmp_path, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", *GQA,
                      llama=True)
    losses, state = run_losses(cfg, jax.devices())
    np.testing.assert_allclose(losses, reference[0], rtol=LOSS_RTOL)
    assert losses[-1] < losses[0]  # and it is actually training

    # parameters live where the default rules put them
    params = state.params
    qkv = params["blocks"]["attn"]["qkv"]  # [layers, embed, kv_heads, G+2, head_dim]
    assert qkv.sharding.spec == P("stage", "fsdp", "tensor", None, None)
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"]["mlp"]["wo"].sharding.spec == P("stage", "tensor", "fsdp")
    assert params["final_norm"]["scale"].sharding.spec == P(None)
    # and really are split: each device holds 1/(fsdp*tensor) of the qkv weight
    shard = qkv.addressable_shards[0].data
    assert shard.size * f * t == qkv.size
    # optimizer moments follow their parameter
    mu = state.opt_state[1][0].mu["blocks"]["attn"]["qkv"]
    assert mu.sharding.spec == qkv.sharding.spec


def test_mesh_must_fit_devices():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (1, 2, 2, 1, 2)
    with pytest.raises(UserError, match=r"= 6 devices, but 8 are available"):
        mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(UserError, match="does not divide the 8 available"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)


def test_dcn_splits_are_checked():
    from bignlp_jax.parallel.mesh import build_mesh

    with pytest.raises(UserError, match=r"mesh.dcn_fsdp=2 does not divide mesh.fsdp=1"):
        mesh_shape(MeshConfig(data=8, dcn_fsdp=2), 8)
    # one process is one granule: a DCN split of 2 cannot be laid out
    with pytest.raises(UserError, match=r"= 2 must equal the number of processes \(1\)"):
        build_mesh(MeshConfig(data=8, dcn_data=2))


def test_indivisible_parameter_is_named(tmp_path):
    cfg = tiny_config(tmp_path, "mesh.data=1", "mesh.tensor=8", "model.vocab_size=100")
    with pytest.raises(UserError, match=r"parameter .* \('.*', size .*\) cannot be split"):
        Trainer.build(cfg, jax.devices())


# compiles the blocked kernel on a 2 x 4 mesh (~7 s); test_attention.py covers it on one device
@pytest.mark.slow
def test_blocked_causal_attention_sharded_matches_single_device(tmp_path):
    """Rows of 256 take the causal block-skipping path; heads split over tensor=4."""
    long_rows = ("data.seq_len=256", "model.max_seq_len=256", *GQA)
    one = tiny_config(tmp_path / "one", "mesh.data=1", *long_rows, llama=True)
    many = tiny_config(tmp_path / "many", "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4",
                       *long_rows, llama=True)
    want, _ = run_losses(one, jax.devices()[:1], steps=2)
    got, _ = run_losses(many, jax.devices(), steps=2)
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
