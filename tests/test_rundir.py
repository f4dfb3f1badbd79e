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
         rundir.RESUME_MARKER, rundir.EARLIER_ATTEMPTS, rundir.EVAL_FILE, rundir.LM_EVAL_FILE}
# Also words with other meanings (the `tokenizer` command, pipeline stage and config key; the
# `checkpoints` of a message): spelled as a path they are the run dir's, nowhere else.
AS_PATH = {rundir.CHECKPOINTS, rundir.TOKENIZER, rundir.TENSORBOARD}
JOINS = {"contained", "joinpath", "join"}  # calls whose string arguments are path parts


def _names_a_path(node: ast.Constant, parent: ast.AST | None) -> bool:
    """Whether the string `node` is a run dir name used as (part of) a path."""
    value = node.value
    parts = [part for part in value.split("/") if part]
    if not parts or any(c.isspace() for c in value) or "://" in value:
        return False  # empty, prose, or a whole example URL (compat/ probes Orbax with one)
    if len(parts) > 1 or value != parts[0]:  # `tokenizer/x.json`, `/checkpoints` (an f-string part)
        return any(part in OWNED | AS_PATH for part in parts)
    if value in OWNED:
        return True
    if value not in AS_PATH:
        return False
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):  # run / "tokenizer"
        return True
    if isinstance(parent, ast.Call):
        func = parent.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        return name in JOINS
    return False


def spelled_outside(package: Path = PACKAGE) -> list[str]:
    """'file:line name' for every string constant (f-string parts included) outside rundir.py
    that is one of the run dir's file names used as a path (prose that mentions one is fine)."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "rundir.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and _names_a_path(node, parents.get(node))):
                out.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.value}")
    return sorted(out, key=lambda line: (line.split(":")[0], int(line.split(":")[1].split()[0])))


def test_no_other_module_spells_a_run_dir_file_name():
    assert spelled_outside() == []
    assert spelled_outside(PACKAGE.parent / "launch") == []


def test_the_spelling_check_finds_one(tmp_path):
    package = tmp_path / "bignlp_jax"
    package.mkdir()
    (package / "rundir.py").write_text('CONFIG = "config.yaml"\n')
    (package / "other.py").write_text(
        'path = run / "metrics.jsonl"\ndoc = "see config.yaml"\nf = f"{run / \'config.yaml\'}"\n'
        'tok = root / "tokenizer"\nck = contained(root, "checkpoints")\n'
        'inner = contained(root, "tokenizer/tokenizer.model")\ng = f"{out}/tokenizer"\n'
        'h = f"{out}/config.yaml"\n'
        # the same words with other meanings are fine
        'sub.add_parser("tokenizer")\nkey = {"tokenizer": 1}\nstage = p.stage_dir("tokenizer")\n'
        'msg = "holds config.yaml and checkpoints/"\n')
    assert spelled_outside(package) == [
        "bignlp_jax/other.py:1 metrics.jsonl", "bignlp_jax/other.py:3 config.yaml",
        "bignlp_jax/other.py:4 tokenizer", "bignlp_jax/other.py:5 checkpoints",
        "bignlp_jax/other.py:6 tokenizer/tokenizer.model", "bignlp_jax/other.py:7 /tokenizer",
        "bignlp_jax/other.py:8 /config.yaml"]


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
