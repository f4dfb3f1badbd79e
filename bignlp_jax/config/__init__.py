"""Typed, validated configuration (schema.py: `Config`; its sections in architecture.py,
sections.py and finetune.py) and its loader (loader.py)."""

from bignlp_jax.config.loader import config_to_yaml, load_config, save_config
from bignlp_jax.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "LoraConfig", "MeshConfig", "ModelConfig",
    "OptimizerConfig", "RunConfig", "TrainConfig", "config_to_yaml", "load_config", "save_config",
]
