"""Untrusted inputs: crafted folders, manifests, launcher values and YAML, tried as an attacker would.

Payload lists live here; every reader and writer is tried with them and must (a) execute
nothing, (b) read and write nothing outside the folders it was given, and (c) refuse in one
line (exit 2 for the CLI). Unit calls wherever they reach the same code as a command.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_export_hf import VARIANTS, random_params

from bignlp_jax.cli import main
from bignlp_jax.containment import check_tree, contained
from bignlp_jax.errors import UserError
from bignlp_jax.hf.weights import export_hf

# names a file inside a folder may give for another file, none of which stays inside it
TRAVERSAL = ["../outside.bin", "a/../../outside.bin", "/etc/passwd", "/dev/zero", "gs://b/x",
             "s3://b/../x", "..", "..\\outside.bin", "C:\\Windows\\x", "", "a\0b"]
# characters a shell, sbatch or YAML gives a meaning to
SHELL = ["$(touch {canary})", "`touch {canary}`", "; touch {canary}", "| touch {canary}",
         "&& touch {canary}", "\ntouch {canary}", "'; touch {canary}; '", '"; touch {canary}; "']
YAML = ["a: b", "- x", "{x: 1}", "[1]", "&a *a", "!!python/object:os.system", "0o17", "yes",
        "no", "on", "1e3", "0x1f", "~", "null", "1_000", "2001-01-01", "'q", '"q', "# c",
        "a\nb: c", "%TAG", "@x", "`x", "|", ">"]


@pytest.fixture(scope="module")
def opened():
    """Paths Python opens while a test's `watch` is on (sys.addaudithook: open, os.open)."""
    seen: list[str] = []
    on = [False]

    def hook(event, args):
        if on[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)

    class Watch:
        def __enter__(self):
            seen.clear()
            on[0] = True
            return seen

        def __exit__(self, *exc):
            on[0] = False

    return Watch


def _inside(paths, *folders) -> list[str]:
    """The opened paths that lie outside every folder (and outside Python's own files)."""
    allowed = [Path(f).resolve() for f in folders]
    allowed += [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, *sys.path} if p]
    return [p for p in paths if not any(Path(p).resolve().is_relative_to(a) for a in allowed)]


def _one_line_refusal(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------- containment rule

@pytest.mark.parametrize("name", TRAVERSAL)
def test_names_leaving_the_folder_are_refused_local_and_bucket(tmp_path, name):
    (tmp_path / "in").mkdir()
    for folder in (tmp_path / "in", "gs://bucket/in", "s3://bucket/in"):
        with pytest.raises(UserError) as e:
            contained(folder, name)
        assert len(str(e.value).splitlines()) == 1 and str(folder) in str(e.value)


def test_names_inside_are_kept_and_symlinks_that_leave_are_refused(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"x")
    (tmp_path / "secret").write_text("outside")
    (folder / "inner").symlink_to(folder / "sub" / "a.bin")  # stays inside: fine
    assert contained(folder, "sub/../sub/a.bin") == folder / "sub/../sub/a.bin"
    assert contained(folder, "inner") == folder / "inner"
    assert str(contained("gs://b/run", "sub/./x")) == "gs://b/run/sub/x"
    (folder / "leak").symlink_to(tmp_path / "secret")
    (folder / "dirleak").symlink_to(tmp_path)
    (folder / "zero").symlink_to("/dev/zero")
    for name in ("leak", "dirleak/secret", "zero"):
        with pytest.raises(UserError, match=f"'{name}'.*{folder}"):
            contained(folder, name)
    os.mkfifo(folder / "pipe")  # inside, but reading it would block forever
    with pytest.raises(UserError, match="not a regular file"):
        contained(folder, "pipe")
    with pytest.raises(UserError, match="refused"):
        check_tree(folder)


# ---------------------------------------------------------------------- Hugging Face import

@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    """A small Llama in several safetensors files with an index, plus a tokenizer.model."""
    cfg = VARIANTS["llama_gqa"]
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(random_params(cfg), cfg, out, max_shard_size="8KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def _crafted(hf_sharded, tmp_path, payload: str):
    """A copy of the model under tmp_path/in whose index points one tensor at `payload`
    (a real weight file copied outside, so a reader that follows the name imports it)."""
    folder = tmp_path / "in" / "model"
    shutil.copytree(hf_sharded, folder)
    first = sorted(folder.glob("*.safetensors"))[0]
    shutil.copy(first, tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(k for k, v in data["weight_map"].items() if v == first.name)
    data["weight_map"][name] = payload.format(outside=tmp_path / "outside.safetensors")
    index.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("payload", ["../../outside.safetensors", "{outside}", "/etc/passwd",
                                     "/dev/zero", "sub/../../../outside.safetensors"])
def test_import_refuses_a_weight_map_naming_files_outside(hf_sharded, tmp_path, payload, capsys,
                                                          opened):
    folder = _crafted(hf_sharded, tmp_path, payload)
    with opened() as seen:
        code = main(["import", "--from", str(folder), "--out", str(tmp_path / "run")])
    assert code == 2
    _one_line_refusal(capsys, "model.safetensors.index.json", str(folder))
    assert _inside(seen, folder) == []
    assert not (tmp_path / "run").exists()


def test_import_refuses_symlinks_out_of_the_model_folder(hf_sharded, tmp_path, capsys, opened):
    (tmp_path / "secret.model").write_bytes(b"not yours")
    shard = sorted(hf_sharded.glob("*.safetensors"))[0].name
    for name, target in (("tokenizer.model", tmp_path / "secret.model"),
                         ("config.json", Path("/etc/passwd")),
                         (shard, tmp_path / "secret.model")):
        folder = tmp_path / name / "model"
        shutil.copytree(hf_sharded, folder)
        if (folder / name).exists():
            (folder / name).unlink()
        (folder / name).symlink_to(target)
        with opened() as seen:
            code = main(["import", "--from", str(folder), "--out", str(tmp_path / name / "run")])
        assert code == 2, name
        _one_line_refusal(capsys, name, str(folder), "symlink")
        assert _inside(seen, folder) == []
        assert not (tmp_path / name / "run").exists()


# ---------------------------------------------------------------------- listening sockets

REPO = Path(__file__).resolve().parents[1]
# A stand-in for the `bignlp-jax` executable: the coordinator sub-command is the real one; a
# worker joins the job as every command does, brings up the cross-process (gloo) collectives,
# then waits so the test can list what the job listens on.
WORKER = """#!{python}
import os, sys, time
if sys.argv[1] == "coordinator":
    from bignlp_jax.cli import main
    sys.exit(main(sys.argv[1:]))
import jax
from jax.experimental import multihost_utils
from bignlp_jax.parallel.distributed import maybe_initialize
maybe_initialize(None)
multihost_utils.process_allgather(jax.numpy.ones(1))
open(os.path.join({out!r}, f"ready.{{jax.process_index()}}"), "w").close()
while not os.path.exists(os.path.join({out!r}, "go")):
    time.sleep(0.05)
"""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _listening(pids: set[int]) -> list[str]:
    """host:port of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(words)
                if ip.version == 6 and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                out.append(f"{'loopback' if ip.is_loopback else 'WIDE'} {ip}:{int(port, 16)}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["launcher", "process0"])
def test_a_local_job_listens_on_loopback_only(tmp_path, mode):
    script = tmp_path / "fake-bignlp-jax"
    script.write_text(WORKER.format(python=sys.executable, out=str(tmp_path)))
    script.chmod(0o755)
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
         "--devices-per-process", "1", "--bignlp-jax", str(script),
         "--coordination-service", mode, "--", "train"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready.{i}").exists() for i in range(2)):
            assert launcher.poll() is None, launcher.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the workers did not join"
            time.sleep(0.1)
        listeners = _listening(_descendants(launcher.pid))
    finally:
        (tmp_path / "go").touch()
        output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, output[-3000:]
    assert listeners, "found no listener at all (the coordination service must be one)"
    assert [x for x in listeners if not x.startswith("loopback")] == [], listeners


# ---------------------------------------------------------------------- run directories

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A params-only run directory (GPT variant, no tokenizer) and an outside tokenizer."""
    from bignlp_jax.config import Config, DataConfig, RunConfig
    from bignlp_jax.data.tokenizer import train_tokenizer
    from bignlp_jax.export.bundle import save_params_bundle

    cfg = VARIANTS["gpt"]
    root = tmp_path_factory.mktemp("bundle")
    save_params_bundle(random_params(cfg), Config(model=cfg, data=DataConfig(seq_len=32),
                                                  run=RunConfig(dir=str(root / "run"))),
                       root / "run", step=3)
    tok = root / "outside_tokenizer"
    train_tokenizer(["def f(x):\n    return x\n" * 20, "class A:\n    pass\n" * 20], tok,
                    vocab_size=300)
    return root / "run", tok


def _crafted_run(bundle, tmp_path) -> Path:
    run = tmp_path / "in" / "run"
    shutil.copytree(bundle[0], run, symlinks=True)
    return run


def _export(run, tmp_path, capsys, opened, *needles):
    out = tmp_path / "o" / "out"  # the writability probe writes beside it, in o/
    out.parent.mkdir(parents=True, exist_ok=True)  # (the probe writes in the nearest existing dir)
    with opened() as seen:
        code = main(["export", "--run", str(run), "--format", "hf", "--out", str(out)])
    assert code == 2
    _one_line_refusal(capsys, *needles)
    assert _inside(seen, run, out.parent) == []
    assert not out.exists()


def test_export_copies_no_tokenizer_from_outside_the_run(bundle, tmp_path, capsys, opened):
    run = _crafted_run(bundle, tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("tokenizer: null",
                                                 f"tokenizer: {bundle[1]}"))
    assert str(bundle[1]) in config.read_text()
    _export(run, tmp_path, capsys, opened, "data.tokenizer", str(run))
    (run / "tokenizer").symlink_to(bundle[1])  # the run's own tokenizer/, leading out
    _export(run, tmp_path, capsys, opened, "'tokenizer", "symlink", str(run))


def test_run_dir_files_that_lead_outside_are_refused(bundle, tmp_path, capsys, opened):
    from bignlp_jax.checkpoint import resolve_step_dir

    run = _crafted_run(bundle, tmp_path)
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(tmp_path / "config.yaml")
    _export(run, tmp_path, capsys, opened, "'config.yaml'", "symlink", str(run))

    run = _crafted_run(bundle, tmp_path / "2")
    state = run / "checkpoints" / "3" / "state"
    victim = sorted(p for p in state.rglob("*") if p.is_file())[0]
    shutil.move(victim, tmp_path / "moved")
    victim.symlink_to(tmp_path / "moved")
    with pytest.raises(UserError, match=f"symlink in {run}"):  # init_from, generate, export
        resolve_step_dir(run)
    _export(run, tmp_path / "2", capsys, opened, victim.name, str(run))


# ---------------------------------------------------------------------- launchers

def _sbatch_argument(line: str) -> str:
    """What sbatch makes of the value of one `#SBATCH --opt=VALUE` line (its _get_argument:
    backslash escapes, double quotes group, `#` outside quotes starts a comment)."""
    text = line.split("=", 1)[1]
    out, quoted, escape = [], False, False
    for c in text:
        if escape:
            out.append(c)
            escape = False
        elif c == "\\":
            escape = True
        elif c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            break
        elif c.isspace() and not quoted:
            break
        else:
            out.append(c)
    return "".join(out)


SBATCH_VALUES = [p.format(canary="CANARY") for p in SHELL] + [
    "x\\", "a\\nb", 'a"b', "a#b", "a b", "tab\there", "nul\0", "%j", "$HOME", "ok-value_1.2"]


@pytest.mark.parametrize("value", SBATCH_VALUES)
def test_sbatch_values_reach_sbatch_unchanged_or_are_refused_in_one_line(tmp_path, value):
    from launch.common import LaunchError, Stage
    from launch.slurm_script import SlurmOptions, render_script

    stage = Stage("train", ("train", "tiny", f"run.name={value}"))
    for field in ("account", "partition", "qos", "time"):
        try:
            script = render_script(stage, SlurmOptions(**{field: value}), tmp_path / "job",
                                   ["bignlp-jax"])
        except LaunchError as e:
            assert len(str(e).splitlines()) == 1 and f"--{field}" in str(e)
            continue
        [line] = [x for x in script.splitlines() if x.startswith(f"#SBATCH --{field}=")]
        assert _sbatch_argument(line) == value, line
        # the script itself, run by bash with stand-ins for srun/scontrol, executes nothing
        fake = "srun() { :; }; scontrol() { :; }; export -f srun scontrol;"
        subprocess.run(["bash", "-c", fake + " bash -s"], input=script, text=True,
                       capture_output=True, cwd=tmp_path, timeout=60,
                       env={**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n"})
        assert not list(tmp_path.rglob("CANARY"))
    # a verbatim --sbatch option is written bare: one holding any of them is refused
    option = [f"--comment={value}"]
    if any(c in value for c in '\\"#') or any(c.isspace() or ord(c) < 32 for c in value):
        with pytest.raises(LaunchError, match="--comment"):
            render_script(stage, SlurmOptions(sbatch_args=option), tmp_path / "job", ["x"])
    else:
        script = render_script(stage, SlurmOptions(sbatch_args=option), tmp_path / "job", ["x"])
        assert f"#SBATCH --comment={value}\n" in script


def test_long_paths_give_one_line(tmp_path, capsys):
    from launch import slurm

    long = str(tmp_path / ("d" * 300))
    for argv in (["submit", "--job-dir", long, "tiny"], ["submit", "tiny", f"run.dir={long}"]):
        assert slurm.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("too long" in err or "255" in err), err
        assert len(err.strip().splitlines()) <= 2, err  # config errors: a heading, then the key


def test_jobset_strings_read_the_same_in_yaml_1_1_and_1_2():
    import io

    import yaml
    from ruamel.yaml import YAML as YAML12  # noqa: N811 - a YAML 1.2 reader

    from launch.common import Stage
    from launch.k8s_manifest import render_jobset, to_yaml
    from launch.k8s_options import K8sOptions

    env = {f"V{i}": value for i, value in enumerate(YAML + ["0o17", "1e3", "+1", ".5", "y", "n",
                                                            "0b1", "-.inf", ".NaN", ""])}
    stage = Stage("train", ("train", "tiny", *YAML))
    manifest = render_jobset([stage], K8sOptions(name="demo", image="img", nodes=2, env=env))
    text = to_yaml(manifest)
    assert yaml.safe_load(text) == manifest
    assert YAML12(typ="safe", pure=True).load(io.StringIO(text)) == manifest


@pytest.mark.parametrize("change", [
    {"name": "Bad_Name"}, {"namespace": "a b"}, {"namespace": "x" * 64},
    {"service_account": "sa;rm"}, {"env": {"1BAD": "x"}}, {"env": {"A B": "x"}},
    {"env": {"A\nB": "x"}}, {"node_selector": {"k": "v v"}}, {"node_selector": {"-k": "v"}},
    {"pvcs": {"Claim!": "/data"}}, {"pvcs": {"data": "relative"}}, {"cpu": "lots"},
    {"memory": "1GB; rm"}, {"image": "img\nkind: Secret"}])
def test_kubernetes_names_are_checked_before_rendering(change):
    from launch.common import LaunchError, Stage
    from launch.k8s_manifest import render_jobset
    from launch.k8s_options import K8sOptions

    opts = K8sOptions(**{"name": "demo", "image": "img", "nodes": 2, **change})
    with pytest.raises(LaunchError) as e:
        render_jobset([Stage("train", ("train", "tiny"))], opts)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("content", [b"secret line one\n  key: [unclosed\npassword: x : y\n",
                                     b"\x00\xff\xfe secret", b"- just\n- a list\n"])
def test_a_defaults_entry_that_is_not_yaml_is_not_echoed(tmp_path, content):
    from bignlp_jax.config import load_config

    (tmp_path / "secret.txt").write_bytes(content)
    (tmp_path / "c.yaml").write_text("defaults: [secret.txt]\n")
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "c.yaml")
    assert "secret.txt" in str(e.value) and "secret line" not in str(e.value)
    # one line naming the file and the problem, then the fix; never the file's own lines
    lines = str(e.value).splitlines()
    assert "password" not in str(e.value) and len(lines) <= 2
    assert len(lines) == 1 or lines[1].startswith("  fix: ")


# ---------------------------------------------------------------------- user files are kept

def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder` with its bytes and mode (and every directory's mode)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mode)
            for p in sorted(folder.rglob("*"))} | {".": (b"", folder.stat().st_mode)}


def _user_dir(path: Path, *extra: str) -> Path:
    """A directory of someone's files, with names our writers also use."""
    (path / "notes").mkdir(parents=True)
    for name in ("README.md", "report.md", "config.json", "config.yaml", "notes/todo.txt", *extra):
        (path / name).write_text(f"the user's {name}\n")
    path.chmod(0o751)
    return path


def test_writing_commands_never_replace_a_directory_of_user_files(bundle, hf_sharded, tmp_path,
                                                                  capsys):
    run, _ = bundle
    cases = [
        ["export", "--run", str(run), "--format", "hf", "--out"],
        ["export", "--run", str(run), "--format", "params", "--out"],
        ["import", "--from", str(hf_sharded), "--out"],
    ]
    for i, argv in enumerate(cases):
        users = _user_dir(tmp_path / f"u{i}")
        before = _snapshot(users)
        for overwrite in ([], ["--overwrite"]):
            assert main([*argv, str(users), *overwrite]) == 2, argv
            _one_line_refusal(capsys, str(users), "no export of ours")
            assert _snapshot(users) == before
            assert sorted(p.name for p in users.parent.iterdir()) == sorted(
                p.name for p in users.parent.iterdir() if not p.name.startswith("."))


def test_an_earlier_export_is_replaced_only_with_overwrite_and_only_if_exact(bundle, tmp_path,
                                                                             capsys):
    run, _ = bundle
    out = tmp_path / "out"
    argv = ["export", "--run", str(run), "--format", "hf", "--out", str(out)]
    assert main(argv) == 0
    assert (out / ".bignlp-written.json").is_file()
    assert main(argv) == 2
    _one_line_refusal(capsys, "--overwrite")
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()
    (out / "my_notes.md").write_text("mine")  # the user adds a file to the export
    before = _snapshot(out)
    assert main([*argv, "--overwrite"]) == 2
    _one_line_refusal(capsys, "my_notes.md")
    assert _snapshot(out) == before


def test_the_pipeline_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    out = _user_dir(tmp_path / "pipe", "loss_curves.png")
    before = _snapshot(out)
    assert main(["pipeline", str(REPO / "configs" / "pipelines" / "mini.yaml"),
                 f"output_dir={out}"]) == 2
    _one_line_refusal(capsys, "report.md", "loss_curves.png", str(out))
    assert _snapshot(out) == before


def test_bucket_client_tracebacks_go_to_the_log_at_debug_level(caplog):
    import logging

    from bignlp_jax import storage

    storage.path("gs://bucket/x")  # a bucket path sets it up
    for level in (logging.WARNING, logging.DEBUG):
        caplog.clear()
        with caplog.at_level(level):
            try:
                raise OSError("Metadata in the request couldn't decode, 400")
            except OSError:
                logging.getLogger("gcsfs").exception("_request non-retriable exception")
        records = [r for r in caplog.records if r.name == "gcsfs"]
        if level == logging.WARNING:  # the default: nothing reaches a handler
            assert records == []
        else:  # asked for: there, at debug level, traceback included
            [record] = records
            assert record.levelno == logging.DEBUG and record.exc_info is not None


def test_generate_reads_no_tokenizer_through_a_run_dir_symlink(bundle, tmp_path, capsys, opened):
    run = _crafted_run(bundle, tmp_path)
    (run / "tokenizer").symlink_to(bundle[1])
    with opened() as seen:
        code = main(["generate", "--run", str(run), "--prompt", "x", "--max-new-tokens", "1"])
    assert code == 2
    _one_line_refusal(capsys, "tokenizer", "symlink", str(run))
    assert _inside(seen, run) == []


def test_a_lost_bucket_endpoint_is_one_line_not_a_bug(monkeypatch, capsys):
    import aiohttp

    from bignlp_jax import cli, outage

    class ClientConnectorError(aiohttp.ClientConnectionError):  # aiohttp's, without a socket
        host, port = "127.0.0.1", 38107

    def save(*args):
        try:
            raise ClientConnectorError("Cannot connect to host 127.0.0.1:38107")
        except aiohttp.ClientConnectionError as e:
            raise RuntimeError("orbax: save failed") from e

    monkeypatch.setattr(cli, "build_parser", lambda argv: _parser_running(save))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "127.0.0.1:38107" in err and "test_security.py" not in err, err
    assert outage.describe(RuntimeError("a bug of ours")) is None


def _parser_running(fn):
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.set_defaults(func=fn, verbose=False)
    return parser
