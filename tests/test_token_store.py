"""Token stores: built once (the same for any number of workers), never read with another
tokenizer, damaged files named with the command that rebuilds them, interrupted builds invisible."""

import json
import shutil

import numpy as np
import pytest

from bignlp_jax.cli import main
from bignlp_jax.data.store import build as token_build
from bignlp_jax.data.store import token_store
from bignlp_jax.data.store.build import write_store
from bignlp_jax.data.store.manifest import MANIFEST, OFFSETS, TOKENS
from bignlp_jax.data.store.token_store import TokenStore
from bignlp_jax.errors import UserError

DOCS = [np.array([2, *range(10, 10 + n), 3]) for n in (5, 0, 17, 3)]


def make(tmp_path, name="s"):
    return write_store(tmp_path / name, DOCS, dataset="d", split="train",
                       tokenizer_sha256="a" * 64, vocab_size=1024)


def test_store_round_trips_documents(tmp_path):
    store = TokenStore(make(tmp_path), "a" * 64)
    assert store.tokens.dtype == np.uint16 and store.num_documents == 4
    for d, doc in enumerate(DOCS):
        np.testing.assert_array_equal(store.tokens[store.offsets[d]:store.offsets[d + 1]], doc)
    # the tokens are checked chunk by chunk when read, so opening never hashes them
    assert len(store.manifest["chunks"]["crc32"]) == 1 and not (store.path / "verified.json").exists()


def test_store_of_another_tokenizer_is_refused_naming_both(tmp_path):
    with pytest.raises(UserError, match=f"tokenizer sha256 {'a' * 64} but this run's tokenizer "
                                        f"has sha256 {'b' * 64}"):
        TokenStore(make(tmp_path), "b" * 64, rebuild="bignlp-jax data tokenize --name d")


@pytest.mark.parametrize("damage", ["truncate", "flip", "offsets", "manifest"])
def test_damaged_store_names_the_file_and_the_rebuild_command(tmp_path, damage):
    path = make(tmp_path)
    TokenStore(path)  # verified once
    target = {"truncate": TOKENS, "flip": TOKENS, "offsets": OFFSETS, "manifest": MANIFEST}[damage]
    data = bytearray((path / target).read_bytes())
    if damage == "truncate":
        data = data[:-6]
    else:
        data[-3] ^= 0xFF
    (path / target).write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        store = TokenStore(path, rebuild="bignlp-jax data tokenize --name d --split train")
        store.pairs(np.arange(len(store.tokens) - 1))  # a flip is caught when it is read
    message = str(e.value)
    assert f"token store file {path / target} is" in message
    assert "bignlp-jax data tokenize --name d --split train" in message
    assert len(message.splitlines()) == 2


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, embedded_data_dir,
                                                               monkeypatch):
    from bignlp_jax.data.tfds.source import open_split
    from bignlp_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024")
    data_dir = tmp_path / "data"
    shutil.copytree(embedded_data_dir / "stdlib_docs", data_dir / "stdlib_docs")
    n = len(open_split("stdlib_docs", data_dir, "validation"))
    spec = token_store.StoreSpec("stdlib_docs", str(data_dir), "validation", "text",
                                 str(tok.model_path), tok.describe()["model_sha256"])

    def killed(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(token_build, "_encode_range", killed)
    with pytest.raises(KeyboardInterrupt):
        token_build.build_store(spec, n, tok.vocab_size)
    stores = data_dir / "token_stores" / "stdlib_docs"
    assert not list(stores.glob("*/" + MANIFEST)) and not list(stores.glob(".tmp-*"))
    # A process killed outright leaves its .tmp-* directory: not a store, removed next time.
    monkeypatch.undo()
    final = token_store.store_dir(spec, token_store.dataset_identity(
        "stdlib_docs", data_dir, "validation", "text", n))
    (stores / f".tmp-{final.name}-x").mkdir()
    path = token_build.build_store(spec, n, tok.vocab_size)
    assert path == final and not list(stores.glob(".tmp-*"))
    one = TokenStore(path, spec.tokenizer_sha256)
    # Two workers write the same store, byte for byte.
    two = token_build.build_store(spec, n, tok.vocab_size, workers=2, overwrite=True)
    assert json.loads((two / MANIFEST).read_text())["sha256"] == one.manifest["sha256"]


def test_cli_tokenize_and_damaged_store_exit_2(tmp_path, embedded_data_dir, capsys):
    data_dir = tmp_path / "data"
    shutil.copytree(embedded_data_dir / "stdlib_docs", data_dir / "stdlib_docs")
    tokenizer = str(embedded_data_dir / "tokenizers" / "stdlib_docs_bpe_1024")
    args = ["data", "tokenize", "--name", "stdlib_docs", "--data-dir", str(data_dir),
            "--tokenizer", tokenizer, "--split", "validation", "--workers", "1"]
    assert main(args) == 0
    stores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stores"]
    path = stores[0]["path"]
    with open(f"{path}/{TOKENS}", "r+b") as f:
        f.truncate(100)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"token store file {path}/{TOKENS} is 100 bytes" in err
    assert f"bignlp-jax data tokenize --name stdlib_docs --data-dir {data_dir}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    command = err.split("fix: rebuild it: bignlp-jax ")[1].split()
    assert command[-1] == "--overwrite"
    assert main(command) == 0  # the command in the message repairs the store
    assert main(args) == 0
