"""Checkpoints: Orbax-managed, asynchronous, atomic; exact resume, preemption, params-only reads.

Public API (used by training, finetuning, export, evaluation and generation):
`load_params`, `load_run_config`, `latest_step`, `is_complete`, `RunCheckpointer`.
"""

from bignlp_jax.checkpoint import orbax_compat
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

# once, before any save or restore: Orbax reads and writes s3:// arrays with it (see the module)
orbax_compat.apply()
