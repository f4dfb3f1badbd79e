"""The command line itself: lazy imports (help and argument errors without jax), help text,
and the two error paths: a user error is one line and exit 2, a bug is a traceback and exit 1."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from bignlp_jax import cli


def test_every_command_module_registers_its_table_entries():
    for module in {m for m, _ in cli.COMMANDS.values()}:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        names = {n for n, (m, _) in cli.COMMANDS.items() if m == module}
        assert set(sub.choices) == names, module
        helps = {a.dest: a.help for a in sub._choices_actions}
        assert helps == {n: cli.COMMANDS[n][1] for n in names}, module


def test_every_option_has_help_text():
    import importlib

    sys.path.insert(0, str(__import__("conftest").REPO))
    for parser in (cli.build_parser(), importlib.import_module("launch.k8s").build_parser(),
                   importlib.import_module("launch.slurm").build_parser()):
        check_help(parser)


def check_help(parser: argparse.ArgumentParser) -> None:
    """Every argument has help, and every option with a default says what it is."""
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{p.prog}: {action.dest} has no help text"
                if action.option_strings and action.default not in (None, False, []):
                    assert "default" in action.help.lower(), f"{p.prog} {action.dest}"


PROBE = """
import sys
from bignlp_jax.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code, file=sys.stderr)
print("jax imported:", "jax" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--run", "x"], ["train"],
                                  ["pipeline"]]
                         + [[name, "--help"] for name in sorted(cli.COMMANDS)])
def test_help_and_argument_errors_do_not_import_jax(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=60)
    assert "jax imported: False" in proc.stderr, proc.stderr
    if argv == ["--help"]:
        assert "examples" in proc.stdout and "bignlp-jax train configs/tiny.yaml" in proc.stdout
    if argv == ["train"]:  # a usage line that says what to give, not `required: config, ...`
        assert "usage: bignlp-jax train CONFIG [KEY=VALUE ...]" in proc.stderr
        assert "e.g. bignlp-jax train tiny" in proc.stderr
        assert "overrides" not in proc.stderr and "exit 2" in proc.stderr


def test_user_error_is_one_line_exit_2_and_verbose_adds_the_traceback(tmp_path, capsys):
    assert cli.main(["eval", "runs/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bignlp-jax eval: error: no run directory runs/nope")
    assert "fix: pass a run directory" in err and "Traceback" not in err
    assert cli.main(["--verbose", "eval", "runs/nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "no run directory runs/nope" in err


def test_a_bug_exits_1_with_traceback_and_bug_report_line(monkeypatch, capsys):
    def broken(args):
        return {}["our own bug"]

    monkeypatch.setattr(cli, "cmd_describe", broken)
    assert cli.main(["describe", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'our own bug'" in err
    assert err.strip().splitlines()[-1] == f"bignlp-jax describe: internal error: {cli.BUG_REPORT}"


def test_unwritable_paths_are_refused_before_building_anything(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert cli.main(["train", "tiny", f"run.dir={blocker}/run"]) == 2
    err = capsys.readouterr().err
    assert f"error: run.dir {blocker}/run is not writable" in err and "run.dir=DIR" in err
    assert cli.main(["pipeline", "pipelines/mini", f"output_dir={blocker}/p"]) == 2
    assert "the pipeline's output_dir" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(tmp_path), "--out", f"{blocker}/x/hf"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_library_prefix_is_not_doubled(monkeypatch, capsys):
    from bignlp_jax.errors import UserError
    from bignlp_jax.infer import commands

    def refuse(args):
        raise UserError("generate: top_p must be in (0, 1], got 2.0")

    monkeypatch.setattr(commands, "cmd_generate", refuse)
    assert cli.main(["generate", "--run", "r", "--prompt", "x", "--top-p", "2"]) == 2
    assert capsys.readouterr().err == (
        "bignlp-jax generate: error: top_p must be in (0, 1], got 2.0\n")


def test_only_storage_errors_count_as_unreadable_checkpoints():
    from bignlp_jax.checkpoint.read_errors import DamagedCheckpoint, is_read_error

    def orbax_style(cause: BaseException) -> Exception:  # Orbax re-raises a bare Exception
        try:
            try:
                raise cause
            except BaseException as e:
                raise Exception("Encountered error while reading array index") from e
        except Exception as wrapped:
            return wrapped

    def raised_in(module: str, error: BaseException) -> BaseException:
        """`error` as raised by code of `module` (its frame's __name__ is what counts)."""
        scope: dict = {"__name__": module}
        exec("def fail(e):\n    raise e\n", scope)
        try:
            scope["fail"](error)
        except BaseException as e:  # noqa: BLE001 - returned to the caller
            return e
        raise AssertionError("unreachable")

    # TensorStore's corrupt-chunk error, re-raised by Orbax
    tensorstore = raised_in("orbax.checkpoint._src.serialization.tensorstore_utils",
                            ValueError("DATA_LOSS: truncated chunk"))
    assert is_read_error(orbax_style(tensorstore))
    assert is_read_error(FileNotFoundError("checkpoints/12/state/_METADATA"))
    assert is_read_error(DamagedCheckpoint("state/d/x fails its checksum"))
    # the same ValueError raised by our own code: a bug, whatever Orbax wraps it in
    ours = raised_in("bignlp_jax.train.start", ValueError("DATA_LOSS: truncated chunk"))
    assert not is_read_error(orbax_style(ours)) and not is_read_error(ours)
    assert not is_read_error(orbax_style(TypeError("unsupported operand")))  # our bug
    assert not is_read_error(AttributeError("'NoneType' object has no attribute 'shape'"))


def test_a_reader_that_leaves_ends_the_command_quietly():
    """`bignlp-jax describe ... | head`: the reader closes the pipe before we write; the command
    ends with SIGPIPE's status (141) and says nothing, instead of an 'internal error'."""
    proc = subprocess.Popen([sys.executable, "-m", "bignlp_jax.cli", "describe", "configs/tiny.yaml"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert "internal error" not in err and "Traceback" not in err, err
