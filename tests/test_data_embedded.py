"""The embedded corpora: the same documents on every run, a learnable, balanced label set."""

import collections
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from bignlp_jax.data.corpora import embedded
from bignlp_jax.data.tfds.source import open_split, text_of

DIGEST = """
import hashlib, json
from bignlp_jax.data.corpora import embedded
modules, docs = embedded.clean_examples()
print(hashlib.sha256(json.dumps([modules, docs], sort_keys=True).encode()).hexdigest())
"""


@pytest.mark.slow
def test_same_documents_whatever_the_hash_seed():
    """The corpora come from sorted modules, members and topics, never from set/dict order that
    string hashing could change, nor from what this (test) process imported before:
    another process with another hash seed gets the same bytes."""
    namespace: dict = {}
    with redirect_stdout(io.StringIO()) as here:
        exec(DIGEST, namespace)
    seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "1"
    there = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
    assert here.getvalue() == there and len(there.strip()) == 64


def test_module_task_labels_and_splits(embedded_data_dir):
    examples = embedded.module_examples()
    train, validation = examples["train"], examples["validation"]
    counts = collections.Counter(e["label"] for e in train)
    assert sorted(counts) == sorted(embedded.LABELS)
    assert min(counts.values()) >= 40  # enough to learn every label
    assert max(counts.values()) / len(train) < 0.25  # majority baseline well below chance x2
    assert 0.15 < len(validation) / (len(train) + len(validation)) < 0.25
    assert not {e["text"] for e in train} & {e["text"] for e in validation}
    # The TFDS dataset holds exactly these records.
    stored = open_split("stdlib_modules", embedded_data_dir, "validation", ("text", "label"))
    got = sorted((text_of(stored[i], "text"), text_of(stored[i], "label"))
                 for i in range(len(stored)))
    assert got == sorted((e["text"], e["label"]) for e in validation)
    # Pretraining text never contains a finetuning validation text.
    docs = open_split("stdlib_docs", embedded_data_dir, "train")
    held_out = {e["text"] for e in validation}
    sample = [text_of(docs[i], "text") for i in range(len(docs))]
    assert len(sample) > 2000
    from bignlp_jax.data.corpora.stdlib_corpus import summary

    assert not any(summary(t) in held_out for t in sample)
    info_file = embedded_data_dir / "stdlib_docs" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_file.read_text())
    assert {s["name"] for s in info["splits"]} == {"train", "validation"}
