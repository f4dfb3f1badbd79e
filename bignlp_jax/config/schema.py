"""The typed configuration: one frozen pydantic model per section, joined into `Config`.

Every field has a type and, where it matters, a range; unknown keys are refused (`extra="forbid"`).
The sections live in architecture.py (model, mesh), sections.py (data, optimizer, train,
checkpoint, run) and finetune.py (task, lora); this module holds `Config`, which checks the
rules that span sections, and re-exports every section so `bignlp_jax.config.schema` names
them all.
`loader.py` turns YAML files plus dotted command-line overrides into a validated `Config`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from bignlp_jax.config.architecture import MeshConfig, ModelConfig
from bignlp_jax.config.finetune import LORA_TARGETS, DpoConfig, LoraConfig, TaskConfig
from bignlp_jax.config.sections import (
    CheckpointConfig,
    DataConfig,
    MixtureEntry,
    OptimizerConfig,
    RunConfig,
    Section,
    TrainConfig,
)

__all__ = [
    "LORA_TARGETS", "CheckpointConfig", "Config", "DataConfig", "DpoConfig", "LoraConfig",
    "MeshConfig", "MixtureEntry", "ModelConfig", "OptimizerConfig", "RunConfig", "Section",
    "TaskConfig", "TrainConfig",
]


def context_split_problem(length: int, sequence: int) -> str | None:
    """The one rule for splitting rows over `mesh.sequence` devices (context parallelism): the
    length must be a multiple of 2 x sequence, two equal chunks per device for an equal share
    of the causal work (model/context_attention.py). Checked on the config and on the arrays."""
    if length % (2 * sequence) == 0:
        return None
    return (f"data.seq_len={length} is not a multiple of 2 x mesh.sequence = 2 x {sequence} = "
            f"{2 * sequence} (context parallelism cuts each row into two equal chunks per "
            f"device)\n  fix: choose data.seq_len as a multiple of {2 * sequence}, or a smaller "
            "mesh.sequence")


class Config(Section):
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    init_from: str | None = Field(None, description="checkpoint to load parameters from")
    task: TaskConfig | None = Field(None, description="finetuning task; null: language modelling")
    lora: LoraConfig = LoraConfig()
    dpo: DpoConfig = DpoConfig()

    @model_validator(mode="after")
    def _check_cross(self) -> Config:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        if problem := context_split_problem(self.data.seq_len, self.mesh.sequence):
            raise ValueError(problem)
        if self.lora.rank and not self.init_from:
            raise ValueError(
                "lora.rank > 0 needs init_from (the base model the adapters finetune); LoRA "
                "on a pretraining config would train adapters on random weights")
        if self.task is not None and self.task.type == "preference" and not self.init_from:
            raise ValueError(
                "task.type=preference needs init_from (the model to align, which is also the "
                "frozen reference of the DPO loss); set init_from to a finetuned run")
        if self.lora.rank and self.model.mlp != "swiglu" and "gate" in self.lora.targets:
            raise ValueError("lora.targets has 'gate' but model.mlp=gelu has no gate projection")
        return self
