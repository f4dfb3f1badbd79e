"""What a start writes into the run dir, only once every check and the state start-up passed
(a start that fails leaves the run dir as it found it): the tokenizer copy, the config and its
history, and the metrics trimmed to the trajectory being continued.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from bignlp_jax.data import record_run_data
from bignlp_jax.rundir import RunDir
from bignlp_jax.train.identity import record_config
from bignlp_jax.train.preflight import Checked
from bignlp_jax.train.start import Start


def record_start(checked: Checked, start: Start) -> None:
    """On process 0: the run's tokenizer (vocabulary checked; kept if the run is locked to
    it) and its config, with any change recorded from the start's step."""
    if jax.process_index() != 0:
        return
    record_run_data(checked.cfg, checked.run.path, checked.locked)
    record_config(checked.cfg, checked.changes, start.step, checked.run)


def drop_metrics_after(run_dir: str | Path | RunDir, step: int) -> None:
    """Resuming at `step`: forget logged steps after it (a crashed run logged steps its
    checkpoints do not hold; they are trained again), so the metrics stay one trajectory."""
    path = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).metrics_file
    if jax.process_index() != 0 or not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash here leaves the old or the new file, never half
