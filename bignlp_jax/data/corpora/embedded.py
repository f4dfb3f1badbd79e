"""The embedded default corpora: built from the standard library, so nothing is downloaded.

`stdlib_docs` (pretraining; features `text`, `source`)
    The language reference topics of `pydoc_data.topics` and the docstrings (at least 40
    characters) of the modules in `stdlib_corpus.PRETRAIN_MODULES`, one document each.
    Split by content hash: sha1(text) mod 20 == 0 -> `validation`, else `train`. Docstrings whose
    summary is a `stdlib_modules` validation text are left out, so finetuning is evaluated on
    text the pretrained model never read.

`stdlib_chat` (chat finetuning; features `messages` (JSON text), `label`)
    Each `stdlib_modules` example as a conversation (same splits): a system message, "Which
    package documents this?\n{text}" -> the package, "Which object's docstring is it?" -> the
    docstring's qualified name.

`stdlib_preference` (preference tuning; features `prompt`, `chosen`, `rejected`, `label`)
    Each `stdlib_modules` example as a pair (same splits): prompt "{text}\nPackage:", chosen
    the right package, rejected another of the eight, picked by sha1(text).

`stdlib_modules` (finetuning classification; features `text`, `label`, `source`)
    text = the summary (leading paragraphs, <= 400 characters) of a docstring from one of eight
    packages, label = that package's name, one of:
        asyncio, email, http, importlib, logging, unittest, urllib, xml
    (roughly 100-270 examples each, about 1,500 in all; the majority label is under 20%).
    A summary found in two packages is dropped. Per label, examples sorted by sha1(text): every
    fifth (index % 5 == 0) -> `validation` (about 20%), the rest -> `train`.

Both are functions of the Python minor version alone (sorted modules, members and topics; no
hash randomness), written by our TFDS builder into `data_dir` on first use (`ensure_embedded`).
`embedded_tokenizer` trains the default SentencePiece tokenizer on `stdlib_docs` train.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bignlp_jax.data.corpora import stdlib_corpus
from bignlp_jax.data.tfds.builder import write_dataset
from bignlp_jax.data.tfds.source import open_split, text_of
from bignlp_jax.data.tokenizer import MODEL_FILE, train_tokenizer

DOCS, MODULES, CHAT = "stdlib_docs", "stdlib_modules", "stdlib_chat"
PREFERENCE = "stdlib_preference"
EMBEDDED = (DOCS, MODULES, CHAT, PREFERENCE)
CHAT_SYSTEM = "You name the Python standard-library package that documents a text."
VERSION = "1.0.0"
LABELS = stdlib_corpus.LABEL_PACKAGES


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def module_examples() -> dict[str, list[dict[str, str]]]:
    """The `stdlib_modules` task: {split: [{text, label, source}]}, in a fixed order."""
    by_label: dict[str, list[dict[str, str]]] = {}
    owners: dict[str, set[str]] = {}
    for label in LABELS:
        seen = set()
        for qualname, doc in stdlib_corpus.package_docstrings(label):
            text = stdlib_corpus.summary(doc)
            if len(text) < stdlib_corpus.MIN_DOC_CHARS or text in seen:
                continue
            seen.add(text)
            owners.setdefault(text, set()).add(label)
            by_label.setdefault(label, []).append({"text": text, "label": label,
                                                   "source": qualname})
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for label in LABELS:
        unique = [e for e in by_label.get(label, []) if len(owners[e["text"]]) == 1]
        for i, example in enumerate(sorted(unique, key=lambda e: _sha1(e["text"]))):
            splits["validation" if i % 5 == 0 else "train"].append(example)
    return splits


def chat_examples(modules: dict[str, list[dict[str, str]]]) -> dict[str, list[dict[str, str]]]:
    """The `stdlib_chat` task: `stdlib_modules` as two-turn conversations, {split: [{messages
    (JSON text), label}]}: which package documents this text, then which object."""

    def conversation(e: dict[str, str]) -> str:
        return json.dumps([
            {"role": "system", "content": CHAT_SYSTEM},
            {"role": "user", "content": f"Which package documents this?\n{e['text']}"},
            {"role": "assistant", "content": e["label"]},
            {"role": "user", "content": "Which object's docstring is it?"},
            {"role": "assistant", "content": e["source"]},
        ])

    return {split: [{"messages": conversation(e), "label": e["label"]} for e in records]
            for split, records in modules.items()}


def preference_examples(modules: dict[str, list[dict[str, str]]]
                        ) -> dict[str, list[dict[str, str]]]:
    """The `stdlib_preference` task: `stdlib_modules` as pairs, {split: [{prompt, chosen,
    rejected, label}]}: the right package preferred over a wrong one."""

    def pair(e: dict[str, str]) -> dict[str, str]:
        others = [label for label in LABELS if label != e["label"]]
        wrong = others[int(_sha1(e["text"]), 16) % len(others)]
        return {"prompt": f"{e['text']}\nPackage:", "chosen": e["label"], "rejected": wrong,
                "label": e["label"]}

    return {split: [pair(e) for e in records] for split, records in modules.items()}


def docs_examples(exclude: set[str]) -> dict[str, list[dict[str, str]]]:
    """The `stdlib_docs` corpus: {split: [{text, source}]}; docstrings in `exclude` left out."""
    documents = stdlib_corpus.pydoc_topics()
    seen = {text for _, text in documents}
    for name in sorted(set(stdlib_corpus.PRETRAIN_MODULES)):
        for qualname, text in stdlib_corpus.package_docstrings(name):
            if text not in seen and stdlib_corpus.summary(text) not in exclude:
                seen.add(text)
                documents.append((qualname, text))
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for source, text in documents:
        split = "validation" if int(_sha1(text), 16) % 20 == 0 else "train"
        splits[split].append({"text": text, "source": source})
    return splits


def _generators(splits: dict[str, list[dict[str, str]]]):
    def make(records: list[dict[str, str]]):
        def gen() -> Iterator[tuple[str, dict[str, str]]]:
            for i, record in enumerate(records):
                yield f"{i:07d}", record

        return gen

    return {split: make(records) for split, records in splits.items()}


@contextlib.contextmanager
def _lock(data_dir: Path):
    """Serialise builders across processes sharing `data_dir` (tests, several local hosts)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".bignlp_build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_built(name: str, data_dir: Path) -> bool:
    return (data_dir / name / VERSION / "dataset_info.json").is_file()


def examples() -> tuple[dict, dict]:
    """(stdlib_modules splits, stdlib_docs splits), computed in this process."""
    modules = module_examples()
    return modules, docs_examples({e["text"] for e in modules["validation"]})


def clean_examples() -> tuple[dict, dict]:
    """`examples()` computed in a fresh interpreter. In a process that has imported other
    libraries the stdlib is not pristine (transformers adds logging.Logger.warning_advice, torch
    wraps inspect.getfile), and the corpus must not depend on what was imported before."""
    code = ("import json; from bignlp_jax.data.corpora import embedded; "
            "print(json.dumps(embedded.examples()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"}).stdout
    modules, docs = json.loads(out.strip().splitlines()[-1])
    return modules, docs


def ensure_embedded(data_dir: str | Path) -> None:
    """Build the embedded datasets (EMBEDDED) under `data_dir` unless already there."""
    data_dir = Path(data_dir).expanduser()
    if all(is_built(n, data_dir) for n in EMBEDDED):
        return
    with _lock(data_dir):
        if all(is_built(n, data_dir) for n in EMBEDDED):
            return
        python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
        modules, docs = clean_examples()
        if not is_built(MODULES, data_dir):
            write_dataset(MODULES, data_dir, _generators(modules),
                          fields=("text", "label", "source"), version=VERSION, overwrite=True,
                          description=f"stdlib docstring -> package classification ({python})")
        if not is_built(DOCS, data_dir):
            write_dataset(DOCS, data_dir, _generators(docs),
                          fields=("text", "source"), version=VERSION, overwrite=True,
                          description=f"pydoc topics and stdlib docstrings ({python})")
        if not is_built(CHAT, data_dir):
            write_dataset(CHAT, data_dir, _generators(chat_examples(modules)),
                          fields=("messages", "label"), version=VERSION, overwrite=True,
                          description=f"stdlib_modules as conversations ({python})")
        if not is_built(PREFERENCE, data_dir):
            write_dataset(PREFERENCE, data_dir, _generators(preference_examples(modules)),
                          fields=("prompt", "chosen", "rejected", "label"), version=VERSION,
                          overwrite=True,
                          description=f"stdlib_modules as preference pairs ({python})")


def embedded_tokenizer(data_dir: str | Path, vocab_size: int, model_type: str = "bpe") -> Path:
    """Directory of the default tokenizer (trained on `stdlib_docs` train), built if missing."""
    data_dir = Path(data_dir).expanduser()
    out = data_dir / "tokenizers" / f"{DOCS}_{model_type}_{vocab_size}"
    if (out / MODEL_FILE).is_file():
        return out
    ensure_embedded(data_dir)
    with _lock(data_dir):
        if not (out / MODEL_FILE).is_file():
            source = open_split(DOCS, data_dir, "train")
            texts = [text_of(source[i], "text") for i in range(len(source))]
            train_tokenizer(texts, out, vocab_size, model_type)
    return out
