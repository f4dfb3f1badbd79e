"""Parameters from another model for a new run: `init_from` (a checkpoint, or `hf:DIR`), and
the check that a start from another run's weights uses that run's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from bignlp_jax import storage
from bignlp_jax.checkpoint.params import Params, load_params
from bignlp_jax.checkpoint.paths import resolve_step_dir
from bignlp_jax.config import Config
from bignlp_jax.data.tokenizer import JSON_FILE as TOKENIZER_JSON
from bignlp_jax.errors import UserError
from bignlp_jax.hf.weights import load_hf_params
from bignlp_jax.rundir import RunDir

HF_PREFIX = "hf:"  # init_from=hf:DIR reads a Hugging Face model directory


def load_init_params(cfg: Config, shardings: Params) -> Params:
    """Parameters for `init_from`: a checkpoint path (its run's tokenizer must be this run's),
    or `hf:DIR` (a Hugging Face model)."""
    spec = cfg.init_from
    if spec is None:
        raise ValueError("load_init_params needs a config with init_from")
    if spec.startswith(HF_PREFIX):
        # it checks the architecture, names and shapes itself, and places each tensor as read
        # safetensors reads local files: an `hf:gs://...` model is copied to a temporary dir,
        # removed once read (a large model's copy must not hold the disk for the whole run)
        source = spec[len(HF_PREFIX):]
        local = storage.fetch_dir(source)
        try:
            return load_hf_params(local, cfg.model, shardings=shardings)
        finally:
            if storage.is_remote(source):
                storage.rmtree(local.parent)
    check_tokenizer(cfg, resolve_step_dir(spec), f"init_from={spec}")
    return load_params(spec, cfg.model, shardings)


def check_tokenizer(cfg: Config, step_dir: Path, what: str) -> None:
    """Refuse to start from the weights of a run trained with another tokenizer: every token
    id would mean something else, and with equal vocabulary sizes nothing else would notice."""
    if cfg.data.source != "tfds":
        return  # synthetic data has no tokenizer to compare
    for run_dir in (step_dir.parent.parent, step_dir.parent, step_dir):
        recorded = RunDir(run_dir).tokenizer / TOKENIZER_JSON
        if recorded.is_file():
            break
    else:
        return  # a run without a recorded tokenizer (synthetic data): nothing to compare
    from bignlp_jax.data.dataset_choice import resolve_tokenizer  # tfds: tfds runs only

    tokenizer = resolve_tokenizer(cfg)
    theirs = json.loads(recorded.read_text(encoding="utf-8"))
    ours = tokenizer.describe()
    if theirs.get("model_sha256") != ours["model_sha256"]:
        raise UserError(
            f"{what} was trained with another tokenizer ({recorded}: vocab "
            f"{theirs.get('vocab_size')}, sha256 {str(theirs.get('model_sha256'))[:12]}) than "
            f"this run's ({tokenizer.model_path}: vocab {ours['vocab_size']}, sha256 "
            f"{ours['model_sha256'][:12]})\n"
            f"  fix: set data.tokenizer={run_dir} to use that run's tokenizer"
        )
