"""SentencePiece tokenizers: trained on the embedded corpus, exact round trip, recorded sizes."""

import json
import subprocess

import pytest

from bignlp_jax.cli import main
from bignlp_jax.data.corpora import stdlib_corpus
from bignlp_jax.data.tokenizer import load_tokenizer, train_tokenizer
from bignlp_jax.errors import UserError

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # square\n",
    "Return the event loop.\n\n  Indented   spaces,\ttabs and\r\nCRLF.",
    "Unicode: héllo wörld, 中文, emoji 😀, math ∑ and a NUL-free \x7f byte",
    "",
]


def test_default_tokenizer_trained_on_embedded_corpus(embedded_data_dir):
    directory = embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024"
    tok = load_tokenizer(directory)
    info = json.loads((directory / "tokenizer.json").read_text())
    assert info == tok.describe()
    assert info["vocab_size"] == tok.vocab_size == 1024
    assert info["model_type"] == "bpe" and info["byte_fallback"] is True
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "sep": 4}
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < 1024 for i in ids)
        assert tok.decode(ids) == text  # byte fallback + identity normalisation: exact
    assert tok.encode("a\nb").count(5) == 1  # a newline is one token
    # Real compression on the text it was trained on.
    topic = stdlib_corpus.pydoc_topics()[0][1]
    assert len(tok.encode(topic)) < len(topic) / 2.5


def test_training_is_deterministic_and_unigram_selectable(tmp_path):
    texts = [text for _, text in stdlib_corpus.pydoc_topics()[:12]]
    a = train_tokenizer(texts, tmp_path / "a", 400)
    b = train_tokenizer(texts, tmp_path / "b", 400)
    assert a.describe() == b.describe()  # same bytes (sha256) from the same text
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (
        tmp_path / "b" / "tokenizer.model").read_bytes()
    uni = train_tokenizer(texts, tmp_path / "u", 400, model_type="unigram")
    assert uni.describe()["model_type"] == "unigram" and uni.vocab_size == 400
    assert uni.decode(uni.encode(SAMPLES[2])) == SAMPLES[2]
    with pytest.raises(UserError, match="at least 300"):
        train_tokenizer(texts, tmp_path / "small", 100)


def test_cli_trains_on_local_files(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(stdlib_corpus.pydoc_topics()[i][1])
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "doc*.txt"),
               "--vocab-size", "400", "--out", str(out)])
    assert rc == 0
    info = json.loads((out / "tokenizer.json").read_text())
    assert info["vocab_size"] == 400 and "3 files" in info["trained_on"]
    assert load_tokenizer(out).vocab_size == 400
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "nothing*.txt"),
               "--vocab-size", "400", "--out", str(out)])
    assert rc == 2
    assert "matches no files" in capsys.readouterr().err


@pytest.mark.slow
def test_model_vocab_must_match_tokenizer(embedded_data_dir, tmp_path):
    from conftest import bignlp_cmd

    tokenizer = embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024"
    proc = subprocess.run(
        bignlp_cmd("train", "tiny", f"run.dir={tmp_path / 'run'}", "model.vocab_size=512",
                   f"data.tokenizer={tokenizer}"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.vocab_size=512 does not match the tokenizer's vocabulary of 1024" in proc.stderr
    assert "Traceback" not in proc.stderr
