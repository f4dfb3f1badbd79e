"""Pre-flight: every check a run can make before it builds a model, and before it writes
anything into its run directory.

The run dir and `init_from` are reachable, the token stores the config reads are known, the
run's identity allows this config (train/identity.py), the runs it starts from exist, and the
output paths can be written (probes that leave no folder behind). What passes is handed on as
a `Checked`: the config as the run will record it, the run dir, and the identity verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from bignlp_jax import storage
from bignlp_jax.access import check_path
from bignlp_jax.checkpoint import local_tier
from bignlp_jax.config import Config
from bignlp_jax.data.run_identity import with_store_identities
from bignlp_jax.rundir import RunDir
from bignlp_jax.train.identity import ConfigChanges, config_changes, refuse_unless_allowed
from bignlp_jax.train.inputs import check_source_runs


@dataclass(frozen=True)
class Checked:
    """A config that passed pre-flight, ready for state start-up."""

    cfg: Config  # with data.stores filled in: what the run records
    run: RunDir
    changes: ConfigChanges  # against the run's recorded config (empty for a new run)
    allow_config_change: bool

    @property
    def locked(self) -> bool:
        """Whether the run's recorded inputs (its tokenizer) must be kept: it has trained
        state and no config change was allowed."""
        return self.changes.has_checkpoints and not self.allow_config_change


def preflight(cfg: Config, allow_config_change: bool = False) -> Checked:
    """Check `cfg` before anything is built or written; UserError (one line and a fix) if a
    check fails."""
    run = RunDir(cfg.run.dir)
    check_path(run.path, "run.dir")
    # (init_from's own messages name a missing local path; a bucket is probed here)
    if cfg.init_from and storage.is_remote(cfg.init_from.removeprefix("hf:")):
        check_path(cfg.init_from.removeprefix("hf:"), "init_from", write=False)
    cfg = with_store_identities(cfg)  # the stores read go into the recorded config
    changes = config_changes(cfg, run)  # before building anything: refusing is instant
    refuse_unless_allowed(changes, allow_config_change)
    if not changes.has_checkpoints:  # a resumed run no longer reads init_from
        check_source_runs(cfg)
    if not storage.is_remote(run.path):  # (a bucket has no folders to differ)
        check_path(run.checkpoints, "run.dir", what="the checkpoint directory")
    if cfg.checkpoint.local_dir is not None:  # each host probes its own local directory
        check_path(local_tier.tier_root(cfg.checkpoint.local_dir, run.path),
                   "checkpoint.local_dir")
    return Checked(cfg, run, changes, allow_config_change)
