"""Implicit-reward accuracy on the held-out pairs of the embedded preference task.

After `bignlp-jax pipeline pipelines/align output_dir=OUT ...`, scores each trained stage of OUT
(pretrain, finetune, align) as the policy of `configs/align_stdlib.yaml` against a fixed
reference, and prints TRL's reward metrics (means over all held-out pairs) as JSON lines:

    PYTHONPATH=. python benchmarks/dpo_reward_accuracy.py OUT

Against the pretrained model as reference the three policies are comparable (the pretrained
policy ties every pair: accuracy 0); against the finetuned model (the DPO run's own reference)
the aligned policy's figure is the one its `eval` reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bignlp_jax.checkpoint import load_params
from bignlp_jax.config import load_config
from bignlp_jax.data.tasks.source import make_task_source
from bignlp_jax.train.loop import Trainer


def main(out: Path) -> None:
    for reference in ("pretrain", "finetune"):
        cfg = load_config("align_stdlib", [
            f"init_from={out / reference}", f"data.tokenizer={out / 'tokenizer'}",
            f"run.dir={out / 'scratch'}"])
        trainer = Trainer.build(cfg)
        trainer.load_reference()
        for policy in ("pretrain", "finetune", "align"):
            params = load_params(out / policy, cfg.model, trainer.state_sh.params)
            source = make_task_source(cfg, "validation", trainer.rows)
            found = trainer.evaluate_pairs(params, source, None)
            print(json.dumps({"policy": policy, "reference": reference, **{
                k.removeprefix("eval_"): round(v, 4) for k, v in found.items()}}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
