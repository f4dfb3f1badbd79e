"""A run's config is its identity: a rerun in the same run.dir must not silently change it.

`RUN_DIR/config.yaml` holds the config the run was trained with. A rerun compares its own
resolved config with it, key by key:
- keys in RESUMABLE_KEYS (how long, how often to log/evaluate/save, how many checkpoints to
  keep) may change: the training trajectory up to the resumed step is the same whatever they
  say, so the new values apply and the change is recorded;
- any other change (learning rate, model, data, seed...) would make the run a mixture of two
  configs, so it is refused with a diff, unless the caller allows it explicitly
  (`bignlp-jax train ... --allow-config-change`, `train(cfg, allow_config_change=True)`).
Every applied change is appended to RUN_DIR/config_history.jsonl with the step it took effect,
and only then is config.yaml rewritten: it always shows the config now in force, and the
history says how it got there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bignlp_jax import storage
from bignlp_jax.checkpoint.paths import checkpoints_dir, complete_steps
from bignlp_jax.config import Config, save_config
from bignlp_jax.errors import ConfigError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"

# Keys that change how long the run goes and how it reports and saves, never the maths of the
# steps already taken. (train.steps also sets the LR schedule's length: extending a run is still
# the common, expected use, as in NeMo and MaxText, and the history records where it happened.)
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.max_time", "train.log_every", "train.eval_every",
    "train.eval_batches",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
    "checkpoint.async_save",
    "checkpoint.resume_from",  # which of this run's checkpoints to continue from
    # the local tier is a cache of the same trajectory: moving it (a requeue onto other nodes)
    # or changing its cadence only changes where a resume may start, never what it restores
    "checkpoint.local_dir", "checkpoint.local_every_steps", "checkpoint.local_keep",
    "data.worker_threads", "data.workers",  # input-pipeline threads/processes: same batches
    "run.dir",  # the same directory, possibly spelled differently (./runs/x, absolute)
    "run.name",  # a label
    # how the same maths is laid out and scheduled: the loss is a token sum over the same
    # global batch whatever the split, so only float rounding can differ
    "train.microbatches", "model.remat", "model.scan_unroll", "model.attention",
    # the pipeline schedule
    "train.pipeline_microbatches", "train.pipeline_repeats", "train.pipeline_fsdp_gather",
    # which implementation of the same op runs (model/kernels.py): tested equal to the reference
    "model.kernels", "model.kernel_projection", "model.kernel_attention",
})
# Any mesh key: a run may resume on a different number or layout of devices (the restore
# reshards), e.g. a job requeued onto fewer nodes.
RESUMABLE_PREFIXES = ("mesh.",)
# Keys a run fills in at start from the others (the token stores its data resolves to,
# data/run_identity.py, which checks them itself; the absolute data dir): a config that leaves
# them unset asks for "whatever the rest resolves to", and a run recorded before they were
# filled in says nothing about them; neither is a change.
DERIVED_KEYS = ("data.stores", "data.data_dir")


def is_resumable(key: str) -> bool:
    """Whether `key` may change when a run resumes (see RESUMABLE_KEYS)."""
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


@dataclass
class ConfigChanges:
    """Differences between the run's recorded config and the new one: key -> (old, new)."""

    run_dir: storage.AnyPath
    resumable: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    other: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    has_checkpoints: bool = False

    def __bool__(self) -> bool:
        return bool(self.resumable or self.other)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_ABSENT = "<absent>"


def _is_set(flat: dict[str, Any], key: str) -> bool:
    """Whether a flattened config gives `key` (or anything under it) a value."""
    return any((k == key or k.startswith(key + ".")) and v is not None for k, v in flat.items())


def _without(flat: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k != key and not k.startswith(key + ".")}


def compare(old_tree: dict[str, Any], new: Config, run_dir: Path) -> ConfigChanges:
    """The keys whose values differ between a recorded config tree and `new`."""
    try:  # fill in defaults the old file may predate, so only real differences show
        old_tree = Config.model_validate(old_tree).model_dump(mode="json")
    except ValueError:
        pass  # a config.yaml from another version: compare what it says, key by key
    old, fresh = flatten(old_tree), flatten(new.model_dump(mode="json"))
    for key in DERIVED_KEYS:
        if not (_is_set(old, key) and _is_set(fresh, key)):
            old, fresh = _without(old, key), _without(fresh, key)
    changes = ConfigChanges(run_dir)
    for key in sorted(set(old) | set(fresh)):
        a, b = old.get(key, _ABSENT), fresh.get(key, _ABSENT)
        if a != b:
            (changes.resumable if is_resumable(key) else changes.other)[key] = (a, b)
    return changes


def config_changes(cfg: Config, run_dir: str | Path) -> ConfigChanges:
    """Compare `cfg` with RUN_DIR/config.yaml (no changes when the run is new)."""
    run_dir = storage.path(run_dir)  # a bucket too (storage.py)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return ConfigChanges(run_dir)
    try:
        old_tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read this run's config {path}: {e}\n"
                          "  fix: restore the file, or use a new run.dir") from e
    changes = compare(old_tree, cfg, run_dir)
    changes.has_checkpoints = bool(complete_steps(checkpoints_dir(run_dir)))
    return changes


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def refuse_unless_allowed(changes: ConfigChanges, allow: bool) -> None:
    """ConfigError with a diff of old -> new values when non-resumable keys changed in a run
    that has checkpoints, unless `allow`."""
    if allow or not changes.other or not changes.has_checkpoints:
        return
    diff = "\n".join(f"  {k}: {_show(a)} (run) -> {_show(b)} (now)"
                     for k, (a, b) in changes.other.items())
    raise ConfigError(
        f"run.dir={changes.run_dir} holds a run trained with a different config "
        f"({changes.run_dir / CONFIG_FILE}); resuming it would mix two configs:\n{diff}\n"
        "  fix: put the run's values back, or give a new run.dir for a new run, or pass "
        "--allow-config-change (library: train(cfg, allow_config_change=True)) to continue "
        f"this run with the new values (recorded in {HISTORY_FILE})"
    )


def record_config(cfg: Config, changes: ConfigChanges, step: int) -> None:
    """Write config.yaml for the run; append what changed and from which step to the history
    first, so the file is never rewritten without a trace. Call on process 0 only."""
    if changes:
        entry = {"time": time.time(), "step": step,
                 "changes": {k: {"old": a, "new": b}
                             for k, (a, b) in {**changes.resumable, **changes.other}.items()}}
        history, line = changes.run_dir / HISTORY_FILE, json.dumps(entry) + "\n"
        if storage.is_remote(history):  # a bucket object cannot be appended to: rewrite it
            before = history.read_text(encoding="utf-8") if history.exists() else ""
            history.write_text(before + line, encoding="utf-8")
        else:
            with history.open("a", encoding="utf-8") as f:
                f.write(line)
    save_config(cfg, changes.run_dir / CONFIG_FILE)


def read_history(run_dir: str | Path) -> list[dict]:
    """The entries of RUN_DIR/config_history.jsonl, oldest first ([] if none)."""
    path = storage.path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
