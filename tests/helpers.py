"""Small shared builders for tests (configs that do not depend on preset files changing)."""

from __future__ import annotations

from bignlp_jax.config import Config, load_config

# A tiny model with shapes that divide every test mesh (tensor up to 4, fsdp up to 8).
TINY_MODEL = [
    "model.vocab_size=128", "model.num_layers=2", "model.hidden=32", "model.num_heads=4",
    "model.mlp_dim=64", "model.max_seq_len=64",
]


def tiny_config(tmp_path, *overrides: str, llama: bool = False) -> Config:
    base = [
        f"run.dir={tmp_path}/run", "data.source=synthetic", "data.seq_len=16",
        "train.global_batch_size=8", "train.steps=3", "train.log_every=1",
        "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        *TINY_MODEL,
    ]
    if llama:
        base += ["model.family=llama", "model.norm=rmsnorm", "model.position=rope",
                 "model.mlp=swiglu", "model.use_bias=false", "model.tie_embeddings=false",
                 "model.num_kv_heads=2"]
    return load_config(None, [*base, *overrides])
