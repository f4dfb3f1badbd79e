"""launch/slurm.py: rendered scripts (resources, environment, quoting), and real jobs on a
one-node SLURM cluster started by tests/slurm/cluster.sh (needs root; installs slurm-wlm)."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from compile_flags import xla_flags
from conftest import REPO

sys.path.insert(0, str(REPO))  # `launch` is a top-level folder of the repository

from launch.common import LaunchError, Stage, bignlp_jax_command, plan_stages  # noqa: E402
from launch.slurm import submit  # noqa: E402
from launch.slurm_script import SlurmOptions, render_script  # noqa: E402

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_DIR = Path(os.environ.get("BIGNLP_SLURM_DIR", "/tmp/bignlp-slurm"))
NASTY = "a b;$(touch PWNED)`touch PWNED`'\"&|>x"


# ---------------------------------------------------------------- rendering (no cluster needed)

def script_lines(script: str, prefix: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith(prefix)]


def test_rendered_script_resources_env_and_command(tmp_path):
    opts = SlurmOptions(nodes=4, gpus_per_node=8, tasks_per_node=8, partition="gpu",
                        time="04:00:00", account="proj1", container_image="nvcr.io/x/jax:1",
                        env={"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true",
                             "NCCL_DEBUG": "WARN"}, job_name="bignlp-demo", signal_before=240)
    stage = Stage("pretrain", ("pipeline", "/p.yaml", "--stage", "pretrain", "train.steps=10"))
    script = render_script(stage, opts, tmp_path / "job", ["bignlp-jax"], 0, 2)
    directives = script_lines(script, "#SBATCH")
    for expected in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                     "--time=04:00:00", "--account=proj1", "--requeue", "--signal=TERM@240",
                     "--open-mode=append", "--job-name=bignlp-demo-pretrain",
                     f"--output={tmp_path}/job/slurm/00-pretrain-%j.out"]:
        assert f"#SBATCH {expected}" in directives, (expected, directives)
    assert "export NCCL_DEBUG=WARN" in script
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(srun.rstrip(" &"))
    assert argv[:5] == ["srun", "--kill-on-bad-exit=0", "--wait=60", "--label",
                        "--container-image=nvcr.io/x/jax:1"]
    assert argv[-6:] == ["bignlp-jax", "pipeline", "/p.yaml", "--stage", "pretrain",
                         "train.steps=10"]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and '"$rc" -eq 75' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_metacharacters_reach_bignlp_jax_verbatim(tmp_path):
    """A run name full of shell syntax is one argument to bignlp-jax and runs nothing."""
    job_dir = tmp_path / "job dir;$(touch PWNED)"
    stage = Stage(NASTY, ("train", "tiny", f"run.name={NASTY}", f"run.dir={job_dir}"))
    script = render_script(stage, SlurmOptions(job_name=f"x{NASTY}"), job_dir, ["bignlp-jax"])
    assert re.search(r"^#SBATCH --job-name=[A-Za-z0-9._-]+$", script, re.M)
    # run the script with stand-ins that print their arguments instead of srun/scontrol
    fake = "srun() { shift 4; printf '%s\\n' \"$@\"; }; scontrol() { :; }; export -f srun scontrol;"
    env = {**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}
    out = subprocess.run(["bash", "-c", fake + " bash -s"], input=script, text=True,
                         capture_output=True, cwd=tmp_path, env=env, check=True).stdout
    assert f"run.name={NASTY}\n" in out and f"stage {NASTY} on n1" in out
    assert not list(tmp_path.rglob("PWNED"))
    # sbatch directives cannot carry a double quote: refused with the option named
    with pytest.raises(LaunchError, match="#SBATCH --output"):
        render_script(stage, SlurmOptions(), tmp_path / 'a"b', ["bignlp-jax"])


def test_dry_run_chains_stages_and_writes_nothing(tmp_path, capsys):
    stages = [Stage("pretrain", ("train", "a.yaml")), Stage("finetune", ("train", "b.yaml"))]
    ids = submit(stages, SlurmOptions(), tmp_path / "job", dry_run=True)
    out = capsys.readouterr().out
    assert ids == ["<job 1>", "<job 2>"]
    assert "'--dependency=afterok:<job 1>'" in out  # the 2nd stage waits for the 1st
    assert out.count("#!/bin/bash") == 2
    assert not (tmp_path / "job").exists()


def test_pipeline_stages_come_from_list_stages(tmp_path):
    fake = tmp_path / "fake-bignlp-jax"
    fake.write_text('#!/bin/sh\necho "loading..."\necho \'["pretrain", "finetune"]\'\n')
    fake.chmod(0o755)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("output_dir: out\npretrain: {config: tiny.yaml}\n")
    stages = plan_stages([str(fake)], str(pipeline), ["x=1"])
    assert stages == [
        Stage("pretrain", ("pipeline", str(pipeline), "--stage", "pretrain", "x=1")),
        Stage("finetune", ("pipeline", str(pipeline), "--stage", "finetune", "x=1")),
    ]
    tiny = str(REPO / "configs" / "tiny.yaml")  # names resolve to absolute paths for the job
    assert plan_stages([str(fake)], "tiny", ["x=1"]) == [Stage("train", ("train", tiny, "x=1"))]


# ---------------------------------------------------------------- a real local SLURM cluster

@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the one-node cluster for this session (installing SLURM if needed); stop it after."""
    if os.geteuid() != 0:
        pytest.skip("SLURM TESTS SKIPPED: the local cluster needs root (tests/slurm/cluster.sh)")
    env = {**os.environ, "BIGNLP_SLURM_DIR": str(SLURM_DIR)}
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode == 3:
        pytest.skip(f"SLURM TESTS SKIPPED: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, f"cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    yield SLURM_DIR
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, until, log_glob: Path, timeout: float = 1200) -> dict[str, str]:
    """Poll scontrol until `until(info)` holds; fail with the job's log if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if until(info):
            return info
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                "OUT_OF_MEMORY"):
            break  # finished without reaching the state we wait for
        time.sleep(0.25)
    logs = "\n".join(p.read_text(errors="replace")[-3000:]  # srun --label may split UTF-8
                     for p in sorted(log_glob.parent.glob(log_glob.name)))
    pytest.fail(f"job {job_id} is {info['JobState']} ({info.get('Reason')}):\n{logs}")


def done(info):
    return info["JobState"] == "COMPLETED"


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records}


def submit_cli(*argv: str, env: dict, cwd: Path) -> list[str]:
    """Run `launch/slurm.py submit ...`; returns the job ids it reports."""
    proc = subprocess.run([sys.executable, str(REPO / "launch/slurm.py"), "submit", *argv],
                          env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r"as job (\d+)", proc.stdout)


CPU_TASKS = ["--tasks-per-node", "2", "--env", "JAX_PLATFORMS=cpu",
             "--env", f"XLA_FLAGS={xla_flags(2)}"]


@pytest.mark.slurm
@pytest.mark.timeout(1800)  # the first one may install SLURM with apt-get
def test_two_stage_pipeline_on_slurm(slurm_cluster, tmp_path, cli_env):
    out = tmp_path / "pipe"
    stage = ("{config: %s, data: {source: synthetic}, "
             "train: {steps: 4, log_every: 1, eval_every: 0}}" % (REPO / "configs/tiny.yaml"))
    pipeline = tmp_path / "two_stages.yaml"
    pipeline.write_text(f"name: two\noutput_dir: {out}\npretrain: {stage}\nfinetune: {stage}\n"
                        "evaluate: false\n")
    first, second = submit_cli(*CPU_TASKS, str(pipeline), env=cli_env, cwd=tmp_path)
    logs = out / "slurm"  # scripts and logs are kept in the pipeline's output_dir
    pre = wait_job(first, done, logs / "00-*.out")
    fine = wait_job(second, done, logs / "01-*.out")
    assert fine["StartTime"] >= pre["EndTime"]  # ISO timestamps: the chain ran in order
    assert (logs / "00-pretrain.sbatch").is_file() and (logs / "01-finetune.sbatch").is_file()

    pre_log = next(logs.glob("00-pretrain-*.out")).read_text(errors="replace")
    fine_log = next(logs.glob("01-finetune-*.out")).read_text(errors="replace")
    # two SLURM tasks joined into one JAX job of 2 processes x 2 devices
    assert "joined process 0 of 2 (layout from slurm" in pre_log, pre_log[-3000:]
    meta = json.loads((out / "pretrain/checkpoints/4/meta/metadata").read_text())
    assert (meta["process_count"], meta["device_count"]) == (2, 4)
    # the finetune job started from the pretrain job's final checkpoint
    assert f"parameters from init_from={out / 'pretrain'}" in fine_log, fine_log[-3000:]
    assert losses(out / "finetune")[1] < losses(out / "pretrain")[1]
    records = [json.loads(line) for line in (logs / "jobs.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["after"]) for r in records] == [("pretrain", None), ("finetune", first)]


@pytest.mark.slurm
@pytest.mark.timeout(1800)  # the first one may install SLURM with apt-get
def test_sigterm_requeues_and_resumes_to_the_same_result(slurm_cluster, tmp_path, cli_env):
    run_dir, steps = tmp_path / "run", 60  # SIGTERM comes after step 3: seconds before the end
    overrides = [f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
                 "data.source=synthetic", f"run.dir={run_dir}", f"run.name={NASTY}"]
    [job] = submit_cli(*CPU_TASKS, "tiny", *overrides, env=cli_env, cwd=tmp_path)
    log = run_dir / "slurm" / "00-train-*.out"

    # once training is under way, send SIGTERM the way SLURM does before a time limit
    wait_job(job, lambda info: (run_dir / "metrics.jsonl").is_file()
             and len(losses(run_dir)) >= 3, log)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    wait_job(job, lambda info: int(info["Restarts"]) >= 1, log)
    # SLURM holds the requeued job for cred_expire (10 s in cluster.sh) and then starts it again;
    # starting it sooner (scontrol update StartTime=now) makes slurmd refuse the launch with a
    # revoked credential and the job FAILS, so the test waits like a real cluster does.
    wait_job(job, done, log)

    text = next(run_dir.glob("slurm/00-train-*.out")).read_text(errors="replace")
    assert "exited 75; requeueing job" in text, text[-3000:]
    stopped = int(re.search(r"stopped after step (\d+)", text).group(1))
    assert 3 <= stopped < steps
    assert f"resumed from checkpoint {run_dir}/checkpoints/{stopped}" in text
    assert not list(tmp_path.rglob("PWNED"))

    # the same run without interruption, in this process on the same 4 devices
    import jax

    from bignlp_jax.config import load_config
    from bignlp_jax.train.loop import train

    ref_dir = tmp_path / "reference"
    train(load_config("tiny", [*overrides[:4], f"run.dir={ref_dir}"]), devices=jax.devices()[:4])
    got, want = losses(run_dir), losses(ref_dir)
    assert sorted(got) == list(range(1, steps + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                               rtol=1e-4)


def test_bignlp_jax_command_is_this_environment():
    cli = bignlp_jax_command()
    assert Path(cli[0]).is_absolute()
    assert Path(cli[0]).parent == Path(sys.executable).parent or cli[1:] == ["-m", "bignlp_jax.cli"]


def test_launcher_run_by_a_python_without_jax_says_to_use_the_venv(monkeypatch, capsys):
    import importlib.util

    from launch import slurm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real(name, *a))
    assert slurm.main(["submit", "--dry-run", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no jax" in err
    assert ".venv/bin/python" in err and "source .venv/bin/activate" in err


@pytest.mark.parametrize("launcher, argv, message", [
    ("slurm", ["submit", "--dry-run", "tiny", "--env", "NOEQUALS"],
     "--env 'NOEQUALS' is not KEY=VALUE"),
    ("slurm", ["submit", "--dry-run", "tiny", "--env", "=x"], "--env '=x' is not KEY=VALUE"),
    ("k8s", ["render", "--image", "img", "tiny", "--pvc", "runs"],
     "--pvc 'runs' is not KEY:VALUE"),
    ("k8s", ["render", "--image", "img", "tiny", "--node-selector", "=b"],
     "--node-selector '=b' is not KEY=VALUE"),
])
def test_key_value_options_are_checked_alike(capsys, launcher, argv, message):
    import importlib

    module = importlib.import_module(f"launch.{launcher}")
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(message)
