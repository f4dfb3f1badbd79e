"""`data prepare`: local files -> TFDS ArrayRecord datasets readable by name; bad input."""

import json
import subprocess

import pytest

from bignlp_jax.cli import main
from bignlp_jax.config import load_config
from bignlp_jax.data.tfds.local_files import prepare_local
from bignlp_jax.data.tfds.source import open_split, text_of
from bignlp_jax.errors import UserError


def read_all(name, data_dir, fields=("text",)):
    import tensorflow_datasets as tfds

    splits = tfds.data_source(name, data_dir=str(data_dir))  # by name, no TensorFlow
    return {split: [{f: text_of(src[i], f) for f in fields} for i in range(len(src))]
            for split, src in splits.items()}


def test_prepare_text_files_readable_by_name(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * (i % 5) for i in range(30)]
    for f in range(3):
        (tmp_path / f"part{f}.txt").write_text("\n\n".join(paragraphs[f::3]) + "\n")
    rc = main(["data", "prepare", "--input", str(tmp_path / "part*.txt"), "--name", "my_text",
               "--data-dir", str(tmp_path / "data"), "--text-unit", "paragraph",
               "--validation-fraction", "0.2"])
    assert rc == 0
    splits = read_all("my_text", tmp_path / "data")
    assert set(splits) == {"train", "validation"} and splits["validation"] and splits["train"]
    texts = sorted(r["text"] for rows in splits.values() for r in rows)
    assert texts == sorted(paragraphs)  # every paragraph exactly once, as written
    assert any(p.name.endswith("array_record-00000-of-00001")
               for p in (tmp_path / "data" / "my_text" / "1.0.0").iterdir())


def test_prepare_jsonl_and_parquet_keep_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"example {i} " * (1 + i % 3), "label": ["neg", "pos"][i % 2], "n": i}
            for i in range(24)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:12]) + "\n")
    pq.write_table(pa.Table.from_pylist(rows[12:]), tmp_path / "b.parquet")
    result = prepare_local([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], "mixed",
                           tmp_path / "data", text_key="body", fields=["label"])
    assert result["fields"] == ["body", "label"] and sum(result["splits"].values()) == 24
    splits = read_all("mixed", tmp_path / "data", fields=("body", "label"))
    got = sorted((r["body"], r["label"]) for rows_ in splits.values() for r in rows_)
    assert got == sorted((r["body"], r["label"]) for r in rows)
    with pytest.raises(UserError, match="already exists"):
        prepare_local([str(tmp_path / "a.jsonl")], "mixed", tmp_path / "data", text_key="body")
    # open_split names the feature it could not find, and those that exist.
    with pytest.raises(UserError, match=r"no feature 'text' \(features: body, label\)"):
        open_split("mixed", tmp_path / "data", "train", required_keys=("text",))


@pytest.mark.parametrize("make_input, args, message", [
    (None, [], "matches no files"),
    (lambda p: (p / "x.txt").write_bytes(b"fine\ncaf\xe9\n"), [],
     "is not UTF-8 text: byte 8 (line 2)"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n'), [],
     "x.jsonl:2 has no field 'text' (fields: body)"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a"}\n{oops\n'), [],
     "x.jsonl:2 is not valid JSON"),
    (lambda p: (p / "x.txt").write_text("a\n\nb\n"), ["--name", "Bad Name"],
     "dataset name 'Bad Name'"),
])
def test_prepare_bad_input_one_message_exit_2(tmp_path, capsys, make_input, args, message):
    if make_input:
        make_input(tmp_path)
    argv = ["data", "prepare", "--input", str(tmp_path / "x.*"), "--data-dir",
            str(tmp_path / "data"), "--text-unit", "paragraph"]
    argv += args if "--name" in args else ["--name", "x", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


@pytest.mark.slow
def test_cli_exit_code_2_for_non_utf8_file(tmp_path):
    from conftest import bignlp_cmd

    (tmp_path / "latin1.txt").write_bytes("naïve résumé\n".encode("latin-1"))
    proc = subprocess.run(bignlp_cmd("data", "prepare", "--input", str(tmp_path / "*.txt"),
                                     "--name", "latin", "--data-dir", str(tmp_path / "d")),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "latin1.txt is not UTF-8 text: byte 2 (line 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_data_errors_name_what_was_looked_for(tmp_path, embedded_data_dir):
    from bignlp_jax.data import make_source

    def source(*overrides):
        cfg = load_config("tiny", [f"run.dir={tmp_path}", *overrides])
        return make_source(cfg, "train", (0, 8))

    with pytest.raises(UserError, match=f"data directory {tmp_path / 'nope'} does not exist"):
        source("data.tfds_name=my_corpus", f"data.data_dir={tmp_path / 'nope'}",
               f"data.tokenizer={tmp_path}")
    with pytest.raises(UserError, match=r"dataset 'my_corpus' not found in .*\n  looked for: "
                                        r".*my_corpus\n  available there: .*stdlib_docs"):
        source("data.tfds_name=my_corpus", f"data.tokenizer={embedded_data_dir}/tokenizers/"
               "stdlib_docs_bpe_1024")
    with pytest.raises(UserError, match="has no split 'test'; it has: train, validation"):
        source("data.split=test")
    with pytest.raises(UserError, match="has no feature 'body'"):
        source("data.text_key=body")
    prepare_local([str(_write(tmp_path / "t.txt", "one\n\ntwo\n\nthree\n"))], "mine",
                  embedded_data_dir, text_unit="paragraph")
    with pytest.raises(UserError, match="data.tokenizer is not set, and dataset 'mine'"):
        source("data.tfds_name=mine")
    with pytest.raises(UserError, match="no SentencePiece tokenizer at"):
        source(f"data.tokenizer={tmp_path / 'missing'}")


def _write(path, text):
    path.write_text(text)
    return path
