"""A run's config is its identity: a rerun in the same run.dir must not silently change it.

The run's recorded config (rundir.py) holds the config the run was trained with, including
the token stores its data resolved to (`data.stores`, data/run_identity.py). A rerun compares
its own resolved config with it, key by key:
- keys in RESUMABLE_KEYS (how long, how often to log/evaluate/save, how many checkpoints to
  keep) may change: the training trajectory up to the resumed step is the same whatever they
  say, so the new values apply and the change is recorded;
- any other change (learning rate, model, data, seed...) would make the run a mixture of two
  configs, so it is refused with a diff, unless the caller allows it explicitly
  (`bignlp-jax train ... --allow-config-change`, `train(cfg, allow_config_change=True)`).
Other token stores (another tokenizer, another version of the dataset) are such a change too.
Only a run that has checkpoints (`has_checkpoints`: a complete step) is protected; a run dir
without one holds no trained state to mix with.
Every applied change is appended to the run's config history with the step it took effect,
and only then is the recorded config rewritten: it always shows the config now in force, and
the history says how it got there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bignlp_jax import storage
from bignlp_jax.checkpoint.paths import complete_steps
from bignlp_jax.config import Config
from bignlp_jax.errors import ConfigError
from bignlp_jax.rundir import RunDir, as_run_dir

# Keys that change how long the run goes and how it reports and saves, never the maths of the
# steps already taken. (train.steps also sets the LR schedule's length: extending a run is still
# the common, expected use, as in NeMo and MaxText, and the history records where it happened.)
RESUMABLE_KEYS = frozenset({
    "train.steps", "train.max_time", "train.log_every", "train.eval_every",
    "train.eval_batches",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_every",
    "checkpoint.async_save", "checkpoint.storage_deadline_s",
    "checkpoint.resume_from",  # which of this run's checkpoints to continue from
    # the local tier is a cache of the same trajectory: moving it (a requeue onto other nodes)
    # or changing its cadence only changes where a resume may start, never what it restores
    "checkpoint.local_dir", "checkpoint.local_every_steps", "checkpoint.local_keep",
    "data.worker_threads", "data.workers",  # input-pipeline threads/processes: same batches
    "run.dir",  # the same directory, possibly spelled differently (./runs/x, absolute)
    "run.name",  # a label
    # how the same maths is laid out and scheduled: the loss is a token sum over the same
    # global batch whatever the split, so only float rounding can differ
    "train.microbatches", "model.remat", "model.scan_unroll",
    # the pipeline schedule
    "train.pipeline_microbatches", "train.pipeline_repeats", "train.pipeline_fsdp_gather",
    # which implementation of the same op runs (model/kernels.py): tested equal to the reference
    "model.kernels", "model.kernel_projection", "model.kernel_attention",
})
# Any mesh key: a run may resume on a different number or layout of devices (the restore
# reshards), e.g. a job requeued onto fewer nodes.
RESUMABLE_PREFIXES = ("mesh.",)
# Keys a run fills in at start from the others (the token stores its data resolves to,
# data/run_identity.py; the absolute data dir): a config that leaves
# them unset asks for "whatever the rest resolves to", and a run recorded before they were
# filled in says nothing about them; neither is a change.
DERIVED_KEYS = ("data.stores", "data.data_dir")
STORES_KEY = "data.stores"


def has_checkpoints(run: RunDir) -> bool:
    """Whether the run holds trained state: a complete checkpoint step (an empty or
    half-written checkpoints folder does not count). The one definition every check uses."""
    return bool(complete_steps(run.checkpoints))


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


def config_changes(cfg: Config, run_dir: str | Path | RunDir) -> ConfigChanges:
    """Compare `cfg` with the run's recorded config (no changes when the run is new)."""
    run = as_run_dir(run_dir)  # a bucket too (storage.py)
    old_tree = run.recorded_tree()
    if old_tree is None:
        return ConfigChanges(run.path)
    changes = compare(old_tree, cfg, run.path)
    changes.has_checkpoints = has_checkpoints(run)
    return changes


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


def _stores(changes: dict[str, tuple[Any, Any]], side: int) -> str:
    return ", ".join(f"{k.removeprefix(STORES_KEY + '.')} {str(v[side])[:16]}"
                     for k, v in sorted(changes.items()) if v[side] != _ABSENT)


def refuse_unless_allowed(changes: ConfigChanges, allow: bool) -> None:
    """ConfigError with a diff of old -> new values when non-resumable keys changed in a run
    that has checkpoints, unless `allow`. Other token stores are named as other data."""
    if allow or not changes.other or not changes.has_checkpoints:
        return
    run = RunDir(changes.run_dir)
    allow_fix = ("--allow-config-change (library: train(cfg, allow_config_change=True)) to "
                 f"continue this run with the new values (recorded in {run.history_file.name})")
    stores = {k: v for k, v in changes.other.items()
              if k == STORES_KEY or k.startswith(STORES_KEY + ".")}
    if stores:
        raise ConfigError(
            f"run {changes.run_dir} was trained on token stores {_stores(stores, 0)} (its "
            f"{run.config_file.name}), but this config reads {_stores(stores, 1)}: other data "
            "(another tokenizer or dataset)\n"
            "  fix: use the run's data (data.data_dir, data.tokenizer), or a new run.dir, or "
            f"pass {allow_fix}")
    diff = "\n".join(f"  {k}: {_show(a)} (run) -> {_show(b)} (now)"
                     for k, (a, b) in changes.other.items())
    raise ConfigError(
        f"run.dir={changes.run_dir} holds a run trained with a different config "
        f"({run.config_file}); resuming it would mix two configs:\n{diff}\n"
        "  fix: put the run's values back, or give a new run.dir for a new run, or pass "
        + allow_fix
    )


def record_config(cfg: Config, changes: ConfigChanges, step: int,
                  run: RunDir | None = None) -> None:
    """Write the run's config; append what changed and from which step to the history first,
    so the config is never rewritten without a trace. Call on process 0 only."""
    run = run if run is not None else RunDir(changes.run_dir)
    if changes:
        run.append_history(step, {k: {"old": a, "new": b}
                                  for k, (a, b) in {**changes.resumable, **changes.other}.items()})
    run.write_config(cfg)


def read_history(run_dir: str | Path) -> list[dict]:
    """The entries of the run's config history, oldest first ([] if none)."""
    return RunDir(run_dir).history()
