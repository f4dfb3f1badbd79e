"""LoRA: adapters beside their projections, merging, frozen base and adapter-only optimizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bignlp_jax.config import load_config
from bignlp_jax.errors import UserError
from bignlp_jax.model import forward, init_params
from bignlp_jax.model.lora import LoraSpec, init_adapters, merge
from tests.helpers import tiny_config

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _tokens():
    return jax.random.randint(jax.random.key(3), (2, 12), 0, 128)


@pytest.mark.slow
@pytest.mark.parametrize("llama", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_zero_b_gives_base_logits_and_merge_matches(tmp_path, llama):
    cfg = tiny_config(tmp_path, llama=llama).model
    targets = ALL if llama else ("q", "k", "v", "o", "up", "down")
    spec = LoraSpec(rank=4, scale=2.0, dropout=0.0, targets=targets)
    base = init_params(cfg, jax.random.key(0))
    adapters = init_adapters(cfg, spec, jax.random.key(1))
    tokens = _tokens()
    plain = jax.jit(lambda p, t: forward(cfg, p, t)[0])
    with_lora = jax.jit(lambda p, t: forward(cfg, p, t, lora=spec)[0])
    want = plain(base, tokens)
    got = with_lora({**base, "lora": adapters}, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # B = 0: exactly the base

    # non-zero B: the adapters change the output, and folding them into the weights
    # (W + scale * A @ B per target slice) gives the same logits
    keys = iter(jax.random.split(jax.random.key(2), 16))
    adapters = {t: {"a": p["a"], "b": 0.05 * jax.random.normal(next(keys), p["b"].shape)}
                for t, p in adapters.items()}
    lora_logits = with_lora({**base, "lora": adapters}, tokens)
    merged_logits = plain(merge(cfg, spec, {**base, "lora": adapters}), tokens)
    assert float(jnp.max(jnp.abs(lora_logits - want))) > 1e-3
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(lora_logits),
                               atol=2e-5, rtol=2e-5)


def test_each_target_moves_only_its_slice(tmp_path):
    """An adapter on k changes only the key slice of the fused QKV weight after merging."""
    cfg = tiny_config(tmp_path, llama=True).model
    spec = LoraSpec(rank=2, scale=1.0, dropout=0.0, targets=("k",))
    base = init_params(cfg, jax.random.key(0))
    ad = init_adapters(cfg, spec, jax.random.key(1))
    ad["k"]["b"] = jnp.ones_like(ad["k"]["b"])
    merged = merge(cfg, spec, {**base, "lora": ad})
    diff = np.asarray(merged["blocks"]["attn"]["qkv"] - base["blocks"]["attn"]["qkv"])
    G = cfg.num_heads // cfg.kv_heads
    changed = np.abs(diff).sum(axis=(0, 1, 2, 4)) > 0  # per slot of the G+2 axis
    assert changed.tolist() == [False] * G + [True, False]
    expected = np.einsum("ldr,lrkh->ldkh", ad["k"]["a"], ad["k"]["b"])
    np.testing.assert_allclose(diff[:, :, :, G], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, needle", [
    (["lora.rank=4", "lora.targets=[q,x]"], "lora.targets has unknown 'x'"),
    (["lora.rank=0", "lora.alpha=8"], "lora.rank=0 (off) but lora.alpha is set"),
    (["lora.rank=-2"], "lora.rank=-2 is negative"),
    (["lora.rank=4"], "lora.rank > 0 needs init_from"),
])
def test_bad_lora_config_is_one_line(tmp_path, overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(None, [f"run.dir={tmp_path}", *overrides])
    assert needle in str(e.value)


# -- training: frozen base, adapter-only optimizer state, exact resume -------------------------
def _lora_cfg(tmp_path, pre, *overrides):
    return tiny_config(tmp_path, f"init_from={pre}", "lora.rank=4", "lora.dropout=0.1",
                       "lora.targets=[q,v,down]", *overrides, llama=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' tiny Llama: a fresh state from seed 7, saved as its final checkpoint."""
    from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
    from bignlp_jax.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_config(tmp, "run.seed=7", llama=True)
    trainer = Trainer.build(cfg)
    state = trainer.layout.fresh()
    checkpointer = RunCheckpointer(cfg.run.dir, cfg.checkpoint)
    checkpointer.save(cfg.train.steps, state, {}, step_meta(cfg, trainer.mesh, cfg.train.steps))
    checkpointer.close()
    return cfg.run.dir, jax.device_get(state.params)


def test_lora_trains_adapters_only(tmp_path, pretrained):
    from bignlp_jax.data import make_source
    from bignlp_jax.train.loop import Trainer
    from bignlp_jax.train.start import start_state

    pre, base = pretrained
    cfg = _lora_cfg(tmp_path, pre)
    trainer = Trainer.build(cfg)
    source = make_source(cfg, "train", trainer.rows)
    state = start_state(cfg, trainer.layout, source, cfg.run.dir).state
    adapters = state.params["lora"]
    # optimizer state only for the adapters: AdamW's two moments per adapter leaf (6), and
    # the scalar step counts; none of the base model's 14 matrices and vectors
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(jax.tree.leaves(adapters)) == 6 and len(moments) == 12
    assert sorted(x.shape for x in moments) == sorted(
        2 * [x.shape for x in jax.tree.leaves(adapters)])
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(source)))
    params = jax.device_get(state.params)
    frozen = {k: v for k, v in params.items() if k != "lora"}
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), frozen, base)
    assert all(jax.tree.leaves(same))  # the base is bitwise unchanged
    assert all(float(np.abs(p["b"]).max()) > 0 for p in params["lora"].values())  # B trained
    assert np.isfinite(float(metrics["loss"]))


# -- export: merged Hugging Face weights and a peft adapter, checked with peft itself ----------
@pytest.mark.slow
@pytest.mark.required
def test_peft_adapter_golden(tmp_path):
    """Our peft export loaded by `peft.PeftModel.from_pretrained` on our HF export of the base
    gives our LoRA logits (the golden tolerance of test_export_hf) and the same greedy tokens;
    the merged HF export equals the base + scale * A @ B (same logits)."""
    pytest.importorskip("peft")
    from peft import PeftModel

    from bignlp_jax.config import LoraConfig
    from bignlp_jax.export.peft import export_peft
    from bignlp_jax.hf.weights import export_hf
    from bignlp_jax.infer.generate import generate
    from tests.test_export_hf import (
        VARIANTS,
        assert_logits_close,
        hf_logits,
        load_hf,
        random_params,
        tokens_for,
    )

    cfg = VARIANTS["llama_gqa"]
    lora_cfg = LoraConfig(rank=3, alpha=6.0, targets=list(ALL))
    spec = LoraSpec.from_config(lora_cfg)
    base = random_params(cfg)
    rng = np.random.default_rng(1)
    adapters = {t: {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                    for k, v in p.items()}
                for t, p in init_adapters(cfg, spec, jax.random.key(0)).items()}
    export_hf(base, cfg, tmp_path / "base")
    export_peft(adapters, cfg, lora_cfg, tmp_path / "adapter")
    model = PeftModel.from_pretrained(load_hf(tmp_path / "base"), str(tmp_path / "adapter"))
    model.eval()
    tokens = tokens_for(cfg)
    ours = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t, lora=spec)[0])(
        {**base, "lora": adapters}, tokens))
    theirs = hf_logits(model, tokens)
    assert_logits_close(ours, theirs)
    assert float(np.abs(theirs - hf_logits(load_hf(tmp_path / "base"), tokens)).max()) > 0.1

    merged = jax.device_get(jax.jit(merge, static_argnums=(0, 1))(
        cfg, spec, {**base, "lora": adapters}))
    export_hf(merged, cfg, tmp_path / "merged")
    assert_logits_close(hf_logits(load_hf(tmp_path / "merged"), tokens), theirs)

    prompts = [[5, 17, 250, 9, 33], [42, 7]]
    our_new = generate(cfg, merged, prompts, max_new_tokens=12)
    torch = pytest.importorskip("torch")
    for prompt, new in zip(prompts, our_new):
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert out[0, len(prompt):].tolist() == new


@pytest.mark.slow
def test_lora_resume_is_exact_and_exports(tmp_path, pretrained):
    """A LoRA run stopped at step 2 and resumed matches an uninterrupted one bitwise (dropout
    on); the run exports merged weights and a peft adapter, and refuses an unmerged export."""
    import argparse

    from bignlp_jax.checkpoint import load_params
    from bignlp_jax.export.commands import cmd_export
    from bignlp_jax.train.loop import train
    from bignlp_jax.train.metrics import read_metrics

    pre, base = pretrained
    straight = _lora_cfg(tmp_path / "a", pre, "train.steps=4")
    train(straight)
    train(_lora_cfg(tmp_path / "b", pre, "train.steps=2"))
    resumed = _lora_cfg(tmp_path / "b", pre, "train.steps=4")
    train(resumed)
    losses = [{r["step"]: r["loss"] for r in read_metrics(c.run.dir)} for c in (straight, resumed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]
    a, b = (load_params(c.run.dir, c.model, lora=c.lora, merged=False) for c in (straight, resumed))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
    frozen = {k: v for k, v in jax.device_get(a).items() if k != "lora"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, frozen, base)))

    def export(fmt, out, merge=False):
        return cmd_export(argparse.Namespace(run=str(straight.run.dir), step=None, format=fmt,
                                             out=str(tmp_path / out), dtype="float32",
                                             max_shard_size="5GB", merge=merge,
                                             overwrite=False, tokenizer=None))

    with pytest.raises(UserError, match="is a LoRA run"):
        export("hf", "unmerged")
    export("hf", "merged", merge=True)
    export("peft", "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "target_modules"] == ["down_proj", "q_proj", "v_proj"]
    from bignlp_jax.hf.weights import load_hf_params
    from bignlp_jax.infer.generate import generate

    # generate on the run reads the merged weights (what `bignlp-jax generate --run` does)
    folded = load_params(straight.run.dir, straight.model, lora=straight.lora)
    assert "lora" not in folded
    assert len(generate(straight.model, folded, [[1, 5, 9]], max_new_tokens=3)[0]) == 3
    merged = load_hf_params(tmp_path / "merged", straight.model)
    want = jax.device_get(merge(straight.model, LoraSpec.from_config(straight.lora), a))
    assert all(jax.tree.leaves(jax.tree.map(
        lambda x, y: np.allclose(x, y, rtol=1e-6, atol=1e-7), jax.device_get(merged), want)))


def test_pipeline_finetune_stage_with_lora(tmp_path):
    """`lora:` in a pipeline's finetune stage reaches its run config; the from-scratch baseline
    stays full finetuning (adapters need pretrained weights)."""
    from bignlp_jax.pipeline.spec import Pipeline

    p = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", "finetune.lora.rank=4",
                                         "finetune.lora.targets=[q,v,o]"])
    ft, scratch = p.run_config("finetune"), p.run_config("finetune_scratch")
    assert ft.lora.rank == 4 and ft.lora.targets == ["q", "v", "o"]
    assert ft.init_from == str(tmp_path / "pretrain")
    assert scratch.lora.rank == 0 and scratch.init_from is None


def test_adapters_shard_like_their_layers(tmp_path):
    """On a fsdp x tensor mesh each adapter axis is split exactly as the same axis of the
    weight it adapts; the rank axis is never split."""
    from bignlp_jax.parallel.mesh import build_mesh
    from bignlp_jax.parallel.rules import rules_table
    from bignlp_jax.train.optimizer import make_optimizer
    from bignlp_jax.train.state import state_shardings

    cfg = tiny_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", llama=True)
    spec = LoraSpec(rank=4, scale=1.0, dropout=0.0, targets=ALL)
    sh = state_shardings(cfg.model, make_optimizer(cfg.optimizer, 3), build_mesh(cfg.mesh),
                         rules_table(cfg.mesh.rules), spec).params
    p = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(s.spec) + (None,) * 5
         for path, s in jax.tree_util.tree_flatten_with_path(sh)[0]}  # padded: spec may be short
    qkv, out, wi, wo = (p[f"blocks/{n}"] for n in ("attn/qkv", "attn/out", "mlp/wi", "mlp/wo"))
    assert p["lora/q/a"][:3] == (qkv[0], qkv[1], None)  # layers, embed, rank
    assert p["lora/q/b"][:5] == (qkv[0], None, qkv[2], None, qkv[4])  # kv_heads, head_dim
    assert p["lora/o/a"][:4] == (out[0], out[1], out[2], None)
    assert p["lora/gate/b"][:3] == (wi[0], None, wi[3])  # mlp
    assert p["lora/down/a"][:3] == (wo[0], wo[1], None) and p["lora/down/b"][2] == wo[2]
    assert any(x is not None for x in p["lora/q/b"])  # the mesh really splits something
