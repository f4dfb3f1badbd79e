"""Kernel selection, and every optimised kernel against its reference (values and gradients);
the whole model's loss and gradients on the reference kernels, on CPU's `auto` choice and on the
GPU/TPU choice, so the code accelerators run is exercised by CPU CI. The attention kernels are
compared op by op in test_attention.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from bignlp_jax.model import REFERENCE, Kernels, forward, init_params, select_kernels
from bignlp_jax.model.kernels import AUTO, OPS
from bignlp_jax.model.loss import token_cross_entropy
from bignlp_jax.model.matmul import project


def test_auto_resolves_by_platform_and_overrides_win(tmp_path):
    cfg = tiny_config(tmp_path).model
    assert select_kernels(cfg, "cpu") == Kernels(**AUTO["cpu"])
    assert select_kernels(cfg, "gpu") == REFERENCE  # nothing measured to pay there yet
    assert select_kernels(cfg, "tpu") == REFERENCE
    ref = cfg.model_copy(update={"kernels": "reference"})
    assert select_kernels(ref, "cpu") == REFERENCE
    one = ref.model_copy(update={"kernel_attention": "blocked"})
    assert select_kernels(one, "gpu") == dataclasses.replace(REFERENCE, attention="blocked")
    cudnn = cfg.model_copy(update={"kernel_attention": "cudnn"})
    assert select_kernels(cudnn, "gpu").attention == "cudnn"
    assert select_kernels(cudnn, "cpu").attention == "cudnn"  # asked for by name: no silent swap


def test_one_attention_knob_and_bad_kernels_are_config_errors(tmp_path):
    from bignlp_jax.config import load_config
    from bignlp_jax.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "model.attention=cudnn")
    assert str(err.value) == ("invalid config:\n  model.attention=cudnn is no longer a key; fix: "
                              "model.kernel_attention=cudnn (the one attention knob)")
    # the old default selected nothing: stored configs of earlier runs still load
    assert load_config("tiny", ["model.attention=xla"]).model == load_config("tiny").model
    with pytest.raises(ConfigError, match="kernel_projection"):
        tiny_config(tmp_path, "model.kernel_projection=fast")
    with pytest.raises(ValueError, match="unknown attention kernel 'x'"):
        Kernels(attention="x")


@pytest.mark.parametrize("x_shape,w_shape,spec,contract", [
    ((2, 7, 11), (11, 13), "btd,df->btf", 1),  # x [14, 11] narrower than dy [14, 13]
    ((2, 7, 11), (11, 2, 3), "btd,dcf->btcf", 1),  # dy [14, 6] narrower: transposed in bwd
    ((2, 5, 3, 7), (3, 7, 11), "btnh,nhd->btd", 2),
])
@pytest.mark.parametrize("float32_out", [False, True])
def test_cpu_transposed_projection_matches_the_einsum(x_shape, w_shape, spec, contract,
                                                      float32_out):
    rng = np.random.default_rng(contract)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    out_shape = jnp.einsum(spec, x, w).shape
    cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    def loss(kernel, x, w):
        return jnp.sum(project(x, w, spec, kernel, contract, float32_out=float32_out) * cot)

    np.testing.assert_allclose(project(x, w, spec, "cpu_transposed", contract),
                               project(x, w, spec, "reference", contract), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda *a: loss("cpu_transposed", *a), argnums=(0, 1))(x, w)
    want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1))(x, w)
    for name, g, r in zip("xw", got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def packed_batch(B: int, T: int, vocab: int, seed: int = 0) -> dict:
    """Rows with several documents (positions restart), trailing padding and a loss mask."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        bounds = [0, 5 + 2 * b, T - 3 * b - 1, T - 3 * b]  # last slots padding in row b > 0
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[b, lo:hi], pos[b, lo:hi] = doc + 1, np.arange(hi - lo)
    tokens = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    targets = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    return {"tokens": tokens, "targets": targets, "positions": pos, "segment_ids": seg,
            "loss_mask": (seg != 0).astype(np.float32)}


# rows of 256 so the blocked attention kernel skips blocks; prime vocabulary and mlp dims;
# GQA (6 query heads over 2 kv heads, head_dim 10) as in test_export_hf
PRIME_LLAMA = ("model.vocab_size=127", "model.hidden=30", "model.num_heads=6",
               "model.num_kv_heads=2", "model.head_dim=10", "model.mlp_dim=37",
               "model.max_seq_len=256", "data.seq_len=256")


@pytest.mark.slow
def test_whole_model_loss_and_grads_match_on_every_kernel_path(tmp_path):
    # Llama (RoPE, SwiGLU, GQA, untied head) with rows of 256, so the blocked attention kernel
    # skips blocks. GPT's extra ops (biases, GELU, the tied head) have no optimised kernels
    # beyond the projection, tested above.
    T = 256
    cfg = tiny_config(tmp_path, *PRIME_LLAMA, "model.num_layers=1", llama=True).model
    params = init_params(cfg, jax.random.key(0))
    batch = packed_batch(2, T, cfg.vocab_size)

    def loss(params, kernels):
        logits, _ = forward(cfg, params, batch["tokens"], batch["positions"],
                            batch["segment_ids"], kernels=kernels)
        nll = token_cross_entropy(logits, batch["targets"])
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    all_optimised = Kernels(**{op: next(n for n in reversed(names) if n != "cudnn")
                               for op, names in OPS.items()})
    # the backends' auto choices and every non-GPU kernel at once (duplicates compiled once)
    paths = {select_kernels(cfg, "cpu"), select_kernels(cfg, "gpu"), all_optimised} - {REFERENCE}
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want_loss, want_grads = value_and_grad(params, REFERENCE)
    for kernels in paths:
        got_loss, got_grads = value_and_grad(params, kernels)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=str(kernels))
        jax.tree.map(lambda g, w, k=kernels: np.testing.assert_allclose(g, w, rtol=1e-4,
                                                                        atol=2e-6, err_msg=str(k)),
                     got_grads, want_grads)


def test_layers_never_ask_for_the_backend():
    """Kernel choice is `select_kernels`'s job, once per model build; a backend check inside a
    layer would be a kernel selection in disguise (the one platform lookup is model_kernels)."""
    from pathlib import Path

    import bignlp_jax.model

    model_dir = Path(bignlp_jax.model.__file__).parent
    for path in model_dir.glob("*.py"):
        text = path.read_text()
        assert "default_backend" not in text, path.name
        assert (".platform" in text) == (path.name == "functional.py"), path.name
