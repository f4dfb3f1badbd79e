"""Checkpoints: Orbax-managed, asynchronous, atomic; exact resume, preemption, params-only reads.

Public API (used by training, finetuning, export, evaluation and generation):
`load_params`, `load_run_config`, `latest_step`, `is_complete`, `RunCheckpointer`.
"""

from bignlp_jax.checkpoint.params import load_params
from bignlp_jax.checkpoint.paths import (
    checkpoints_dir,
    complete_steps,
    is_complete,
    latest_step,
    load_run_config,
    resolve_step_dir,
    run_root,
)
from bignlp_jax.compat import orbax as orbax_compat  # noqa: F401 - applied on import: s3://

__all__ = [
    "checkpoints_dir",
    "complete_steps",
    "is_complete",
    "latest_step",
    "load_params",
    "load_run_config",
    "resolve_step_dir",
    "run_root",
]
