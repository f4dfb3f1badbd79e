"""A run directory: the one place that names its files and reads its recorded config.

    RUN_DIR/config.yaml             the resolved config the run trains with (its identity,
                                    including data.stores: the token stores it reads)
    RUN_DIR/config_history.jsonl    every applied config change and the step it took effect
    RUN_DIR/metrics.jsonl           one JSON line per logged step (and `eval` results)
    RUN_DIR/tensorboard/            the same figures as TensorBoard events
    RUN_DIR/checkpoints/<step>/     durable checkpoints (checkpoint/paths.py reads them)
    RUN_DIR/checkpoints_abandoned/  trajectories set aside by `checkpoint.resume_from`, one
                                    folder per resume: <step>.<UTC time>/<newer steps>
    RUN_DIR/resume_from.json        which `checkpoint.resume_from` was applied already
    RUN_DIR/tokenizer/              the tokenizer the run was trained with
    RUN_DIR/earlier_attempts/       metrics of starts that never saved a checkpoint, kept
    RUN_DIR/eval.json               the latest `eval` results (evaluate/run.py)
    RUN_DIR/lm_eval.json            the latest `lm-eval` results (evaluate/harness_commands.py)

Every other module asks this one for these paths; `config.yaml` is parsed once per `RunDir`
(and the parse follows the module's own writes), so two readers cannot disagree on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from bignlp_jax import storage
from bignlp_jax.config import Config, save_config
from bignlp_jax.config.loader import apply_overrides, validate
from bignlp_jax.containment import contained
from bignlp_jax.errors import ConfigError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
ABANDONED = "checkpoints_abandoned"
RESUME_MARKER = "resume_from.json"
TOKENIZER = "tokenizer"
EARLIER_ATTEMPTS = "earlier_attempts"
EVAL_FILE = "eval.json"
LM_EVAL_FILE = "lm_eval.json"


class _InRun:
    """A read-only attribute of a RunDir: the path of one of its files (RUN_DIR/<name>)."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run: RunDir, owner: type | None = None) -> storage.AnyPath:
        return run.path / self.name

    def __set__(self, run: RunDir, value: object) -> None:  # read-only, as a property is
        raise AttributeError(f"a RunDir's path of {self.name} cannot be set")


class RunDir:
    """The files of one run directory (local or bucket)."""

    def __init__(self, path: str | Path | storage.AnyPath):
        self.path = storage.path(path)
        self._tree: dict[str, Any] | None = None
        self._parsed = False

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # --- file names (RUN_DIR/<name>, see the module docstring) -----------------------------
    config_file = _InRun(CONFIG_FILE)
    history_file = _InRun(HISTORY_FILE)
    metrics_file = _InRun(METRICS_FILE)
    tensorboard = _InRun(TENSORBOARD)
    checkpoints = _InRun(CHECKPOINTS)
    abandoned = _InRun(ABANDONED)
    resume_marker = _InRun(RESUME_MARKER)
    tokenizer = _InRun(TOKENIZER)
    earlier_attempts = _InRun(EARLIER_ATTEMPTS)

    # --- the recorded config -----------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether a run was recorded here (its config.yaml exists)."""
        return self.config_file.is_file()

    def recorded_tree(self) -> dict[str, Any] | None:
        """The parsed config.yaml (None for a new run); ConfigError if it cannot be read."""
        if not self._parsed:
            path = contained(self.path, CONFIG_FILE)  # a symlink out of the run is refused
            if path.is_file():
                try:
                    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                except (OSError, yaml.YAMLError) as e:
                    raise ConfigError(f"cannot read this run's config {path}: {_short(e)}\n"
                                      "  fix: restore the file, or use a new run.dir") from e
                if not isinstance(tree, dict):
                    raise ConfigError(f"this run's config {path} is not a mapping of keys\n"
                                      "  fix: restore the file, or use a new run.dir")
                self._tree = tree
            self._parsed = True
        return self._tree

    def recorded_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config | None:
        """The recorded config validated (with `overrides` applied), or None for a new run."""
        tree = self.recorded_tree()
        if tree is None:
            return None
        return validate(apply_overrides(json.loads(json.dumps(tree)), list(overrides)))

    def write_config(self, cfg: Config) -> None:
        """Record `cfg` as the run's config (config.yaml)."""
        save_config(cfg, self.config_file)
        self._tree, self._parsed = cfg.model_dump(mode="json"), True

    # --- the config history ------------------------------------------------------------------
    def append_history(self, step: int, changes: dict[str, dict[str, Any]]) -> None:
        """Append one entry {time, step, changes} to config_history.jsonl."""
        line = json.dumps({"time": time.time(), "step": step, "changes": changes}) + "\n"
        history = self.history_file
        if storage.is_remote(history):  # a bucket object cannot be appended to: rewrite it
            before = history.read_text(encoding="utf-8") if history.exists() else ""
            history.write_text(before + line, encoding="utf-8")
        else:
            history.parent.mkdir(parents=True, exist_ok=True)
            with history.open("a", encoding="utf-8") as f:
                f.write(line)

    def history(self) -> list[dict]:
        """The entries of config_history.jsonl, oldest first ([] if none)."""
        path = self.history_file
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line]


def _short(error: Exception) -> str:
    """One line for a read or YAML error (PyYAML's own message spans several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def as_run_dir(run_dir: str | Path | storage.AnyPath | RunDir) -> RunDir:
    """`run_dir` as a RunDir (itself when it is one already)."""
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def holds_run(directory: str | Path | storage.AnyPath) -> bool:
    """Whether `directory` is a run directory (a config.yaml written by `train`)."""
    return RunDir(directory).is_run()
