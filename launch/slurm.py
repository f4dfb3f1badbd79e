"""Submit bignlp-jax to SLURM: one sbatch script per stage, chained with afterok dependencies.

    python launch/slurm.py submit --nodes 4 --gpus-per-node 8 --time 24:00:00 \\
        configs/pipelines/my.yaml run.seed=1

A config is one stage (`bignlp-jax train CONFIG overrides`); a pipeline is one stage per pipeline
stage (`bignlp-jax pipeline P --stage NAME overrides`, names from `--list-stages`). Each stage's
script is written to `JOB_DIR/slurm/` and kept; job output goes next to it. Inside a job, `srun`
starts one task per node (or `--tasks-per-node`, e.g. one per GPU) and bignlp-jax joins the tasks
with jax.distributed from SLURM's variables.

Preemption: SLURM sends SIGTERM `--signal-before` seconds before the time limit (and `scancel
--signal=TERM` does the same); bignlp-jax checkpoints and exits with 75; the script then requeues
the job, which resumes from that checkpoint. Dependent stages wait until it completes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    LaunchError,
    Stage,
    bignlp_jax_command,
    is_pipeline,
    load_run_config,
    main_wrapper,
    parse_pairs,
    pipeline_output,
    plan_stages,
    require_modules,
    resolve_target,
)
from launch.slurm_script import SlurmOptions, render_script, safe_name, script_dir  # noqa: E402


def submit(stages: list[Stage], opts: SlurmOptions, job_dir: Path, dry_run: bool = False,
           after: str | None = None) -> list[str]:
    """Write one script per stage and submit them in order, each after the previous one.
    Returns the job ids (dry run: placeholders, and nothing is written or submitted)."""
    cli = bignlp_jax_command(opts.executable or ("bignlp-jax" if opts.container_image else None))
    log_dir = script_dir(job_dir)
    job_ids: list[str] = []
    records = []
    for i, stage in enumerate(stages):
        script = render_script(stage, opts, job_dir, cli, i, len(stages))
        path = log_dir / f"{i:02d}-{safe_name(stage.name)}.sbatch"
        previous = job_ids[-1] if job_ids else after
        sbatch = ["sbatch", "--parsable"]
        if previous:
            sbatch.append(f"--dependency=afterok:{previous}")
        sbatch.append(str(path))
        if dry_run:
            print(f"# ==> {path} (would run: {shlex.join(sbatch)}) <==")
            print(script)
            job_ids.append(f"<job {i + 1}>")
            continue
        log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(script, encoding="utf-8")
        path.chmod(0o755)
        job_id = _sbatch(sbatch)
        job_ids.append(job_id)
        records.append({"stage": stage.name, "job_id": job_id, "script": str(path),
                        "after": previous})
        print(f"submitted stage {stage.name!r} as job {job_id}"
              + (f" (after job {previous})" if previous else ""), flush=True)
    if records:
        with (log_dir / "jobs.jsonl").open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return job_ids


def _sbatch(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run this on a SLURM login node (or use "
                          "--dry-run to see the scripts)") from None
    if proc.returncode != 0:
        raise LaunchError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurm.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="write and submit the sbatch scripts of a config/pipeline")
    p.add_argument("target", metavar="PIPELINE_OR_CONFIG",
                   help="a pipeline file or a run config (path, or name under configs/)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides passed to every stage")
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: request no GPUs")
    p.add_argument("--tasks-per-node", type=int, default=1,
                   help="processes per node: 1 (each sees all its GPUs; default) or the GPU "
                        "count")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: SLURM's)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--account", help="account to charge (default: yours)")
    p.add_argument("--qos", help="quality of service (default: the account's)")
    p.add_argument("--job-name", help="job name prefix (default: bignlp-<run.name>); the "
                   "stage name is appended")
    p.add_argument("--container-image", help="run tasks in this image (pyxis/enroot srun)")
    p.add_argument("--container-mounts", help="pyxis mounts, e.g. /data:/data,/runs:/runs")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export in the job (repeatable), e.g. XLA_FLAGS=...")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--signal-before", type=int, default=300,
                   help="seconds before the time limit at which tasks get SIGTERM (default 300)")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="do not requeue a job that stopped with a checkpoint (default: requeue)")
    p.add_argument("--max-restarts", type=int, default=20,
                   help="requeues of one job before it counts as failed (default 20)")
    p.add_argument("--task-exit-wait", type=int, default=60,
                   help="seconds after the first task ends before SLURM kills the others "
                        "(default 60)")
    p.add_argument("--bignlp-jax", dest="executable",
                   help="bignlp-jax inside the job (default: the one next to this Python, "
                        "or `bignlp-jax` in a container)")
    p.add_argument("--job-dir", help="where scripts and logs go (default: the run directory, "
                   "or the pipeline's output_dir)")
    p.add_argument("--after", metavar="JOBID", help="start the first stage after this job")
    p.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if not args.container_image and not args.executable:  # the jobs run this interpreter
            require_modules("jax", "bignlp_jax", why="the SLURM jobs run bignlp-jax with")
        opts = SlurmOptions(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
            partition=args.partition, time=args.time, account=args.account, qos=args.qos,
            job_name=args.job_name, container_image=args.container_image,
            container_mounts=args.container_mounts, env=parse_pairs(args.env, "--env"),
            sbatch_args=args.sbatch, signal_before=args.signal_before, requeue=args.requeue,
            max_restarts=args.max_restarts, task_exit_wait=args.task_exit_wait,
            executable=args.executable,
        )
        cli = bignlp_jax_command(args.executable)
        stages = plan_stages(cli, args.target, args.overrides)
        target = resolve_target(args.target)
        if is_pipeline(target):  # scripts and logs go to the pipeline's output directory
            job_dir, name = pipeline_output(target, args.overrides)
        else:  # ... or to the run directory
            cfg = load_run_config(target, args.overrides)
            job_dir, name = Path(cfg.run.dir).resolve(), cfg.run.name
        job_dir = Path(args.job_dir).resolve() if args.job_dir else job_dir
        opts.job_name = opts.job_name or f"bignlp-{name}"
        submit(stages, opts, job_dir, dry_run=args.dry_run, after=args.after)
        return 0

    return main_wrapper(run)


if __name__ == "__main__":
    sys.exit(main())
