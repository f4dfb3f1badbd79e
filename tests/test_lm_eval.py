"""`bignlp-jax lm-eval`: our harness backend against the harness's own `hf` backend.

Golden: a random model of each family (GPT, Llama) with a SentencePiece tokenizer, saved as a
run and exported with `bignlp-jax export --format hf`; the three shipped offline tasks run through
`lm_eval.simple_evaluate` with our backend and with `hf` on the export (float32, CPU). Per
request: log-likelihoods within 1e-4, is_greedy identical, generated text identical; per task:
acc/acc_norm equal, word_perplexity within 1e-4 relative, exact_match equal. Documents are longer
than max_length, so rolling windows are exercised; a sharded mesh gives the single-device numbers.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # local directories only
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import jax  # noqa: E402
import lm_eval  # noqa: E402  - required: the test extra installs it (never skipped)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_export_hf import GPT, LLAMA, random_params  # noqa: E402

from bignlp_jax.cli import main  # noqa: E402
from bignlp_jax.config import Config, DataConfig, MeshConfig, ModelConfig, RunConfig  # noqa: E402
from bignlp_jax.data.tokenizer import train_tokenizer  # noqa: E402
from bignlp_jax.evaluate.harness_run import (  # noqa: E402
    HarnessSettings,
    load_model,
    task_manager,
)
from bignlp_jax.evaluate.harness_runner import length_buckets  # noqa: E402
from bignlp_jax.evaluate.harness_tasks import SHIPPED_DIR  # noqa: E402
from bignlp_jax.export.bundle import save_params_bundle  # noqa: E402

TOL = 1e-4  # per-request log-likelihood, absolute; word_perplexity, relative (float32)
VOCAB = 400
MAX_LENGTH = 48  # < the documents' token counts: rolling windows; < model.max_seq_len (64)
TASKS = ("bignlp_stdlib_package", "bignlp_stdlib_ppl", "bignlp_stdlib_complete")
LIMIT = 4
FAMILIES = {"gpt": GPT, "llama": LLAMA}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 400-piece SentencePiece model trained on the shipped task data."""
    texts = []
    for name in sorted(os.listdir(SHIPPED_DIR)):
        if name.endswith(".jsonl"):
            with open(SHIPPED_DIR / name, encoding="utf-8") as f:
                texts += [" ".join(str(v) for v in json.loads(line).values()) for line in f]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def manager():
    return task_manager(())


def make_run(root, family: str, tokenizer_dir):
    """(run dir, HF export dir) of a random `family` model."""
    # init_std 0.05: log-probabilities of a few nats per token, so a document's float32 sum
    # stays well inside the 1e-4 tolerance (0.2 gives hundreds of nats per token)
    cfg = ModelConfig(**{**FAMILIES[family], "vocab_size": VOCAB, "init_std": 0.05})
    run = root / f"run_{family}"
    run_cfg = Config(model=cfg, data=DataConfig(seq_len=MAX_LENGTH), run=RunConfig(dir=str(run)))
    save_params_bundle(random_params(cfg, seed=3), run_cfg, run, step=5, tokenizer=tokenizer_dir)
    hf = root / f"hf_{family}"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(hf)]) == 0
    return run, hf, run_cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir):
    """family -> (run dir, HF export, config), each made once per module."""
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            made[family] = make_run(tmp_path_factory.mktemp(family), family, tokenizer_dir)
        return made[family]

    return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, runs):
    return runs(request.param)


_ONE_DEVICE: dict[str, tuple] = {}  # run dir -> our single-device results (shared by tests)


SETTINGS = HarnessSettings(tasks=TASKS, limit=LIMIT, batch_size=4, log_samples=True,
                           bootstrap_iters=0)


def ours(cfg, run, manager, settings=SETTINGS, devices=None):
    lm, step = load_model(cfg, run, None, settings, devices=devices)
    assert step == 5
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(TASKS), limit=LIMIT, log_samples=True, task_manager=manager,
        bootstrap_iters=0)
    return results, lm


def theirs(hf_dir, manager):
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32",
                                "max_length": MAX_LENGTH, "device": "cpu"},
        tasks=list(TASKS), limit=LIMIT, log_samples=True, task_manager=manager,
        batch_size=3, bootstrap_iters=0)


def responses(results, task):
    """[(doc id, [response per request])] of one task, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [(s["doc_id"], [r[0] for r in s["resps"]]) for s in samples]


def assert_same_responses(a, b, task, windows=None):
    """windows: {doc id: rolling windows}; a rolling document is one loglikelihood request per
    window, each held to TOL."""
    ra, rb = responses(a, task), responses(b, task)
    assert [d for d, _ in ra] == [d for d, _ in rb] and len(ra) == LIMIT
    for (doc, xs), (_, ys) in zip(ra, rb):
        assert len(xs) == len(ys), (task, doc)
        for x, y in zip(xs, ys):
            if isinstance(y, str):  # generate_until
                assert x == y, (task, doc, x, y)
            elif isinstance(y, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                assert abs(float(x[0]) - float(y[0])) <= TOL, (task, doc, x, y)
                assert bool(x[1]) == bool(y[1]), (task, doc, x, y)
            else:  # loglikelihood_rolling: one float
                assert abs(float(x) - float(y)) <= TOL * windows[doc], (task, doc, x, y)


def rolling_windows(results, lm) -> dict[int, int]:
    return {s["doc_id"]: -(-len(lm.tok_encode(s["doc"]["text"])) // MAX_LENGTH)
            for s in results["samples"]["bignlp_stdlib_ppl"]}


def ours_one_device(cfg, run, manager):
    if str(run) not in _ONE_DEVICE:
        _ONE_DEVICE[str(run)] = ours(cfg, run, manager, devices=jax.devices()[:1])
    return _ONE_DEVICE[str(run)]


@pytest.mark.slow
def test_golden_against_the_hf_backend(exported, manager):
    run, hf, cfg = exported
    a, lm = ours_one_device(cfg, run, manager)
    b = theirs(hf, manager)
    windows = rolling_windows(a, lm)
    for task in TASKS:
        assert_same_responses(a, b, task, windows)
    ra, rb = a["results"], b["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ra["bignlp_stdlib_package"][metric] == rb["bignlp_stdlib_package"][metric]
    wp_a = ra["bignlp_stdlib_ppl"]["word_perplexity,none"]
    wp_b = rb["bignlp_stdlib_ppl"]["word_perplexity,none"]
    assert abs(wp_a - wp_b) <= TOL * wp_b, (wp_a, wp_b)
    assert ra["bignlp_stdlib_complete"]["exact_match,none"] == \
        rb["bignlp_stdlib_complete"]["exact_match,none"]
    assert max(windows.values()) > 2  # the rolling documents really are several windows long
    # generation produced text (a test of equal empty strings would prove nothing)
    outputs = [r[0] for _, r in responses(a, "bignlp_stdlib_complete")]
    assert any(o.strip() for o in outputs), outputs
    # a handful of compiled scoring shapes, all from the fixed buckets
    assert {T for _, T in lm.runner.shapes_scored} <= set(length_buckets(MAX_LENGTH))


def test_sharded_mesh_equals_one_device(runs, manager):
    run, _, cfg = runs("llama")  # GQA: the kv heads split over tensor too
    one, lm = ours_one_device(cfg, run, manager)
    sharded_cfg = cfg.model_copy(update={"mesh": MeshConfig(data=1, fsdp=2, tensor=2)})
    four, _ = ours(sharded_cfg, run, manager, devices=jax.devices()[:4])
    windows = rolling_windows(one, lm)
    for task in TASKS:
        assert_same_responses(four, one, task, windows)


def test_is_greedy_true_for_the_models_own_continuation(runs, manager):
    """The model's own greedy continuation scores is_greedy=True, and higher than the same with
    its last token changed (False): a backend that always answered False would pass the golden
    above, whose random model rarely predicts a task's text."""
    run, _, cfg = runs("llama")
    lm, _ = load_model(cfg, run, None, SETTINGS)
    context = lm.tok_encode("Return the value of")
    own = lm.runner.generate([context], 6, temperature=0.0, top_k=None, top_p=None, seed=0,
                             eos_id=None, pad_id=0)[0]
    changed = [*own[:-1], (own[-1] + 1) % VOCAB]
    (lp_own, greedy_own), (lp_changed, greedy_changed) = lm._loglikelihood_tokens(
        [(None, context, own), (None, context, changed)])
    assert greedy_own and not greedy_changed
    assert lp_own > lp_changed


def test_decode_like_the_exported_tokenizer(runs):
    """Random id sequences (byte pieces, specials, broken UTF-8 runs) decode as transformers
    decodes them with our exported tokenizer."""
    import transformers

    from bignlp_jax.data.tokenizer import load_tokenizer
    from bignlp_jax.evaluate.harness import decode_like_hf

    run, hf, _ = runs("gpt")  # one tokenizer serves both families
    ours_tok = load_tokenizer(run)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    rng = np.random.default_rng(0)
    for n in range(300):
        ids = rng.integers(0, VOCAB, rng.integers(1, 30)).tolist()
        if n % 3 == 0:  # runs of byte pieces, often invalid UTF-8
            ids[1:1] = rng.integers(6, 6 + 256, 5).tolist()
        if n % 5 == 0:  # ids of a model vocabulary larger than the tokenizer's
            ids.insert(len(ids) // 2, VOCAB + n)
        assert decode_like_hf(ours_tok, ids) == theirs_tok.decode(ids, skip_special_tokens=True)


# --- the command ------------------------------------------------------------------------------

def test_cli_writes_the_harness_results_with_run_step_and_commit(runs, tmp_path, capsys):
    run, _, _ = runs("gpt")
    out = tmp_path / "scores" / "lm.json"
    assert main(["lm-eval", str(run), "--tasks", "bignlp_stdlib_package", "--limit", "3",
                 "--bootstrap-iters", "0", "--batch-size", "5", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("results", "configs", "versions", "n-shot", "config"):  # the harness's keys
        assert key in results, key
    assert results["run_dir"] == str(run) and results["step"] == 5
    assert results["commit"] is None or len(results["commit"]) == 40
    assert "acc,none" in results["results"]["bignlp_stdlib_package"]
    assert "bignlp_stdlib_package" in capsys.readouterr().out


@pytest.fixture
def offline(monkeypatch):
    """No dataset download, whatever imported `datasets` earlier in the session."""
    import datasets.config
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.mark.parametrize("case", ["unknown_task", "no_checkpoint", "download", "no_lm_eval"])
def test_cli_bad_input_is_one_message_exit_2(case, runs, tmp_path, capsys, monkeypatch,
                                             offline):
    run, _, _ = runs("gpt")
    tasks = "bignlp_stdlib_package"
    if case == "unknown_task":
        tasks, expected = "bignlp_stdlib_pakage", "did you mean bignlp_stdlib_package"
    elif case == "no_checkpoint":
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "config.yaml").write_text((run / "config.yaml").read_text())
        run, expected = empty, "no complete checkpoint"
    elif case == "download":
        tasks, expected = "lambada_openai", "cannot be downloaded"
    else:
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "lm_eval" else real(name, *a))
        expected = "pip install -e '.[eval]'"
    code = main(["lm-eval", str(run), "--tasks", tasks, "--limit", "1", "--output",
                 str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.multiprocess
def test_two_processes_equal_one(runs, tmp_path, cli_env, manager):
    """fsdp 2 x tensor 2 over two processes (2 devices each): every process runs the harness on
    the same requests; the numbers equal a one-device run (all three request types)."""
    import subprocess
    import sys

    from conftest import REPO

    run, _, cfg = runs("llama")
    out = tmp_path / "two.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
         "--devices-per-process", "2", "--", "lm-eval", str(run), "--tasks", ",".join(TASKS),
         "--limit", str(LIMIT), "--batch-size", "4", "--bootstrap-iters", "0", "--log-samples",
         "--output", str(out), "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"],
        env={**cli_env, "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one, lm = ours_one_device(cfg, run, manager)
    windows = rolling_windows(one, lm)
    for task in TASKS:
        assert_same_responses(two, one, task, windows)


# --- the pipeline stage -----------------------------------------------------------------------

PIPELINE_ONLY_PRETRAIN = ["finetune=null", "finetune_scratch=false", "evaluate=false",
                          "export=null"]


def test_pipeline_lm_eval_stage_is_fingerprinted(tmp_path):
    from bignlp_jax.errors import UserError
    from bignlp_jax.pipeline.fingerprint import fingerprint, upstream
    from bignlp_jax.pipeline.spec import Pipeline

    def load(*extra):
        return Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *extra])

    plain = load()
    assert "lm_eval" not in plain.stages()
    p = load("lm_eval.tasks=[bignlp_stdlib_package]", "lm_eval.limit=4")
    assert p.stages()[-1] == "lm_eval" and p.lm_eval_models() == ["finetune"]
    assert upstream(p, "lm_eval") == ["finetune"]
    base = fingerprint(p, "lm_eval")
    assert fingerprint(load("lm_eval.tasks=[bignlp_stdlib_package]", "lm_eval.limit=5"),
                       "lm_eval") != base  # its own settings
    assert fingerprint(load("lm_eval.tasks=[bignlp_stdlib_package]", "lm_eval.limit=4",
                            "finetune.train.steps=4"), "lm_eval") != base  # its model
    both = load("lm_eval.models=[pretrain,finetune]")
    assert upstream(both, "lm_eval") == ["pretrain", "finetune"]
    with pytest.raises(UserError, match="does not train"):
        load(*PIPELINE_ONLY_PRETRAIN, "lm_eval.models=[finetune]")


@pytest.mark.slow
def test_pipeline_lm_eval_stage_scores_in_the_report(tmp_path, capsys):
    out = tmp_path / "pipe"
    args = ["pipeline", "pipelines/mini", f"output_dir={out}", *PIPELINE_ONLY_PRETRAIN,
            "lm_eval.tasks=[bignlp_stdlib_package,bignlp_stdlib_ppl]", "lm_eval.limit=3",
            "lm_eval.bootstrap_iters=0", "lm_eval.batch_size=4"]
    assert main(args) == 0
    scores = json.loads((out / "lm_eval" / "lm_eval.json").read_text())
    assert scores["pretrain"]["step"] == 3
    assert set(scores["pretrain"]["results"]) == {"bignlp_stdlib_package", "bignlp_stdlib_ppl"}
    report = (out / "report.md").read_text()
    assert "## Standard benchmarks (lm-evaluation-harness)" in report
    acc = scores["pretrain"]["results"]["bignlp_stdlib_package"]["acc,none"]
    assert f"| bignlp_stdlib_package | acc | {acc:.4f}" in report
    assert "| bignlp_stdlib_ppl | word_perplexity |" in report
    capsys.readouterr()
    assert main(args) == 0  # rerun: nothing to do
    assert "lm_eval: complete and current, skipped" in capsys.readouterr().out
    assert main([*args[:-1], "lm_eval.batch_size=2"]) == 0  # its settings changed: it reruns
    printed = capsys.readouterr().out
    assert "lm_eval: stale" in printed and "pretrain: complete and current" in printed


def test_one_token_answers_share_a_row_and_match_hf(runs, manager):
    """Multiple-choice answers of one token after one context are scored from one row (only
    the last target differs): per request equal to the hf backend, the model's own next token
    among them (is_greedy True once)."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    run, hf_dir, cfg = runs("gpt")
    lm, _ = load_model(cfg, run, None, SETTINGS)
    def one_token(context: str, i: int) -> str | None:
        text = lm.tok.sp.id_to_piece(int(i)).replace("\u2581", " ")
        return text if lm._encode_pair(context, text)[1] == [i] else None

    for context in ("Return the value of the", "Set the", "Called when the", "Put an item"):
        ctx = lm.tok_encode(context)
        best = lm.runner.generate([ctx], 1, temperature=0.0, top_k=None, top_p=None, seed=0,
                                  eos_id=None, pad_id=0)[0][0]
        if one_token(context, best):  # the model's next token is a whole piece of text
            break
    answers = [one_token(context, best)]
    for i in range(262, VOCAB):  # past the byte pieces
        text = one_token(context, i)
        if text and text.startswith(" ") and text not in answers and len(answers) < 8:
            answers.append(text)
    assert answers[0] is not None and len(answers) == 8, answers
    requests = [Instance("loglikelihood", {}, (context, a), n) for n, a in enumerate(answers)]
    before = set(lm.runner.shapes_scored)
    ours_ll = lm.loglikelihood(requests)
    hf = get_model("hf").create_from_arg_obj({"pretrained": str(hf_dir), "dtype": "float32",
                                              "max_length": MAX_LENGTH, "device": "cpu",
                                              "batch_size": 3})
    theirs_ll = hf.loglikelihood(requests)
    assert [g for _, g in ours_ll] == [g for _, g in theirs_ll]
    assert sum(g for _, g in ours_ll) == 1 and ours_ll[0][1]  # the model's own next token
    for (a, _), (b, _) in zip(ours_ll, theirs_ll):
        assert abs(a - b) <= TOL, (a, b)
    assert len(set(lm.runner.shapes_scored) - before) <= 1  # one batch of one row


def test_generate_until_sampled_and_stop_sequences(runs):
    """Sampled generation (a task's do_sample / temperature / top_k) follows the seed; stop
    sequences cut the text; max_gen_toks bounds it."""
    from lm_eval.api.instance import Instance

    run, _, cfg = runs("llama")
    lm, _ = load_model(cfg, run, None, SETTINGS)

    def ask(gen_kwargs, seed=0):
        lm.seed = seed
        requests = [Instance("generate_until", {}, (text, gen_kwargs), i)
                    for i, text in enumerate(["Return the value of", "Set the"])]
        return lm.generate_until(requests)

    sampled = {"do_sample": True, "temperature": 1.0, "top_k": 50, "max_gen_toks": 12,
               "until": []}
    first = ask(sampled)
    assert ask(sampled) == first and ask(sampled, seed=1) != first
    greedy = ask({"do_sample": False, "max_gen_toks": 12, "until": []})
    assert greedy != first
    stop = next(c for c in greedy[0][1:] if c.strip())  # a character the greedy text contains
    cut = ask({"do_sample": False, "max_gen_toks": 12, "until": [stop]})
    assert cut[0] == greedy[0].split(stop)[0] and stop not in cut[0]
    short = ask({"do_sample": False, "max_gen_toks": 3, "until": []})
    assert greedy[0].startswith(short[0]) and len(short[0]) < len(greedy[0])
