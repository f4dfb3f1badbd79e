"""Write our SentencePiece tokenizer so `transformers.AutoTokenizer` loads it and encodes alike.

We do not use `LlamaTokenizer`: it hard-wires Llama's own pipeline (BPE, no normalisation) and
would ignore the model's normaliser spec. The generic `PreTrainedTokenizerFast` (transformers 5:
`TokenizersBackend`) follows the SentencePiece model's own settings. We write

- `tokenizer.model`: the SentencePiece model itself;
- `tokenizer_config.json` / `special_tokens_map.json`: class, special tokens, max length;
- `tokenizer.json`: the `tokenizers` pipeline, converted by transformers' own SentencePiece
  converter when transformers is installed (then loading needs neither sentencepiece nor
  protobuf, and transformers 4.x can load it too). Without transformers, transformers 5
  converts `tokenizer.model` the same way when it loads the directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from bignlp_jax import storage
from bignlp_jax.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
SPECIALS = ("bos", "eos", "unk", "pad")


def resolve_tokenizer(tokenizer: Any):
    """A loaded tokenizer from a `Tokenizer`, a .model file, a tokenizer dir or a run dir."""
    if hasattr(tokenizer, "model_path"):
        return tokenizer
    return load_tokenizer(tokenizer)


def special_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/unk/pad ids (None where the SentencePiece model has none: it reports -1)."""
    ids = {k: getattr(tokenizer, f"{k}_id", None) for k in SPECIALS}
    return {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}


def write_hf_tokenizer(tokenizer: Any, out_dir: str | Path, model_max_length: int) -> dict:
    """Write the Hugging Face tokenizer files for `tokenizer`; returns its special token ids."""
    tok = resolve_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage.copy_file(tok.model_path, out / "tokenizer.model")
    ids = special_ids(tok)
    tokens = {f"{k}_token": tok.sp.id_to_piece(i) for k, i in ids.items() if i is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        # Every training document starts with <s> (and `bignlp-jax generate` prompts do), so the
        # tokenizer adds it, as Llama's does; encode(..., add_special_tokens=False) is our encode().
        "add_bos_token": ids["bos"] is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    _write_tokenizer_json(out, tokens.get("bos_token"), ids["bos"])
    return ids


def _write_tokenizer_json(out: Path, bos: str | None, bos_id: int | None) -> None:
    try:
        from transformers import AutoTokenizer  # optional, and seconds to import
    except ImportError:
        log.info("transformers is not installed: wrote tokenizer.model only (transformers 5 "
                 "converts it on load)")
        return
    try:  # the directory is local and complete: never look anything up online
        converted = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        backend = converted.backend_tokenizer
        if bos is not None:
            from tokenizers import processors  # comes with transformers

            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        backend.save(str(out / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - the weights are still good: keep the export
        # e.g. transformers 4.x, which has no generic SentencePiece converter
        print(f"warning: transformers {transformers_version()} could not convert "
              f"{out / 'tokenizer.model'} to tokenizer.json ({e}); transformers 5 loads "
              "tokenizer.model directly", file=sys.stderr)


def transformers_version() -> str:
    import transformers  # optional, and seconds to import

    return transformers.__version__
