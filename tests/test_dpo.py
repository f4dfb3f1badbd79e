"""Preference tuning: pair rows, the DPO/IPO/hinge losses golden against TRL, the frozen reference.

Golden: TRL's DPOTrainer computes the loss and its reward metrics on the Hugging Face export of
the same two models (policy and reference) and the same pairs, in float32; ours must agree within
1e-5 relative, and the gradient w.r.t. one weight matrix within 1e-4.
"""

from __future__ import annotations

import json
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
    assert side(row, "chosen") == ([1, HI, HI, 3, OK, OK, OK], [OK, OK, OK])
    assert side(row, "rejected")[1] == [BYE, 2]
    with pytest.raises(UserError, match="(?s)chosen side has 13 tokens.*chat_overflow=truncate"):
        fmt(6, chat_overflow="refuse").row(record, 0)
    with pytest.raises(UserError, match="leaves no room for an answer"):
        fmt(4).row({"prompt": "hi hi hi hi", "chosen": "ok", "rejected": "bye"}, 0)


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


def trl_loss(tmp, loss_type, swap=False):
    """TRL's DPOTrainer._compute_loss on the exported models: (loss, its metrics, the loss's
    gradient w.r.t. layer 0's q_proj). swap: chosen and rejected exchanged."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(tmp / "policy", dtype=torch.float32)
    ref = load(tmp / "reference", dtype=torch.float32)
    examples = [{"prompt_ids": [1, *p], "chosen_ids": [*(r if swap else c), 2],
                 "rejected_ids": [*(c if swap else r), 2]} for p, c, r in PAIRS]
    args = DPOConfig(output_dir=str(tmp / "trl"), beta=BETA, loss_type=[loss_type],
                     report_to=[], use_cpu=True, bf16=False, fp16=False,
                     per_device_train_batch_size=len(PAIRS))
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data,
                         processing_class=_hf_tokenizer())
    inputs = DataCollatorForPreference(pad_token_id=0)(examples)
    model.train()
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grad = model.model.layers[0].self_attn.q_proj.weight.grad.numpy()
    return float(loss.detach()), metrics, grad


def _hf_tokenizer():
    """A word-level tokenizer over ids 0..31 (DPOTrainer wants one; the ids are given)."""
    import tokenizers
    import transformers

    vocab = {f"t{i}": i for i in range(32)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0",
                                                eos_token="t2", bos_token="t1")


def our_loss(cfg, policy, reference):
    from bignlp_jax.train.dpo import pair_means, pair_sums

    batch = pair_batch()

    def loss_fn(p):
        s, aux = pair_sums(p, reference, batch, cfg)
        return s / aux["pairs"], aux

    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(policy)
    means = pair_means(loss * aux["pairs"], aux)
    return float(loss), {k: float(v) for k, v in means.items()}, grads


@pytest.mark.parametrize(("loss", "smoothing"), VARIANTS)
def test_loss_and_rewards_match_trl(golden_models, loss, smoothing):
    cfg, policy, reference, tmp = golden_models
    cfg = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(
        update={"loss": loss, "label_smoothing": smoothing})})
    ours, means, grads = our_loss(cfg, policy, reference)
    theirs, metrics, their_grad = trl_loss(tmp, loss)
    if smoothing:
        # conservative DPO = (1 - e) * DPO(pairs) + e * DPO(pairs with the answers swapped)
        swapped, _, swapped_grad = trl_loss(tmp, loss, swap=True)
        theirs = (1 - smoothing) * theirs + smoothing * swapped
        their_grad = (1 - smoothing) * their_grad + smoothing * swapped_grad
    assert ours == pytest.approx(theirs, rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert means[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
    assert 0 < means["rewards/accuracies"] < 1  # the pairs disagree: accuracy is not trivial
    # layer 0 of our fused qkv [layers, D, kv heads, G + 2, head_dim] holds q in slots :G
    # (hf/layout.py); HF's q_proj.weight is [heads * head_dim, D]
    qkv = np.asarray(grads["blocks"]["attn"]["qkv"][0])
    G = cfg.model.num_heads // cfg.model.kv_heads
    ours_q = qkv[:, :, :G, :].reshape(qkv.shape[0], -1).T
    scale = float(np.abs(their_grad).max())
    assert scale > 0 and float(np.abs(ours_q - their_grad).max()) <= 1e-4 * scale
