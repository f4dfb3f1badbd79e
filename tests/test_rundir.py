"""The run directory has one owner (bignlp_jax/rundir.py): it names the files, reads the
recorded config once, and no other module spells those names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bignlp_jax import rundir
from bignlp_jax.config import load_config
from bignlp_jax.errors import ConfigError
from bignlp_jax.rundir import RunDir

PACKAGE = Path(rundir.__file__).parent
OWNED = {rundir.CONFIG_FILE, rundir.HISTORY_FILE, rundir.METRICS_FILE, rundir.ABANDONED,
         rundir.RESUME_MARKER, rundir.EARLIER_ATTEMPTS}


def spelled_outside(package: Path = PACKAGE) -> list[str]:
    """'file:line name' for every string constant (f-string parts included) outside rundir.py
    that is one of the run dir's owned names (prose that mentions a name is fine)."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in OWNED:
                out.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.value}")
    return out


def test_no_other_module_spells_a_run_dir_file_name():
    assert spelled_outside() == []


def test_the_spelling_check_finds_one(tmp_path):
    package = tmp_path / "bignlp_jax"
    package.mkdir()
    (package / "rundir.py").write_text('CONFIG = "config.yaml"\n')
    (package / "other.py").write_text(
        'path = run / "metrics.jsonl"\ndoc = "see config.yaml"\nf = f"{run / \'config.yaml\'}"\n')
    assert spelled_outside(package) == ["bignlp_jax/other.py:1 metrics.jsonl",
                                        "bignlp_jax/other.py:3 config.yaml"]


def test_the_recorded_config_is_read_once_and_follows_writes(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.is_run() and run.recorded_tree() is None and run.recorded_config() is None
    cfg = load_config("tiny", [f"run.dir={run}"])
    run.write_config(cfg)
    assert run.recorded_config() == cfg
    run.config_file.write_text("model: [unreadable")  # read once: this object keeps its parse,
    # a new reader parses the file again
    assert run.recorded_tree() == cfg.model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"cannot read this run's config .*config.yaml: expected ',' or "
                                          r"'\]', but got '<stream end>' \(line 1, column 19\)\n"
                                          r"  fix: restore the file, or use a new run.dir"):
        RunDir(run.path).recorded_tree()
    assert run.recorded_config(["train.steps=7"]).train.steps == 7
    run.append_history(3, {"train.steps": {"old": 1, "new": 7}})
    assert [e["step"] for e in RunDir(run.path).history()] == [3]
