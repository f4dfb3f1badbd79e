"""The stage log `OUT/pipeline.json` and what it says about each stage's output.

Each stage's entry holds its status, wall time, note, and the fingerprint (fingerprint.py) of
the settings and inputs its output was made from. A stage's output is:
- current: its recorded fingerprint is the one the pipeline computes now;
- stale:   it exists but was made from other settings or inputs (or before fingerprints were
           recorded), so it must not be reused nor shown beside current results;
- absent:  nothing there yet.

`OUT` may be a bucket (gs://, s3://): an object is replaced whole by one upload, so the log is
written in place there, where a file system needs a temporary file and a rename.
"""

from __future__ import annotations

import json
import time

import jax

from bignlp_jax import storage
from bignlp_jax.checkpoint import latest_step
from bignlp_jax.pipeline.fingerprint import fingerprint, input_fingerprints
from bignlp_jax.pipeline.spec import TRAIN_STAGES, Pipeline
from bignlp_jax.rundir import RunDir
from bignlp_jax.train.identity import compare

STATE_FILE = "pipeline.json"
RESULTS_FILE = "results.json"
STALE_DIR = "stale"  # OUT/stale/<stage>.<fingerprint>: outputs set aside, never deleted


def read_state(p: Pipeline) -> dict:
    path = p.out / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}


def record(p: Pipeline, stage: str, status: str, seconds: float, note: str = "",
           fingerprint: str | None = None, inputs: dict[str, str] | None = None) -> None:
    """Update `stage`'s entry (process 0 only). A skip keeps the wall time of the run that did
    the work."""
    if jax.process_index() != 0:
        return
    state = read_state(p)
    entry = state["stages"].get(stage, {})
    if status == "skipped" and entry.get("status") == "done":
        entry["skipped_at"] = time.time()
    else:
        entry = {"status": status, "seconds": round(seconds, 1), "note": note,
                 "finished_at": time.time(), "fingerprint": fingerprint, "inputs": inputs}
    state["stages"][stage] = entry
    write_whole(p.out / STATE_FILE, json.dumps(state, indent=2) + "\n")


def write_whole(path: storage.AnyPath, text: str) -> None:
    """Write a small file so that readers see the old or the new text, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(path):  # one object upload replaces the object whole
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def output_path(p: Pipeline, stage: str) -> storage.AnyPath:
    """What the stage writes (the evaluate stage: its results file)."""
    if stage == "evaluate":
        return p.stage_dir("evaluate") / RESULTS_FILE
    return p.stage_dir(stage)


def freshness(p: Pipeline, stage: str, state: dict | None = None) -> str:
    """'current', 'stale' or 'absent' (see the module docstring)."""
    entry = (state or read_state(p))["stages"].get(stage, {})
    recorded = entry.get("fingerprint")
    if recorded is not None and recorded == fingerprint(p, stage):
        return "current"
    return "stale" if output_path(p, stage).exists() else "absent"


def why_stale(p: Pipeline, stage: str, state: dict | None = None) -> str:
    """A short reason for a stale stage: its changed config keys and/or changed inputs."""
    entry = (state or read_state(p))["stages"].get(stage, {})
    if entry.get("fingerprint") is None:
        return "made before this pipeline recorded fingerprints"
    reasons = []
    if stage in TRAIN_STAGES and RunDir(p.stage_dir(stage)).is_run():
        changes = _config_changes(p, stage)
        shown = [f"{k}: {a} -> {b}" for k, (a, b) in {**changes.resumable,
                                                      **changes.other}.items()]
        if shown:
            reasons.append("config " + ", ".join(shown[:4]) + (" ..." if len(shown) > 4 else ""))
    recorded_inputs = entry.get("inputs") or {}
    changed = [s for s, fp in input_fingerprints(p, stage).items() if recorded_inputs.get(s) != fp]
    if changed:
        reasons.append(f"{', '.join(changed)} changed")
    return "; ".join(reasons) or "settings changed"


def _config_changes(p: Pipeline, stage: str):
    old = RunDir(p.stage_dir(stage)).recorded_tree() or {}
    return compare(old, p.run_config(stage), p.stage_dir(stage))


def can_resume(p: Pipeline, stage: str) -> bool:
    """A stale training stage may continue in place (not start over) when its inputs are the
    same, every config change is one a resume allows (train/identity.py), and it has not
    already gone past the new `train.steps`."""
    if stage not in TRAIN_STAGES or not RunDir(p.stage_dir(stage)).is_run():
        return False
    entry = read_state(p)["stages"].get(stage, {})
    if entry.get("inputs") != input_fingerprints(p, stage):
        return False
    if _config_changes(p, stage).other:
        return False
    last = latest_step(p.stage_dir(stage))
    return last is None or last <= p.run_config(stage).train.steps


def set_aside(p: Pipeline, stage: str) -> storage.AnyPath | None:
    """Move a stale stage's output to OUT/stale/ (process 0), so it is neither reused nor lost."""
    src = output_path(p, stage)
    if jax.process_index() != 0 or not src.exists():
        return None
    old = read_state(p)["stages"].get(stage, {}).get("fingerprint") or "unrecorded"
    dest = p.out / STALE_DIR / f"{stage}.{old}"
    n = 1
    while dest.exists():
        n += 1
        dest = p.out / STALE_DIR / f"{stage}.{old}.{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    storage.move(src, dest)
    return dest
