"""SentencePiece tokenizers: train one, load one, and describe it in a small JSON.

A tokenizer directory holds `tokenizer.model` (the SentencePiece model) and `tokenizer.json` (what
`Tokenizer.describe()` returns: vocab size, model type, special ids, sha256 of the model). Runs
copy that directory into `RUN_DIR/tokenizer/` so generation and export find the exact tokenizer.

Special ids are fixed for every tokenizer we train, so configs and finetuning formats can rely
on them:

    0 <pad>   padding (never a target)
    1 <unk>   unknown (unused in practice: byte fallback covers every character)
    2 <s>     beginning of a document
    3 </s>    end of a document, and end of a finetuning target
    4 <sep>   separates a finetuning prompt from its target
    5 "\n"    newline as one token (SentencePiece would otherwise need a byte for it)

Text is not normalised (`identity` rule, whitespace kept), so decode(encode(s)) == s for any s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from bignlp_jax import storage
from bignlp_jax.containment import contained
from bignlp_jax.errors import UserError
from bignlp_jax.rundir import TOKENIZER, RunDir

MODEL_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID, NEWLINE_ID = 0, 1, 2, 3, 4, 5
SEP_PIECE = "<sep>"
MODEL_TYPES = ("bpe", "unigram")
# SentencePiece drops training sentences longer than this (bytes); we split long lines first.
_MAX_SENTENCE_BYTES = 4096


class Tokenizer:
    """A loaded SentencePiece model with our fixed special ids."""

    def __init__(self, model_path: str | Path):
        self.model_path = storage.path(model_path)
        # read through the path layer: the model may sit in a bucket (a run dir on gs://)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_path.read_bytes())
        self.vocab_size = int(self.sp.get_piece_size())
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.sep_id: int | None = self.sp.piece_to_id(SEP_PIECE)
        if self.sep_id == self.unk_id:  # a SentencePiece model not trained by us
            self.sep_id = None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (pad, bos, eos, sep) are dropped."""
        return self.sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        """The JSON written next to the model (and into every run that uses it)."""
        from sentencepiece import sentencepiece_model_pb2 as model_pb2  # loads protobuf

        model = self.sp.serialized_model_proto()
        # protobuf-generated classes: invisible to type checkers
        spec = model_pb2.ModelProto.FromString(model).trainer_spec  # type: ignore[attr-defined]
        return {
            "format": "sentencepiece",
            "model_file": MODEL_FILE,
            "model_sha256": hashlib.sha256(model).hexdigest(),
            "model_type": model_pb2.TrainerSpec.ModelType.Name(  # type: ignore[attr-defined]
                spec.model_type).lower(),
            "vocab_size": self.vocab_size,
            "byte_fallback": bool(spec.byte_fallback),
            "special_ids": {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id,
                            "eos": self.eos_id, "sep": self.sep_id},
        }

    def save(self, out_dir: str | Path) -> Path:
        """Copy the model into `out_dir` with its JSON; returns the directory."""
        out = storage.path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not storage.same(self.model_path, out / MODEL_FILE):
            storage.copy_file(self.model_path, out / MODEL_FILE)
        # Keep what the original JSON adds (e.g. `trained_on`); the model's own facts win.
        info, source_json = {}, self.model_path.parent / JSON_FILE
        if source_json.is_file():
            try:
                info = json.loads(source_json.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                info = {}
        info.update(self.describe())
        (out / JSON_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return out


def find_model_file(path: str | Path) -> Path:
    """The `.model` file for a path: the file itself, a tokenizer dir, or a run dir."""
    p = storage.path(os.path.expanduser(path))
    # a run directory's tokenizer/ may not lead outside the run (a symlink from elsewhere)
    run_tokenizer = (contained(p, f"{TOKENIZER}/{MODEL_FILE}") if p.is_dir()
                     else RunDir(p).tokenizer)
    for candidate in (p, p / MODEL_FILE, run_tokenizer):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"no SentencePiece tokenizer at {p}\n"
        f"  looked for: {p} (a .model file), {p / MODEL_FILE}, {RunDir(p).tokenizer / MODEL_FILE}\n"
        "  fix: train one with `bignlp-jax tokenizer train --input FILES --vocab-size N --out DIR`"
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a `.model` file, a tokenizer directory, or a run directory."""
    model = find_model_file(path)
    try:
        return Tokenizer(model)
    except (RuntimeError, OSError) as e:
        raise UserError(f"{model} is not a readable SentencePiece model: {e}") from None


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: the non-empty lines of every text, long lines cut into pieces."""
    for text in texts:
        for line in text.split("\n"):
            while len(line.encode("utf-8")) > _MAX_SENTENCE_BYTES:
                cut = line.rfind(" ", 0, _MAX_SENTENCE_BYTES // 4) + 1 or _MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                    model_type: str = "bpe") -> Tokenizer:
    """Train a SentencePiece model on `texts` and write it (with its JSON) to `out_dir`.

    Training is deterministic for the same texts (one thread, no sampling): the same texts give
    the same model bytes on every machine with the same SentencePiece version. The directory is
    written atomically (temporary directory, then rename) so concurrent runs never see half of it.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"tokenizer model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    # Byte fallback needs 256 byte pieces plus our specials; below that SentencePiece fails.
    if vocab_size < 300:
        raise UserError(f"tokenizer vocab size {vocab_size} is too small: byte fallback alone "
                        "needs 256 + 6 special pieces; use at least 300 (e.g. 1024)")
    sentences = list(_sentences(texts))
    if not sentences:
        raise UserError("tokenizer training input has no text (every document is empty)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model = io.BytesIO()
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                # In memory: a model_prefix would be stored in the model and change its bytes.
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=0.9995,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                user_defined_symbols=[SEP_PIECE, "\n"],
                max_sentence_length=_MAX_SENTENCE_BYTES * 4,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise UserError(
                f"SentencePiece could not train a {model_type} tokenizer with vocab size "
                f"{vocab_size} on {len(sentences)} lines: {e}\n"
                "  fix: change --vocab-size as SentencePiece asks above, or give more text"
            ) from None
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        tok = Tokenizer(tmp / MODEL_FILE)
        tok.save(tmp)
        storage.install_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out)
