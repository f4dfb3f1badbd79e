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
from bignlp_jax.checkpoint import local_tier
from bignlp_jax.config import Config
from bignlp_jax.data.run_identity import with_store_identities
from bignlp_jax.rundir import RunDir
from bignlp_jax.train.identity import ConfigChanges, config_changes, refuse_unless_allowed
from bignlp_jax.train.inputs import check_source_runs
from bignlp_jax.writable import require_writable


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
    storage.check_access(cfg.run.dir, "run.dir")
    if cfg.init_from:
        storage.check_access(cfg.init_from.removeprefix("hf:"), "init_from", write=False)
    cfg = with_store_identities(cfg)  # the stores read go into the recorded config
    changes = config_changes(cfg, run)  # before building anything: refusing is instant
    refuse_unless_allowed(changes, allow_config_change)
    if not changes.has_checkpoints:  # a resumed run no longer reads init_from
        check_source_runs(cfg)
    if not storage.is_remote(cfg.run.dir):  # (a bucket was probed by check_access above)
        # before minutes of compiling, not at the first save
        require_writable(run.path, "run.dir", "run.dir=DIR")
        require_writable(run.checkpoints, "the checkpoint directory", "run.dir=DIR")
    if cfg.checkpoint.local_dir is not None:  # each host probes its own local directory
        require_writable(local_tier.tier_root(cfg.checkpoint.local_dir, run.path),
                         "checkpoint.local_dir", "checkpoint.local_dir=DIR")
    return Checked(cfg, run, changes, allow_config_change)
