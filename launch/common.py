"""What every launcher shares: how to run `bignlp-jax`, and how a job splits into stages.

A launcher never trains anything itself: it turns a config or a pipeline into one or more
`bignlp-jax ...` command lines (stages) and hands them to a runner (local processes, SLURM,
Kubernetes).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class LaunchError(Exception):
    """A launcher cannot continue; the message says why and how to fix it (exit code 2)."""


@dataclass(frozen=True)
class Stage:
    """One job of a chain: a name (used for file and job names) and its bignlp-jax arguments."""

    name: str
    args: tuple[str, ...]


def bignlp_jax_command(executable: str | None = None) -> list[str]:
    """argv prefix that runs the CLI: the given path, else the `bignlp-jax` script next to this
    interpreter (the repo's .venv), else `python -m bignlp_jax.cli` with this interpreter.

    Absolute paths, so jobs started by a scheduler on another shell run the same installation."""
    if executable:
        return [executable]
    script = Path(sys.executable).parent / "bignlp-jax"  # not resolved: keep the venv's bin/
    if script.is_file():
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "bignlp_jax.cli"]


def resolve_target(target: str) -> str:
    """A config/pipeline as an absolute path (jobs may start in another directory); names such
    as `tiny` or `pipelines/default` are looked up under configs/ the way bignlp-jax does.
    Unknown names are passed through for bignlp-jax to report."""
    from bignlp_jax.config.loader import resolve_config_path
    from bignlp_jax.errors import UserError

    try:
        return str(resolve_config_path(target).resolve())
    except UserError:
        return target


# Top-level keys of a pipeline file (bignlp_jax/pipeline/spec.py) and of a run config: disjoint.
PIPELINE_KEYS = {"output_dir", "pretrain", "finetune", "finetune_scratch", "tokenizer", "export"}
RUN_CONFIG_KEYS = {"model", "mesh", "data", "optimizer", "train", "checkpoint", "run", "task"}


def is_pipeline(target: str) -> bool:
    """Whether `target` (a resolved path) is a pipeline file rather than a run config."""
    from bignlp_jax.config.loader import load_yaml_tree
    from bignlp_jax.errors import UserError

    path = Path(target)
    if not path.is_file():
        return False
    try:
        keys = set(load_yaml_tree(path))
    except UserError:
        return False  # bignlp-jax will report the broken file
    return bool(keys & PIPELINE_KEYS) and not keys & RUN_CONFIG_KEYS


def pipeline_output(target: str, overrides: list[str]) -> tuple[Path, str]:
    """A pipeline's output directory (absolute) and name, with the overrides applied."""
    from bignlp_jax.errors import UserError
    from bignlp_jax.pipeline.spec import Pipeline

    try:
        pipeline = Pipeline.load(target, overrides)
    except UserError as e:
        raise LaunchError(str(e)) from None
    return pipeline.out.resolve(), pipeline.spec.name


def list_stages(cli: list[str], pipeline: str, overrides: list[str]) -> list[str]:
    """Ask `bignlp-jax pipeline P --list-stages`: its last stdout line is a JSON list of names."""
    cmd = [*cli, "pipeline", pipeline, *overrides, "--list-stages"]
    # a single process, whatever cluster environment this runs in (e.g. inside an allocation)
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "BIGNLP_DISTRIBUTED": "off"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise LaunchError(
            f"could not list the stages of {pipeline}: `{shlex.join(cmd)}` exited with "
            f"{proc.returncode}\n{proc.stderr.strip()}"
        )
    try:
        names = json.loads(lines[-1])
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise LaunchError(f"`{shlex.join(cmd)}` did not end with a JSON list of stage names; "
                          f"its last line was {lines[-1]!r}")
    return names


def plan_stages(cli: list[str], target: str, overrides: list[str],
                job_target: str | None = None) -> list[Stage]:
    """The stages of a config (one `train` stage) or of a pipeline (one per pipeline stage).

    Stage names are read from the local file; the commands name `job_target` (the path as the
    job will see it, e.g. inside a container), by default the local absolute path."""
    resolved = resolve_target(target)
    job_target = job_target or resolved
    if is_pipeline(resolved):
        return [Stage(name, ("pipeline", job_target, "--stage", name, *overrides))
                for name in list_stages(cli, resolved, overrides)]
    return [Stage("train", ("train", job_target, *overrides))]


def load_run_config(target: str, overrides: list[str]):
    """The validated config of a training run (for its `run.dir` and `run.name`)."""
    from bignlp_jax.config import load_config
    from bignlp_jax.errors import UserError

    try:
        return load_config(target, overrides)
    except UserError as e:
        raise LaunchError(str(e)) from None


def parse_pairs(items: list[str], flag: str, sep: str = "=") -> dict[str, str]:
    """Repeated `KEY=VALUE` options (`KEY<sep>VALUE`) as a dict; LaunchError naming `flag` for
    an item without the separator or without a key."""
    out = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise LaunchError(f"{flag} {item!r} is not KEY{sep}VALUE")
        out[key] = value
    return out


def require_modules(*modules: str, why: str) -> None:
    """LaunchError (one line, exit 2) when this Python lacks `modules`: launchers are run with
    the project's virtual environment, whose interpreter the jobs they write also use."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LaunchError(
            f"this Python ({sys.executable}) has no {', '.join(missing)}, which {why}; run the "
            f"launcher with the project's virtual environment: `.venv/bin/python "
            f"{Path(sys.argv[0]).as_posix()} ...` (or `source .venv/bin/activate` first)")


def main_wrapper(main) -> int:
    """Run a launcher's main(): LaunchError -> one message on stderr and exit code 2."""
    try:
        return main()
    except LaunchError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the job's files: a name too long, no permission, disk full
        if e.filename is None:
            raise
        name = str(e.filename)
        shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} chars)"
        print(f"{Path(sys.argv[0]).name}: error: {e.strerror}: {shown}", file=sys.stderr)
        return 2
