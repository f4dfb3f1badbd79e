"""`bignlp-jax export` / `import`, params-only bundles, the exported tokenizer, and refusals."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from required_tests import required_import  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_export_hf import (  # noqa: E402
    GPT,
    LLAMA,
    VARIANTS,
    assert_logits_close,
    hf_logits,
    load_hf,
    our_logits,
    random_params,
    tokens_for,
)

from bignlp_jax.checkpoint import load_params, load_run_config  # noqa: E402
from bignlp_jax.cli import main  # noqa: E402
from bignlp_jax.config import Config, DataConfig, ModelConfig, RunConfig  # noqa: E402
from bignlp_jax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from bignlp_jax.errors import UserError  # noqa: E402
from bignlp_jax.export.bundle import save_params_bundle  # noqa: E402
from bignlp_jax.hf.weights import export_hf, hf_model_config, load_hf_params  # noqa: E402

transformers = required_import("transformers")
pytestmark = pytest.mark.required
TOKENIZER_VOCAB = 400  # byte fallback alone needs 256 + specials + the characters seen

SAMPLES = ["def f(x):\n    return x * 2\n", "  two  spaces, tabs\tand 12345 digits <sep> x",
           "ünïcödé 漢字 🙂", " leading space", "trailing  ",
           "import os\n\n\nclass A:\n    pass"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small SentencePiece model trained on this repository's own source."""
    import bignlp_jax

    root = os.path.dirname(bignlp_jax.__file__)
    texts = []
    for sub in ("model", "config"):
        for name in sorted(os.listdir(os.path.join(root, sub))):
            if name.endswith(".py"):
                with open(os.path.join(root, sub, name), encoding="utf-8") as f:
                    texts.append(f.read())
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, out, vocab_size=TOKENIZER_VOCAB)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer_dir):
    """A params-only run of the GPT variant, with its tokenizer, as `export --run` reads it."""
    cfg = VARIANTS["gpt"].model_copy(update={"vocab_size": TOKENIZER_VOCAB})
    path = tmp_path_factory.mktemp("run") / "run"
    params = random_params(cfg)
    run_cfg = Config(model=cfg, data=DataConfig(seq_len=32), run=RunConfig(dir=str(path)))
    save_params_bundle(params, run_cfg, path, step=7, tokenizer=tokenizer_dir)
    return path, cfg, params


def test_cli_export_hf_loads_in_transformers_with_our_tokenizer(tmp_path, run_dir, capsys):
    path, cfg, params = run_dir
    out = tmp_path / "hf"
    assert main(["export", "--run", str(path), "--format", "hf", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 7
    tokens = tokens_for(cfg)
    assert_logits_close(our_logits(cfg, params, tokens), hf_logits(load_hf(out), tokens))

    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    for text in SAMPLES:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs(text).input_ids == [ours.bos_id, *ids]  # documents start with <s>
        assert theirs.decode(ids) == ours.decode(ids) == text
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (
        ours.bos_id, ours.eos_id, ours.pad_id)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id


@pytest.mark.slow
def test_cli_generate_equals_transformers_generate(tmp_path, run_dir, capsys):
    path, cfg, params = run_dir
    out = tmp_path / "hf"
    export_hf(params, cfg, out, tokenizer=path)
    prompt = "def f(x):"
    assert main(["generate", "--run", str(path), "--prompt", prompt, "--max-new-tokens", "20"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])[0]

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer(prompt, return_tensors="pt")
    new = load_hf(out).generate(**inputs, max_new_tokens=20, do_sample=False)[0]
    new = new[inputs.input_ids.shape[1]:].tolist()
    if new and new[-1] == tokenizer.eos_token_id:  # ours stops before </s>, transformers after
        new = new[:-1]
    assert ours["tokens"] == len(new) > 5, (ours, new)  # a real continuation, not an instant </s>
    assert ours["output"] == load_tokenizer(path).decode(new)


@pytest.mark.slow
def test_params_bundle_and_import_give_back_the_params(tmp_path, run_dir):
    path, cfg, params = run_dir
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(path), "--format", "params", "--out", str(bundle),
                 "--dtype", "bfloat16"]) == 0
    assert load_run_config(bundle).model == cfg
    assert load_tokenizer(bundle).vocab_size == TOKENIZER_VOCAB
    restored = load_params(bundle, cfg, step=7)
    as_bf16 = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16), np.float32), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, as_bf16)

    hf = tmp_path / "hf"
    export_hf(params, cfg, hf)
    imported = tmp_path / "imported"
    assert main(["import", "--format", "hf", "--from", str(hf), "--out", str(imported)]) == 0
    imported_cfg = load_run_config(imported).model
    assert imported_cfg.model_copy(update={"name": cfg.name}) == cfg
    for loaded in (load_params(imported, imported_cfg),
                   load_hf_params(hf, cfg, shardings=jax.tree.map(
                       lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params))):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, params)


@pytest.mark.parametrize("update, field", [
    ({"head_dim": 8}, "model.head_dim"),  # 4 heads x 8 != hidden 24 (like NeMo's GPT-3 13B)
    ({"num_kv_heads": 2}, "model.num_kv_heads"),
    ({"position": "rope"}, "model.position"),
    ({"use_bias": False}, "model.use_bias"),
    ({"norm": "rmsnorm"}, "model.norm"),
])
def test_gpt_without_exact_gpt2_equivalent_is_refused(tmp_path, update, field):
    with pytest.raises(UserError, match=field):
        export_hf({}, ModelConfig(**{**GPT, **update}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_without_exact_equivalent_is_refused(tmp_path):
    with pytest.raises(UserError, match="model.mlp"):
        export_hf({}, ModelConfig(**{**LLAMA, "mlp": "gelu"}), tmp_path / "out")


def test_dtype_not_allowed_is_refused(tmp_path, run_dir, capsys):
    with pytest.raises(UserError, match="float16"):
        export_hf({}, VARIANTS["gpt"], tmp_path / "out", dtype="float16")
    path, _, _ = run_dir
    code = main(["export", "--run", str(path), "--out", str(tmp_path / "o"), "--dtype", "int8"])
    assert code == 2 and "int8" in capsys.readouterr().err


@pytest.fixture
def llama_hf(tmp_path):
    cfg = VARIANTS["llama_gqa"]
    export_hf(random_params(cfg), cfg, tmp_path / "hf")
    return tmp_path / "hf", cfg


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_import_refuses_unsupported_architecture(llama_hf):
    path, cfg = llama_hf
    _edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(UserError, match="MistralForCausalLM"):
        hf_model_config(path)
    with pytest.raises(UserError, match="MistralForCausalLM"):
        load_hf_params(path, cfg)


def test_import_refuses_what_our_model_cannot_compute(llama_hf):
    path, _ = llama_hf
    _edit_config(path, hidden_act="gelu")
    with pytest.raises(UserError, match="hidden_act"):
        hf_model_config(path)
    _edit_config(path, hidden_act="silu", rope_parameters={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(UserError, match="rope"):
        hf_model_config(path)


def test_import_refuses_missing_and_unexpected_tensors(llama_hf):
    path, cfg = llama_hf
    gone = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(path, lambda t: t.pop(gone))
    with pytest.raises(UserError, match=f"missing: {gone}"):
        load_hf_params(path, cfg)
    extra = "model.layers.0.self_attn.q_norm.weight"
    _edit_tensors(path, lambda t: t.update({gone: np.zeros((36, 24), np.float32),
                                            extra: np.ones(10, np.float32)}))
    with pytest.raises(UserError, match=f"unexpected: {extra}"):
        load_hf_params(path, cfg)


def test_import_refuses_disallowed_dtype_and_mismatched_config(llama_hf):
    path, cfg = llama_hf
    with pytest.raises(UserError, match="model.hidden"):
        load_hf_params(path, cfg.model_copy(update={"hidden": 36}))
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(path, lambda t: t.update({name: t[name].astype(np.int8)}))
    with pytest.raises(UserError, match=f"dtype not allowed.*{name} \\(I8\\)"):
        load_hf_params(path, cfg)


def _assert_params_equal(actual, expected):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 actual, expected)


def test_import_reads_sharded_bfloat16_and_base_model_files(tmp_path):
    cfg = VARIANTS["llama_gqa"]
    params = random_params(cfg)
    export_hf(params, cfg, tmp_path / "sharded", dtype="bfloat16", max_shard_size="8KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    rounded = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(np.float32), params)
    _assert_params_equal(load_hf_params(tmp_path / "sharded", cfg), rounded)

    # GPT-2 as published: base-model names without "transformer.", old causal-mask buffers
    cfg = VARIANTS["gpt"]
    params = random_params(cfg)
    export_hf(params, cfg, tmp_path / "gpt2")
    _edit_tensors(tmp_path / "gpt2", lambda t: t.update(
        {**{k.removeprefix("transformer."): t.pop(k) for k in list(t)},
         "h.0.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)),
         "h.1.attn.masked_bias": np.array(-1e4, np.float32)}))
    _assert_params_equal(load_hf_params(tmp_path / "gpt2", cfg), params)


def test_export_never_replaces_a_directory_that_is_not_an_export(tmp_path):
    cfg = VARIANTS["gpt"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="no export of ours wrote"):
        export_hf(random_params(cfg), cfg, precious)
    with pytest.raises(UserError, match="no export of ours wrote"):
        save_params_bundle(random_params(cfg), Config(model=cfg, data=DataConfig(seq_len=32)),
                           precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no leftovers
