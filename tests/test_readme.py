"""README's commands, walked in order as a new user would type them.

Every `bignlp-jax` command in README's bash blocks must parse with the real CLI parser, and every
config it names (with its overrides) must load and validate; `launch/*.py` commands must parse with
their own parsers. Commands that train in the same `run.dir` must be one run: their configs may
differ only in keys a resume may change, or the later command would be refused (which is how the
tour once broke: two examples shared `runs/tiny` with different data). Running every example for
real takes longer than the whole suite may, so this checks what can go stale without compute;
the quickstart itself runs in CI's fresh clone as `.ci/run`'s install step and in
tests/test_pipeline.py's mini pipeline.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

README = REPO / "README.md"


def readme_commands() -> list[list[str]]:
    """argv of every command in README's bash blocks, in order (comments dropped, `\\`
    continuations joined, `a && b` split, leading VAR=value assignments dropped)."""
    text = README.read_text()
    commands: list[list[str]] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part.split(">")[0])
                while argv and re.match(r"^[A-Z_]+=", argv[0]):
                    argv = argv[1:]
                if argv:
                    commands.append(argv)
    return commands


def _cli_argv(argv: list[str]) -> list[str] | None:
    """The arguments after `bignlp-jax` (any path to it), or after `--` of launch/local.py."""
    if argv[0].endswith("bignlp-jax"):
        return argv[1:]
    if argv[:2] == ["python", "launch/local.py"] and "--" in argv:
        return argv[argv.index("--") + 1:]
    return None


def test_readme_has_the_two_quickstart_commands():
    """The quickstart's set-up-and-run line and `.ci/run`'s test line are README's own."""
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
             for line in block.splitlines()]
    run = ("python3 -m venv .venv && .venv/bin/pip install -e . && "
           ".venv/bin/bignlp-jax pipeline configs/pipelines/default.yaml")
    assert run in lines
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    test_command = next(line for line in ci if line.startswith("python3 -m venv .venv"))
    assert test_command in lines


def test_every_cli_command_parses_and_its_config_validates():
    from bignlp_jax.cli import build_parser, parse_args
    from bignlp_jax.config import load_config

    checked = 0
    for argv in readme_commands():
        args_list = _cli_argv(argv)
        if args_list is None:
            continue
        try:
            args = parse_args(build_parser(args_list), args_list)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"README command does not parse ({exc.code}): {shlex.join(argv)}")
        config = getattr(args, "config", None)
        if config is not None and str(config).endswith(".yaml"):
            load_config(REPO / config, getattr(args, "overrides", []))
        checked += 1
    assert checked >= 25, f"only {checked} bignlp-jax commands found in README"


def test_commands_sharing_a_run_dir_are_one_run():
    from bignlp_jax.config import load_config
    from bignlp_jax.train.identity import is_resumable

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    runs: dict[str, tuple[str, dict]] = {}
    for argv in readme_commands():
        args_list = _cli_argv(argv)
        if not args_list or args_list[0] != "train":
            continue
        positional = [a for a in args_list[1:] if not a.startswith("--")]
        cfg = load_config(REPO / positional[0], positional[1:])
        settings = flat(cfg.model_dump(mode="json"))
        earlier = runs.setdefault(cfg.run.dir, (shlex.join(argv), settings))
        differing = sorted(k for k in set(settings) | set(earlier[1])
                           if settings.get(k) != earlier[1].get(k) and not is_resumable(k))
        assert not differing, (f"README trains two different runs in run.dir={cfg.run.dir}: "
                               f"{earlier[0]!r} and {shlex.join(argv)!r} differ in {differing}")
    assert len(runs) >= 5


def test_launcher_examples_render():
    """README's SLURM dry run and Kubernetes render run as written (neither submits anything):
    the launchers accept every option the examples name and render the job."""
    ran = []
    for argv in readme_commands():
        if argv[:2] == ["python", "launch/slurm.py"] and "--dry-run" in argv:
            expect = "#SBATCH --nodes="
        elif argv[:3] == ["python", "launch/k8s.py", "render"]:
            expect = "kind: JobSet"
        else:
            continue
        done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"
        assert expect in done.stdout
        ran.append(argv[1])
    assert sorted(set(ran)) == ["launch/k8s.py", "launch/slurm.py"]
