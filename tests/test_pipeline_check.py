"""Pipeline wiring that cannot work is refused when the file is loaded (one line, exit 2), not
met mid-run as a traceback. No training."""

from __future__ import annotations

import pytest

from bignlp_jax.errors import UserError
from bignlp_jax.pipeline.spec import Pipeline


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
