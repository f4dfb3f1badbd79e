"""Context parallelism (mesh.sequence): the zig-zag all-gather attention equals the reference
attention in values and gradients; sharded training equals one device; bad lengths refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bignlp_jax.config import MeshConfig
from bignlp_jax.errors import UserError
from bignlp_jax.model.attention import dot_product_attention
from bignlp_jax.model.context_attention import context_attention, zigzag_order
from bignlp_jax.parallel.mesh import build_mesh
from bignlp_jax.parallel.rules import activation_sharding, rules_table

RTOL = 2e-5  # float32, as the sharded-training tests; never loosened


def packed_inputs(B=2, T=24, K=2, G=3, H=8, packed=True, seed=0):
    """q/k/v and, per row, several documents (positions restart) and trailing padding."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, K, G, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, K, H)).astype(np.float32) for _ in range(2))
    seg = np.ones((B, T), np.int32)
    if packed:
        seg[0] = np.repeat([1, 2, 3, 0], [5, 9, 7, 3])  # 3 documents + 3 padding slots
        seg[1] = np.repeat([1, 2], [13, 11])
    return q, k, v, seg


def run_attention(mesh_cfg, n, q, k, v, seg):
    """out and grads of sum(out * w) over real tokens, context parallel when n > 1."""
    B, T = seg.shape
    order = zigzag_order(T, n) if n > 1 else np.arange(T)
    index = np.broadcast_to(order, (B, T)).astype(np.int32)
    w = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    real = (seg != 0)[..., None, None, None]
    mesh = build_mesh(mesh_cfg, jax.devices()[: mesh_cfg.data * mesh_cfg.sequence
                                              * mesh_cfg.tensor])

    def loss(q, k, v, seg, index, w):
        with activation_sharding(mesh, rules_table("default")):
            attend = context_attention if n > 1 else dot_product_attention
            out = attend(q, k, v, seg, seg, index, index, 0.3, self_attention=True)
        return jnp.sum(jnp.where(real[:, order], out * w, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q[:, order], k[:, order], v[:, order], seg[:, order], index, w[:, order])
    back = np.argsort(order)  # to slot order
    return [np.asarray(x)[:, back] for x in (out, *grads)]


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_context_attention_equals_reference(packed):
    q, k, v, seg = packed_inputs(packed=packed)
    want = run_attention(MeshConfig(data=1), 1, q, k, v, seg)
    # sequence 4 with GQA heads split over tensor 2 (8 devices)
    got = run_attention(MeshConfig(data=1, sequence=4, tensor=2), 4, q, k, v, seg)
    real = seg != 0
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        np.testing.assert_allclose(g[real], w[real], rtol=RTOL, atol=1e-6, err_msg=name)
        assert np.all(g[~real] == 0) if name == "out" else True


def test_zigzag_order_balances_causal_work():
    order = zigzag_order(16, 4).reshape(4, 4)  # device i's slots
    assert sorted(order.ravel()) == list(range(16))
    # the visible keys (causal) per device are equal
    assert len({int(np.sum(row + 1)) for row in order}) == 1


def test_length_not_divisible_is_refused(tmp_path):
    from helpers import tiny_config

    # one rule, one message (config/schema.py): on the config and on the arrays
    message = r"data.seq_len=20 is not a multiple of 2 x mesh.sequence = 2 x 4 = 8 \(context"
    with pytest.raises(UserError, match=message):
        tiny_config(tmp_path, "data.seq_len=20", "mesh.sequence=4")
    with pytest.raises(UserError, match=message):
        zigzag_order(20, 4)
    q, k, v, seg = packed_inputs(T=24, packed=False)
    q, k, v, seg = q[:, :20], k[:, :20], v[:, :20], seg[:, :20]
    index = np.broadcast_to(np.arange(20, dtype=np.int32), seg.shape)
    mesh = build_mesh(MeshConfig(data=2, sequence=4))
    with activation_sharding(mesh, rules_table("default")), pytest.raises(
            UserError, match=message):
        context_attention(q, k, v, seg, seg, index, index, 0.3)


# --- the model's loss and gradients ------------------------------------------------------------
GQA = ("model.num_heads=8", "model.num_kv_heads=4", "data.seq_len=32")


def packed_batch(step: int, B=8, T=32, vocab=128):
    """Rows of several documents (positions restart, own segment ids) and trailing padding."""
    rng = np.random.default_rng(step)
    tokens = rng.integers(1, vocab, (B, T + 1)).astype(np.int32)
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for r in range(B):
        at, doc = 0, 1
        for length in rng.integers(3, 13, 6):
            length = min(int(length), T - 2 - at)  # leave >= 2 padding slots
            if length <= 0:
                break
            seg[r, at:at + length], pos[r, at:at + length] = doc, np.arange(length)
            at, doc = at + length, doc + 1
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
            "segment_ids": seg, "loss_mask": (seg != 0).astype(np.float32)}


def loss_and_grads(cfg, devices):
    """Mean loss and its gradients for one packed batch, on `devices` laid out as `cfg.mesh`
    says (one compile: the same loss_sums the train step differentiates)."""
    from bignlp_jax.model import init_params
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.step import loss_sums

    trainer = Trainer.build(cfg, devices)
    params = init_params(cfg.model, jax.random.key(0), trainer.state_sh.params)

    def grads(params, batch):
        with activation_sharding(trainer.mesh, rules_table(cfg.mesh.rules)):
            (s, c), g = jax.value_and_grad(loss_sums, has_aux=True)(params, batch, cfg)
        return s / c, jax.tree.map(lambda x: x / c, g)

    return jax.device_get(jax.jit(grads)(params, trainer.device_batch(packed_batch(0))))


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    from helpers import tiny_config

    cfg = tiny_config(tmp_path_factory.mktemp("one"), "mesh.data=1", *GQA, llama=True)
    return loss_and_grads(cfg, jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 1, 4, 1), (1, 2, 2, 2)], ids=["d2s4", "f2s2t2"])
def test_context_parallel_loss_and_gradients_match_one_device(tmp_path, one_device, mesh):
    from helpers import tiny_config

    d, f, s, t = mesh
    cfg = tiny_config(tmp_path, f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.sequence={s}",
                      f"mesh.tensor={t}", *GQA, llama=True)
    loss, grads = loss_and_grads(cfg, jax.devices())
    want_loss, want_grads = one_device
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        w = want_grads
        for p in path:
            w = w[p.key]
        err = np.linalg.norm(np.asarray(g) - w) / np.linalg.norm(w)
        assert err <= RTOL, (jax.tree_util.keystr(path), err)


@pytest.mark.slow
def test_forward_in_slot_order_under_context_parallelism(tmp_path):
    """A caller that does not permute (scoring, evaluation) gets slot-order logits equal to
    one device's."""
    from helpers import tiny_config

    from bignlp_jax.model import forward, init_params

    cfg = tiny_config(tmp_path, "mesh.data=2", "mesh.sequence=4", *GQA, llama=True)
    params = init_params(cfg.model, jax.random.key(0))
    batch = packed_batch(0)
    want = jax.jit(lambda p, b: forward(cfg.model, p, b["tokens"], b["positions"],
                                        b["segment_ids"])[0])(params, batch)
    mesh = build_mesh(cfg.mesh)

    def sharded(p, b):
        with activation_sharding(mesh, rules_table("default")):
            return forward(cfg.model, p, b["tokens"], b["positions"], b["segment_ids"])[0]

    got = jax.jit(sharded)(params, batch)
    real = batch["segment_ids"] != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=RTOL,
                               atol=1e-5)
