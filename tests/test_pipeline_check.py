"""Pipeline wiring that cannot work is refused when the file is loaded (one line, exit 2), not
met mid-run as a traceback; and the report covers every kind of finetuning stage. No training."""

from __future__ import annotations

import json

import pytest

from bignlp_jax.errors import UserError
from bignlp_jax.pipeline.fingerprint import fingerprint
from bignlp_jax.pipeline.spec import Pipeline
from bignlp_jax.pipeline.state import RESULTS_FILE, record


@pytest.mark.parametrize("overrides, message", [
    (["pretrain.data.tfds_name=null"],
     r"tokenizer stage trains on pretrain's data.tfds_name, but pretrain has no "
     r"data.tfds_name\n  fix: set pretrain.data.tfds_name"),
    (["pretrain.data.tfds_name=null", "pretrain.data.mixture={stdlib_docs: 1.0}"],
     r"but pretrain reads a data.mixture\n  fix: set tokenizer: null"),
])
def test_tokenizer_stage_needs_one_pretraining_dataset(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *overrides])


def test_export_stage_needs_a_training_stage(tmp_path):
    no_training = ["pretrain=null", "finetune=null", "finetune_scratch=false", "tokenizer=null"]
    with pytest.raises(UserError, match=r"export stage exports the trained model, but the "
                                        r"pipeline has no pretrain or finetune stage"):
        Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *no_training])
    # without the export stage the same pipeline is valid (and has nothing to run)
    assert Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", *no_training,
                                            "export=null"]).stages() == []


def test_report_of_a_language_modelling_finetune(tmp_path):
    from bignlp_jax.pipeline.report import build_report

    p = Pipeline.load("pipelines/mini", [f"output_dir={tmp_path}", "finetune.task=null"])
    results = {s: {"task": "language_modelling", "loss": 1.25 + i, "perplexity": 3.49 + i,
                   "batches": 1, "step": 3}
               for i, s in enumerate(("pretrain", "finetune", "finetune_scratch"))}
    (tmp_path / "evaluate").mkdir(parents=True)
    (tmp_path / "evaluate" / RESULTS_FILE).write_text(json.dumps(results))
    for stage in p.stages():
        record(p, stage, "done", 1.0, "", fingerprint(p, stage), {})
    report = build_report(p)
    assert "(language_modelling), 3 steps; evaluated on 1 held-out batches." in report
    assert "| model | validation loss | perplexity |" in report
    assert "| finetuned from pretrained | 2.250 | **4.49** |" in report
    assert "| finetuned from random init | 3.250 | **5.49** |" in report
