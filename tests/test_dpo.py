"""Preference tuning: pair rows, the DPO/IPO/hinge losses golden against TRL, the frozen reference.

Golden: TRL's DPOTrainer computes the loss and its reward metrics on the Hugging Face export of
the same two models (policy and reference) and the same pairs, in float32; ours must agree within
1e-5 relative, and the gradient w.r.t. one weight matrix within 1e-4.
"""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_chat import WordTokenizer  # noqa: E402

from bignlp_jax.config.schema import TaskConfig  # noqa: E402
from bignlp_jax.data.tasks.formats import stack_rows  # noqa: E402
from bignlp_jax.data.tasks.preference import PAIR_KEYS, PreferenceFormat  # noqa: E402
from bignlp_jax.errors import UserError  # noqa: E402

HI, HELLO, BYE, OK = 8, 9, 10, 11


def fmt(seq_len=16, **task):
    return PreferenceFormat(TaskConfig(type="preference", **task), WordTokenizer(), seq_len)


def side(row, name):
    """(full sequence, counted targets) of one side of a pair row."""
    n = int((row[f"{name}_segment_ids"] > 0).sum())
    seq = [*row[f"{name}_tokens"][:n].tolist(), int(row[f"{name}_targets"][n - 1])]
    counted = [int(t) for t, w in zip(row[f"{name}_targets"], row[f"{name}_loss_mask"]) if w]
    return seq, counted


def test_text_pair_rows_count_only_the_answers():
    row = fmt().row({"prompt": "hi", "chosen": "hello", "rejected": "bye ok"}, 0)
    assert set(row) == set(PAIR_KEYS)
    assert side(row, "chosen") == ([1, HI, 3, HELLO, 2], [HELLO, 2])
    assert side(row, "rejected") == ([1, HI, 3, BYE, OK, 2], [BYE, OK, 2])


def test_conversation_pairs_share_their_prompt():
    system = {"role": "system", "content": "be"}
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}]
    chosen = [system, *turns, {"role": "assistant", "content": "ok"}]
    rejected = [system, *turns, {"role": "assistant", "content": "hello ok"}]
    # stored by `data prepare` as JSON text
    row = fmt(32).row({"chosen": json.dumps(chosen), "rejected": rejected}, 0)
    # the first answer (hello) is prompt: only the last, differing answer counts
    assert side(row, "chosen")[1] == [OK, 2]
    assert side(row, "rejected")[1] == [HELLO, OK, 2]
    # an explicit prompt message list goes in front of both answers: the same rows
    explicit = fmt(32).row({"prompt": [system, *turns],
                            "chosen": [{"role": "assistant", "content": "ok"}],
                            "rejected": [{"role": "assistant", "content": "hello ok"}]}, 0)
    assert all((explicit[k] == row[k]).all() for k in PAIR_KEYS)


@pytest.mark.parametrize(("record", "problem"), [
    ({"prompt": "hi", "rejected": "bye"}, "record 3 of .* has no 'chosen' field"),
    ({"prompt": "hi", "chosen": "bye", "rejected": "bye"}, "chosen and rejected are identical"),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
     "identical"),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
      "rejected": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]},
     "share 0 message"),
])
def test_bad_pairs_are_refused(record, problem):
    with pytest.raises(UserError, match=problem):
        fmt().row(record, 3)


def test_overflow_truncates_the_answer_or_refuses():
    record = {"prompt": "hi hi", "chosen": "ok " * 8, "rejected": "bye"}
    row = fmt(6).row(record, 0)  # <s> hi hi <sep> + 8 x ok </s> = 13 tokens > 7
    # the prompt keeps one token (the same on both sides), then the answer loses its end
    assert side(row, "chosen") == ([1, HI, 3, OK, OK, OK, OK], [OK, OK, OK, OK])
    assert side(row, "rejected") == ([1, HI, 3, BYE, 2], [BYE, 2])
    with pytest.raises(UserError, match="(?s)chosen side has 13 tokens.*chat_overflow=truncate"):
        fmt(6, chat_overflow="refuse").row(record, 0)
    # a long prompt loses its end on both sides, so the longer answer fits whole
    row = fmt(6).row({"prompt": "hi bye hi bye", "chosen": "ok ok", "rejected": "bye"}, 0)
    assert side(row, "chosen") == ([1, HI, BYE, 3, OK, OK, 2], [OK, OK, 2])
    assert side(row, "rejected") == ([1, HI, BYE, 3, BYE, 2], [BYE, 2])
    conversation = [{"role": "user", "content": "hi " * 8}]
    with pytest.raises(UserError, match="leaves no room for an answer"):
        fmt(6).row({"chosen": [*conversation, {"role": "assistant", "content": "ok"}],
                    "rejected": [*conversation, {"role": "assistant", "content": "bye"}]}, 0)


# ------------------------------------------------------------------------------------------
# the loss, against TRL

BETA = 0.1
VARIANTS = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
PAIRS = [  # (prompt, chosen, rejected): different lengths, so padding and sums are exercised
    ([5, 6, 7], [8, 9], [10]),
    ([5], [11, 12, 13], [14, 15]),
    ([7, 8, 9, 10], [16], [17, 18, 19]),
    ([6, 6], [20, 21], [22, 23]),
]


def pair_batch(seq_len=12):
    """Our batch of PAIRS: <s>=1 prompt, answers ending in </s>=2 (no <sep>: TRL's layout)."""
    from bignlp_jax.data.tasks.formats import empty_row

    rows = []
    for prompt, chosen, rejected in PAIRS:
        row = {}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            seq = [1, *prompt, *answer, 2]
            r = empty_row(seq_len)
            n = len(seq) - 1
            r["tokens"][:n], r["targets"][:n] = seq[:-1], seq[1:]
            r["positions"][:n], r["segment_ids"][:n] = np.arange(n), 1
            r["loss_mask"][len(prompt):n] = 1.0
            row.update({f"{name}_{k}": v for k, v in r.items()})
        rows.append(row)
    return stack_rows(rows)


def dpo_config(tmp_path, loss="sigmoid", smoothing=0.0, *extra):
    from helpers import tiny_config

    return tiny_config(tmp_path, "init_from=unused", "data.source=tfds",
                       "data.tfds_name=none", "task.type=preference", f"dpo.beta={BETA}",
                       f"dpo.loss={loss}", f"dpo.label_smoothing={smoothing}",
                       "data.seq_len=12", "model.vocab_size=32", *extra, llama=True)


@pytest.fixture(scope="module")
def golden_models(tmp_path_factory):
    """A random tiny Llama (policy) and a perturbed copy (reference), ours and exported."""
    from test_export_hf import random_params

    from bignlp_jax.hf.weights import export_hf

    tmp = tmp_path_factory.mktemp("dpo_golden")
    cfg = dpo_config(tmp)
    policy = random_params(cfg.model, seed=1)
    reference = random_params(cfg.model, seed=2)
    reference = jax.tree.map(lambda p, r: p + 0.3 * (r - p), policy, reference)
    for name, params in (("policy", policy), ("reference", reference)):
        export_hf(params, cfg.model, tmp / name, dtype="float32")
    return cfg, policy, reference, tmp


@pytest.fixture(scope="module")
def trl_trainer(golden_models):
    """TRL's DPOTrainer around the exported policy and reference (built once: the loss type is
    switched per test, which is all `_compute_loss` reads of it)."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tmp = golden_models[3]
    torch.manual_seed(0)
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(tmp / "policy", dtype=torch.float32)
    ref = load(tmp / "reference", dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp / "trl"), beta=BETA, loss_type=["sigmoid"],
                     report_to=[], use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=len(PAIRS))
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data,
                      processing_class=_hf_tokenizer())


def trl_loss(trainer, loss_type, swap=False):
    """TRL's DPOTrainer._compute_loss on the exported models and PAIRS: (loss, its metrics, the
    loss's gradient w.r.t. layer 0's q_proj). swap: chosen and rejected exchanged."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    examples = [{"prompt_ids": [1, *p], "chosen_ids": [*(r if swap else c), 2],
                 "rejected_ids": [*(c if swap else r), 2]} for p, c, r in PAIRS]
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.numpy().copy()
    return float(loss.detach()), metrics, grad


def _hf_tokenizer():
    """A word-level tokenizer over ids 0..31 (DPOTrainer wants one; the ids are given)."""
    import tokenizers
    import transformers

    vocab = {f"t{i}": i for i in range(32)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0",
                                                eos_token="t2", bos_token="t1")


def our_losses(cfg, policy, reference):
    """{(loss, label smoothing): (loss, means of the reward metrics, gradients)} for VARIANTS,
    one jitted program (one compile) for all of them."""
    from bignlp_jax.train.dpo import pair_means, pair_sums

    batch = pair_batch()

    def variant(loss, smoothing):
        c = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(
            update={"loss": loss, "label_smoothing": smoothing})})

        def loss_fn(p):
            s, aux = pair_sums(p, reference, batch, c)
            return s / aux["pairs"], aux

        (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy)
        return value, pair_means(value * aux["pairs"], aux), grads

    results = jax.jit(lambda: [variant(*v) for v in VARIANTS])()
    return {v: (float(loss), {k: float(x) for k, x in means.items()}, grads)
            for v, (loss, means, grads) in zip(VARIANTS, results)}


@pytest.mark.slow
def test_loss_rewards_and_gradient_match_trl(golden_models, trl_trainer):
    """sigmoid, conservative sigmoid, ipo and hinge: the loss and TRL's reward metrics within
    1e-5 relative, the gradient w.r.t. layer 0's q projection within 1e-4 of its scale."""
    cfg, policy, reference, _ = golden_models
    ours_all = our_losses(cfg, policy, reference)
    for (loss, smoothing), (ours, means, grads) in ours_all.items():
        theirs, metrics, their_grad = trl_loss(trl_trainer, loss)
        if smoothing:
            # conservative DPO = (1 - e) DPO(pairs) + e DPO(pairs with the answers swapped)
            swapped, _, swapped_grad = trl_loss(trl_trainer, loss, swap=True)
            theirs = (1 - smoothing) * theirs + smoothing * swapped
            their_grad = (1 - smoothing) * their_grad + smoothing * swapped_grad
        where = f"dpo.loss={loss} label_smoothing={smoothing}"
        assert ours == pytest.approx(theirs, rel=1e-5), where
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                     "rewards/margins", "logps/chosen", "logps/rejected"):
            assert means[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), (where, name)
        assert 0 < means["rewards/accuracies"] < 1  # the pairs disagree: not a trivial 0 or 1
        # layer 0 of our fused qkv [layers, D, kv heads, G + 2, head_dim] holds q in slots :G
        # (hf/layout.py); HF's q_proj.weight is [heads * head_dim, D]
        qkv = np.asarray(grads["blocks"]["attn"]["qkv"][0])
        G = cfg.model.num_heads // cfg.model.kv_heads
        ours_q = qkv[:, :, :G, :].reshape(qkv.shape[0], -1).T
        scale = float(np.abs(their_grad).max())
        assert scale > 0 and float(np.abs(ours_q - their_grad).max()) <= 1e-4 * scale, where


# ------------------------------------------------------------------------------------------
# training on the embedded preference task

SMALL = ["model.vocab_size=1024", "model.num_layers=1", "model.hidden=32", "model.num_heads=2",
         "model.mlp_dim=64", "data.seq_len=48", "model.max_seq_len=48",
         "train.global_batch_size=8", "train.log_every=1",
         # Llama-style, so that LoRA runs export to peft
         "model.family=llama", "model.norm=rmsnorm", "model.position=rope", "model.mlp=swiglu",
         "model.use_bias=false", "model.tie_embeddings=false"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, embedded_data_dir):
    """A checkpoint of a small random model: the init_from of the alignment runs."""
    from bignlp_jax.checkpoint.manager import RunCheckpointer, step_meta
    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import Trainer

    run_dir = tmp_path_factory.mktemp("dpo_base")
    pre = load_config(None, [f"run.dir={run_dir}", *SMALL, "data.source=synthetic"])
    trainer = Trainer.build(pre)
    ckpt = RunCheckpointer(pre.run.dir, pre.checkpoint)
    ckpt.save(1, trainer.layout.fresh(), {}, step_meta(pre, trainer.mesh, 1))
    ckpt.close()
    return run_dir, embedded_data_dir


def align_config(base_run, run_dir, *overrides):
    from bignlp_jax.config import load_config

    base, data_dir = base_run
    return load_config("align_stdlib", [
        f"run.dir={run_dir}", *SMALL, f"init_from={base}", "data.tokenizer=null",
        f"data.data_dir={data_dir}", "optimizer.lr=1e-2", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        "checkpoint.every_steps=2", "train.eval_every=3", "train.eval_batches=2", *overrides])


def params_of(run_dir, cfg, step):
    from bignlp_jax.checkpoint import load_params

    return load_params(run_dir, cfg.model, step=step, lora=cfg.lora, merged=False)


@pytest.mark.slow
def test_dpo_trains_from_log2_with_microbatches_and_resumes_bitwise(base_run, tmp_path):
    """Step 1 sees policy == reference: loss log 2, every reward 0. Three steps with two
    microbatches on a data x fsdp x tensor mesh, with TRL's metric names (metrics.jsonl, eval_
    ones, TensorBoard), equal a run stopped at step 2 and resumed, bitwise; `eval`, `generate`
    and `export` work on the run."""
    from bignlp_jax.cli import main
    from bignlp_jax.evaluate.run import evaluate_run
    from bignlp_jax.train.loop import train
    from bignlp_jax.train.metrics import read_metrics

    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.microbatches=2"]
    cfg = align_config(base_run, tmp_path / "a", "train.steps=3", *mesh)
    train(cfg)
    records = read_metrics(cfg.run.dir)
    first = records[0]
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) <= 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, name
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    last = records[-1]
    assert last["step"] == 3 and last["loss"] < math.log(2)
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
            "eval_logps/chosen"} <= set(last)

    events = next((tmp_path / "a" / "tensorboard").iterdir()).read_bytes()
    assert b"rewards/accuracies" in events and b"logps/rejected" in events
    results = evaluate_run(cfg)  # the whole held-out split, policy vs the init_from model
    assert results["task"] == "preference" and results["examples"] > 100
    assert 0 < results["rewards/accuracies"] <= 1 and results["logps/chosen"] < 0
    assert main(["generate", "--run", str(cfg.run.dir), "--prompt", "Logging", "--max-new-tokens",
                 "2"]) == 0
    assert main(["export", "--run", str(cfg.run.dir), "--format", "hf",
                 "--out", str(tmp_path / "hf")]) == 0

    b = tmp_path / "b"
    train(align_config(base_run, b, "train.steps=2", *mesh))
    train(align_config(base_run, b, "train.steps=3", *mesh))
    ours, resumed = params_of(cfg.run.dir, cfg, 3), params_of(b, cfg, 3)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()),
                                     ours, resumed))
    assert read_metrics(b)[-1]["loss"] == last["loss"]


@pytest.mark.slow
def test_lora_reference_is_the_base_with_adapters_off(base_run, tmp_path):
    """With LoRA the reference is the base weights with the adapters off: the same log-probs
    as a separate frozen copy (either way round, with trained adapters), the loss starts at
    log 2, training leaves the base weights bitwise unchanged, and the run exports to peft."""
    from bignlp_jax.checkpoint import load_params
    from bignlp_jax.cli import main
    from bignlp_jax.data.tasks.source import make_task_source
    from bignlp_jax.model.lora import KEY as LORA_KEY
    from bignlp_jax.train.dpo import pair_sums, reference_logps
    from bignlp_jax.train.loop import train
    from bignlp_jax.train.metrics import read_metrics

    cfg = align_config(base_run, tmp_path / "lora", "train.steps=3", "lora.rank=4",
                       "lora.targets=[q,v,up]", "optimizer.lr=5e-2")
    train(cfg)
    assert abs(read_metrics(cfg.run.dir)[0]["loss"] - math.log(2)) <= 1e-6
    trained = params_of(cfg.run.dir, cfg, 3)
    base = load_params(base_run[0], cfg.model)
    trained_base = {k: v for k, v in trained.items() if k != LORA_KEY}
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()),
                                     trained_base, base))
    assert any(float(np.abs(np.asarray(b)).max()) > 0
               for b in jax.tree.leaves(trained[LORA_KEY]))  # the adapters did train
    for fmt_args in (["--format", "peft"], ["--format", "hf", "--merge"]):
        out = tmp_path / fmt_args[1]
        assert main(["export", "--run", str(cfg.run.dir), *fmt_args, "--out", str(out)]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()

    batch = next(make_task_source(cfg, "train", (0, 8)))
    frozen_copy = jax.tree.map(lambda x: np.array(x, copy=True), base)
    off = jax.jit(lambda p, b: reference_logps(p, None, b, cfg))(trained, batch)
    copy = jax.jit(lambda p, r, b: reference_logps(p, r, b, cfg))(trained, frozen_copy, batch)
    assert (np.asarray(off) == np.asarray(copy)).all()
    # the whole loss: adapters-off reference vs the copy given explicitly
    loss_off, loss_copy = jax.jit(lambda p, r, b: (pair_sums(p, None, b, cfg),
                                                   pair_sums(p, r, b, cfg)))(
        trained, frozen_copy, batch)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(x == y), loss_off, loss_copy))


# ------------------------------------------------------------------------------------------
# data prepare and bad input

TEXT_PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "bye ok"}
CHAT_PAIR = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
             "rejected": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "bye"}]}


def test_data_prepare_keeps_pairs_and_refuses_bad_ones(tmp_path, capsys):
    """`data prepare --format jsonl --text-key prompt --fields chosen,rejected` keeps text and
    conversational pairs (as JSON text) and the rows read back are those of the records; a
    record without `chosen` is one line, exit 2."""
    from bignlp_jax.cli import main
    from bignlp_jax.data.tfds.source import open_split

    lines = [json.dumps({**TEXT_PAIR, "id": 0}), json.dumps({"prompt": "", **CHAT_PAIR})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["data", "prepare", "--input", str(tmp_path / "pairs.jsonl"), "--format", "jsonl",
            "--text-key", "prompt", "--fields", "chosen,rejected"]
    assert main([*argv, "--name", "pairs", "--data-dir", str(tmp_path / "data")]) == 0
    rows = []
    for split in ("train", "validation"):
        try:
            records = open_split("pairs", tmp_path / "data", split, required_keys=("chosen",))
        except UserError:  # an empty split
            continue
        rows += [fmt(32).row(records[i], i) for i in range(len(records))]
    assert len(rows) == 2
    for want in (fmt(32).row(TEXT_PAIR, 0), fmt(32).row(CHAT_PAIR, 0)):
        assert any(all((r[k] == want[k]).all() for k in PAIR_KEYS) for r in rows)

    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "hi", "rejected": "bye"}) + "\n")
    capsys.readouterr()
    assert main([*argv, "--name", "bad", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("no field 'chosen'" in line for line in err)


def test_preference_without_init_from_is_one_line_exit_2(tmp_path, capsys):
    from bignlp_jax.cli import main

    assert main(["train", "align_stdlib", "init_from=null", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "task.type=preference needs init_from" in err
    assert main(["train", "align_stdlib", "dpo.loss=ipo", "dpo.label_smoothing=0.1",
                 f"run.dir={tmp_path}"]) == 2
    assert "applies to dpo.loss=sigmoid only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the pipeline's align stage

MINI_ALIGN = ["align.config=../align_stdlib.yaml",
              "align.model={vocab_size: 512, num_layers: 1, hidden: 32, num_heads: 2, "
              "mlp_dim: 64, max_seq_len: 64}",
              "align.data={seq_len: 64}", "align.task={eval_examples: 16}",
              "align.train={steps: 2, global_batch_size: 8, log_every: 1, eval_every: 0, "
              "eval_batches: 1}",
              "align.checkpoint={every_steps: 0, async_save: false}"]


def test_align_stage_starts_from_finetune_and_is_exported(tmp_path):
    from bignlp_jax.pipeline.fingerprint import upstream
    from bignlp_jax.pipeline.spec import Pipeline

    p = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *MINI_ALIGN])
    assert p.stages().index("align") == p.stages().index("finetune_scratch") + 1
    cfg = p.run_config("align")
    assert cfg.init_from == str(p.stage_dir("finetune")) and cfg.task.type == "preference"
    assert p.final_run() == "align" and upstream(p, "export") == ["align"]
    assert upstream(p, "align") == ["tokenizer", "finetune"]
    with pytest.raises(UserError, match="align stage's config has no task.type=preference"):
        Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}",
                                         "align.config=../finetune_stdlib_modules.yaml"])
