"""Stage fingerprints: what a stage's output was made from, so a rerun knows what is stale.

A stage's fingerprint hashes its own resolved settings (a training stage: its whole resolved
run config, steps included; the tokenizer: its data and vocabulary size; export: format and
dtype) together with the fingerprints of the stages it reads (tokenizer -> pretrain ->
finetune, ...). Changing anything upstream therefore changes every fingerprint downstream, and
a stage is skipped only when its recorded fingerprint is the current one (stages.py).

What is hashed is the configuration, not file contents: a dataset rewritten in place under the
same data dir and name is not noticed (rename it, or change `output_dir`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bignlp_jax.pipeline.spec import TRAIN_STAGES, Pipeline

# Which stages each stage reads (when the pipeline has them).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "pretrain": ("tokenizer",),
    "finetune": ("tokenizer", "pretrain"),
    "finetune_scratch": ("tokenizer",),
    "align": ("tokenizer", "finetune"),
    "evaluate": TRAIN_STAGES,
    "export": (),  # the final training stage, added in upstream()
    "lm_eval": (),  # the training stages it evaluates, added in upstream()
}


def upstream(p: Pipeline, stage: str) -> list[str]:
    """The stages of this pipeline whose outputs `stage` reads."""
    names = list(UPSTREAM[stage])
    if stage == "export" and (final := p.final_run()) is not None:
        names.append(final)
    if stage == "lm_eval":
        names += p.lm_eval_models()
    present = p.stages()
    return [s for s in names if s in present]


def own_settings(p: Pipeline, stage: str) -> dict[str, Any]:
    """The settings that decide `stage`'s output apart from its inputs."""
    if stage in TRAIN_STAGES:
        return p.run_config(stage).model_dump(mode="json")
    if stage == "tokenizer":
        assert p.spec.tokenizer is not None  # a tokenizer stage exists only with its section
        data = p.run_config("pretrain").data
        return {"tokenizer": p.spec.tokenizer.model_dump(mode="json"),
                "vocab_size": p.run_config("pretrain").model.vocab_size,
                "data": {k: getattr(data, k)
                         for k in ("source", "tfds_name", "data_dir", "split", "text_key")}}
    if stage == "evaluate":
        return {}  # what it evaluates is in its inputs; task settings are in their configs
    if stage == "export":
        assert p.spec.export is not None  # an export stage exists only with its section
        return p.spec.export.model_dump(mode="json")
    if stage == "lm_eval":
        assert p.spec.lm_eval is not None  # an lm_eval stage exists only with its section
        return p.spec.lm_eval.model_dump(mode="json")
    raise ValueError(f"unknown pipeline stage {stage!r}")


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def input_fingerprints(p: Pipeline, stage: str) -> dict[str, str]:
    """{upstream stage: its fingerprint} for the stages `stage` reads."""
    return {s: fingerprint(p, s) for s in upstream(p, stage)}


def fingerprint(p: Pipeline, stage: str) -> str:
    """Hash of the stage's own settings and its inputs' fingerprints (16 hex digits)."""
    return _digest({"stage": stage, "settings": own_settings(p, stage),
                    "inputs": input_fingerprints(p, stage)})


def downstream(p: Pipeline, stage: str) -> list[str]:
    """Stages that read `stage`'s output, directly or through others, in run order."""
    found: list[str] = []
    for later in p.stages():
        if stage in upstream(p, later) or any(s in upstream(p, later) for s in found):
            found.append(later)
    return found
