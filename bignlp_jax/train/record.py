"""What a start writes into the run dir, only once every check and the state start-up passed
(a start that fails leaves the run dir as it found it): the tokenizer copy, the config and its
history, and the metrics kept to the trajectory being continued.

A start from step 0 in a dir that holds metrics of an earlier attempt (one stopped before its
first checkpoint) is a new trajectory: those metrics (and TensorBoard events) move to
RUN_DIR/earlier_attempts/<UTC time>/, and the start says where; nothing is truncated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from bignlp_jax import storage
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
    if start.step == 0:
        keep_earlier_attempt(checked.run)
    record_run_data(checked.cfg, checked.run.path, checked.locked)
    record_config(checked.cfg, checked.changes, start.step, checked.run)


def keep_earlier_attempt(run: RunDir, now: float | None = None) -> storage.AnyPath | None:
    """Move the metrics (and TensorBoard events) of an earlier attempt that saved no
    checkpoint out of the way of a new start, into a folder of their own; the folder, or None
    when there was nothing to keep."""
    metrics = run.metrics_file
    if not metrics.is_file() or not metrics.read_text(encoding="utf-8").strip():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    folder, n = run.earlier_attempts / stamp, 1
    while folder.exists():
        n += 1
        folder = run.earlier_attempts / f"{stamp}.{n}"
    folder.mkdir(parents=True)
    lines = sum(1 for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip())
    for item in (metrics, run.tensorboard):
        if item.exists():
            storage.move(item, folder / item.name)
    print(f"run: {run.path} holds {lines} logged line(s) of an earlier attempt without a "
          f"checkpoint; kept in {folder} (this start begins a new {metrics.name})", flush=True)
    return folder


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
