"""Where a resume starts when the run has a local fast tier (checkpoint/local_tier.py).

Rule: the newest step that is complete on EVERY process, from either tier. Each process lists
the local steps its own directory holds for this run and this layout; one all-gather gives
every process the same lists, and a step missing on any process is not used (a host that lost
its RAM disk, a kill in the middle of a save). A local step at least as new as the durable one
wins (same trajectory, faster to read); otherwise the durable step is used, with a warning that
names the newer local step(s) that could not be used and why.

A local step is trusted only in a run that already exists (a recorded config, rundir.py): a run dir
deleted and started again must not resume from the old run's RAM disk. Local steps newer than
where the run starts are deleted on every process (loop.py) before the first local save.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from bignlp_jax.checkpoint import complete_steps, local_tier
from bignlp_jax.checkpoint.manager import restore_data_state
from bignlp_jax.config import Config
from bignlp_jax.rundir import RunDir


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"checkpoint: {message}", flush=True)


def _load(target) -> Callable[[Path], tuple[Any, dict]]:
    return lambda step_dir: (local_tier.restore_state(step_dir, target, verify=True),
                             restore_data_state(step_dir))


def local_step_dir(cfg: Config, run_dir: Path, target, durable: Path | None, pending: bool,
                   load: Callable[[Path], Any] | None = None) -> tuple[Path, Any] | None:
    """The local step directory (this process's copy) to resume from, the same step on every
    process, with what `load` read from it (default: the train state, verified as it is read,
    and the data position), or None to use `durable` (the run's newest durable step, or None).
    A step damaged on any process is passed over for the next. Call on every process
    together (collectives)."""
    if cfg.checkpoint.local_dir is None or pending:  # resume_from names its step itself
        return None
    root = local_tier.tier_root(cfg.checkpoint.local_dir, run_dir)
    fingerprint = local_tier.layout_fingerprint(target)
    existing = RunDir(run_dir).is_run()
    mine = local_tier.own_steps(root, fingerprint) if existing else []
    per_process = local_tier.gather_steps(mine)
    common = local_tier.agreed(per_process)
    durable_step = int(durable.name) if durable is not None else None
    other_layout = [s for s in complete_steps(root) if existing and s not in mine
                    and (durable_step is None or s > durable_step)]
    if other_layout:  # a requeue onto another mesh or process layout: each process read its own
        _say(f"local step(s) {', '.join(map(str, other_layout))} were saved on another mesh or "
             "process layout; a local step restores only on its own, so they are not used")
    durable_text = (f"durable step {durable_step} ({durable})" if durable is not None
                    else "no checkpoint (a new start)")
    chosen, loaded = None, None
    for step in reversed(common):
        if durable_step is not None and step < durable_step:
            break
        loaded, problem = local_tier.load_everywhere(root / str(step), load or _load(target))
        if problem is None:
            chosen = step
            break
        _say(f"local step {step} is damaged ({problem}); not using it")
    floor = chosen if chosen is not None else (durable_step if durable_step is not None else 0)
    lost = sorted({s for steps in per_process for s in steps} - set(common))
    lost = [s for s in lost if s > floor]
    if lost:
        missing = {s: [i for i, steps in enumerate(per_process) if s not in steps] for s in lost}
        where = (f"local step {chosen}" if chosen is not None else durable_text)
        _say("WARNING: local step(s) " + ", ".join(
            f"{s} (missing on process {', '.join(map(str, missing[s]))})" for s in lost)
            + f" not complete on every process; lost, resuming from {where}")
    return (root / str(chosen), loaded) if chosen is not None else None
