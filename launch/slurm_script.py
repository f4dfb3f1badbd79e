"""The sbatch script of one stage (launch/slurm.py writes and submits them).

The script asks SLURM for the nodes, GPUs and time, starts one task per node (or per GPU)
with srun, and requeues the job when bignlp-jax exits with 75 (a checkpoint saved on
SIGTERM, before the time limit or on `scancel --signal=TERM`). Every value that goes into an
`#SBATCH` line is checked: characters sbatch's directive parser interprets are refused.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from launch.common import LaunchError, Stage

REQUEUE_EXIT_CODE = 75  # bignlp_jax.errors.REQUEUE_EXIT_CODE: "checkpoint saved, run me again"


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    sbatch_args: list[str] = field(default_factory=list)  # extra "#SBATCH" options, verbatim
    signal_before: int = 300
    requeue: bool = True
    max_restarts: int = 20
    task_exit_wait: int = 60
    executable: str | None = None
    workdir: str = field(default_factory=lambda: str(Path.cwd()))


def safe_name(text: str) -> str:
    """Job and file names: letters, digits, `._-` only (squeue-friendly, no quoting needed)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "job"


# What sbatch's directive parser gives a meaning to: a backslash escapes the next character, a
# double quote opens or closes a quoted value, `#` starts a comment, control characters end
# or break the line. None of them can be passed through, so values holding one are refused.
_SBATCH_SPECIAL = re.compile(r'[\\"#\x00-\x1f\x7f]')


def _refuse_special(what: str, text: str, also: str = "") -> None:
    found = _SBATCH_SPECIAL.search(text) or (re.search(f"[{also}]", text) if also else None)
    if found:
        raise LaunchError(f"{what} {text!r} contains {found.group()!r}, which sbatch's "
                          "#SBATCH parser interprets; remove it")


def _directive(option: str, value: str | int | None = None) -> str:
    """One `#SBATCH` line. sbatch (not a shell) reads these; it accepts double-quoted values."""
    # an option is written bare: a space would split it into two arguments
    _refuse_special("#SBATCH option", option, also=r"\s")
    if value is None:
        return f"#SBATCH {option}"
    text = str(value)
    _refuse_special(f"#SBATCH {option}: value", text)
    if re.fullmatch(r"[A-Za-z0-9_./:@%+,=-]+", text):
        return f"#SBATCH {option}={text}"
    return f'#SBATCH {option}="{text}"'


def script_dir(job_dir: Path) -> Path:
    """Where the scripts and job logs of `job_dir` go (JOB_DIR/slurm/)."""
    log_dir = job_dir / "slurm"
    if "%" in str(log_dir):  # sbatch expands %j, %x, ... in --output: the logs would go elsewhere
        raise LaunchError(f"job directory {job_dir} contains '%', which sbatch expands in "
                          "--output file names; choose a path without it (run.dir or --job-dir)")
    return log_dir


def render_script(stage: Stage, opts: SlurmOptions, job_dir: Path, cli: list[str],
                  index: int = 0, total: int = 1) -> str:
    """The sbatch script of one stage (a complete, self-describing file)."""
    log_dir = script_dir(job_dir)
    name = safe_name(f"{opts.job_name or 'bignlp-' + job_dir.name}-{stage.name}")
    directives = [
        _directive("--job-name", name),
        _directive("--nodes", opts.nodes),
        _directive("--ntasks-per-node", opts.tasks_per_node),
    ]
    if opts.gpus_per_node:
        directives.append(_directive("--gpus-per-node", opts.gpus_per_node))
    if opts.cpus_per_task:
        directives.append(_directive("--cpus-per-task", opts.cpus_per_task))
    for option, value in (("--partition", opts.partition), ("--time", opts.time),
                          ("--account", opts.account), ("--qos", opts.qos)):
        if value:
            directives.append(_directive(option, value))
    directives += [
        _directive("--output", f"{log_dir}/{index:02d}-{safe_name(stage.name)}-%j.out"),
        _directive("--open-mode", "append"),  # a requeued job appends to the same log
        _directive("--chdir", opts.workdir),
        # a failed stage cancels the stages waiting on it instead of leaving them pending
        _directive("--kill-on-invalid-dep", "yes"),
    ]
    if opts.requeue:
        directives += [_directive("--requeue"),
                       _directive("--signal", f"TERM@{opts.signal_before}")]
    else:
        directives.append(_directive("--no-requeue"))
    directives += [_directive(arg) for arg in opts.sbatch_args]

    # Not --kill-on-bad-exit: after a preemption every task exits 75 within moments, and killing
    # the slower ones would turn the requeue code into "Terminated". Instead SLURM kills the
    # others --task-exit-wait seconds after the first task ends (JAX's heartbeat may be sooner).
    srun = ["srun", "--kill-on-bad-exit=0", f"--wait={opts.task_exit_wait}", "--label"]
    if opts.container_image:
        srun.append(f"--container-image={opts.container_image}")
        srun.append(f"--container-workdir={opts.workdir}")
        if opts.container_mounts:
            srun.append(f"--container-mounts={opts.container_mounts}")
    command = shlex.join([*srun, *cli, *stage.args])
    exports = []
    for key, value in sorted(opts.env.items()):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {key}=...: {key!r} is not a valid environment variable name")
        exports.append(f"export {key}={shlex.quote(value)}")
    requeue = (
        f"""if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]; then
  restarts="${{SLURM_RESTART_COUNT:-0}}"
  if [ "$restarts" -ge {opts.max_restarts} ]; then
    echo "bignlp slurm: not requeueing after $restarts restarts (--max-restarts)" >&2
    exit "$rc"
  fi
  echo "bignlp slurm: tasks saved a checkpoint and exited {REQUEUE_EXIT_CODE};" \
    "requeueing job $SLURM_JOB_ID (it resumes from that checkpoint)"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # SLURM ends this script now. Do not exit first: for a moment the job would look FAILED,
    # which could cancel the stages that depend on it.
    sleep 600
  else
    echo "bignlp slurm: scontrol requeue failed; resubmit this script to continue" >&2
  fi
fi
""" if opts.requeue else "")
    return f"""#!/bin/bash
# Stage {index + 1}/{total} ({safe_name(stage.name)}), written by launch/slurm.py.
# Resubmit by hand with: sbatch THIS_FILE
{chr(10).join(directives)}
set -uo pipefail
{chr(10).join(exports)}
printf 'bignlp slurm: job %s stage %s on %s (restart %s)\n' "$SLURM_JOB_ID" \
  {shlex.quote(stage.name)} "$SLURM_JOB_NODELIST" "${{SLURM_RESTART_COUNT:-0}}"

# SIGTERM (time limit near, scancel --signal=TERM) goes to the tasks, which save a checkpoint and
# exit {REQUEUE_EXIT_CODE}. Should this shell get one too, it keeps waiting for them.
trap 'echo "bignlp slurm: batch shell got SIGTERM; waiting for the tasks to save"' TERM
{command} &
srun_pid=$!
while :; do
  wait "$srun_pid"
  rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # still running: wait was interrupted by the trap
done
echo "bignlp slurm: tasks exited with $rc"
{requeue}exit "$rc"
"""
