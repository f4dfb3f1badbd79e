"""Dump the compiled train step of a stage=1 config (HLO text) to compare two commits.

Pipeline parallelism must leave the stage=1 program unchanged; the proof is that the compiled
HLO of the same config is the same text before and after (module ids aside).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/stage1_hlo.py OUT.txt [overrides ...]
"""

from __future__ import annotations

import re
import sys

from bignlp_jax.config import load_config
from bignlp_jax.model.lora import LoraSpec
from bignlp_jax.perf.plan import abstract_batch
from bignlp_jax.train.loop import Trainer
from bignlp_jax.train.state import abstract_state


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config("models/tiny_llama.yaml", ["model.num_layers=4",
                                    "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                                    "train.global_batch_size=8", "data.seq_len=32", *overrides])
    trainer = Trainer.build(cfg)
    state = abstract_state(cfg.model, trainer.tx, trainer.state_sh,
                           LoraSpec.from_config(cfg.lora))
    text = trainer.train_step.lower(state, abstract_batch(cfg, trainer.batch_sh)).compile(
    ).as_text()
    # the module name carries a process-specific id; source locations (metadata, the file /
    # function / stack-frame tables) name Python lines, which move when code is edited
    text = re.sub(r"^HloModule \S+", "HloModule step", text, flags=re.M)
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(?:\d.*\n)*", "",
                  text, flags=re.M)
    with open(out, "w") as f:
        f.write(text)
    print(f"{out}: {len(text.splitlines())} lines")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
