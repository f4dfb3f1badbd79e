"""Kubernetes: render (and apply) a JobSet that runs bignlp-jax on GPU node pools or GKE TPU slices.

    python launch/k8s.py render --image IMG --nodes 2 --gpus-per-node 8 --pvc runs:/runs \\
        configs/pipelines/my.yaml run.dir=/runs/my > my.yaml
    python launch/k8s.py apply  --image IMG --tpu-accelerator tpu-v5p-slice \\
        --tpu-topology 2x2x4 --tpu-chips-per-node 4 configs/tiny.yaml

One JobSet per launch; each stage (a config is one `train` stage, a pipeline one per stage) is a
replicated job of `--nodes` pods, one bignlp-jax process per pod, and waits for the previous
stage to complete (`dependsOn`, JobSet >= 0.8). The container runs bignlp-jax directly (no shell),
so no value is ever interpreted by a shell.

How the processes find each other:
- GPU: each stage of more than one pod gets a coordinator pod (replicated job `<stage>-coord`)
  that runs JAX's coordination service alone (`bignlp-jax coordinator`), preferably on a node
  without the stage's workers, so that losing process 0's node is named by the other processes
  in one line like the loss of any other, not ended in JAX's C++ abort. The manifest sets
  BIGNLP_COORDINATOR to that pod (JobSet gives pods stable DNS names
  `<jobset>-<job>-<index>-<pod>.<jobset>`), BIGNLP_COORDINATION_SERVICE=external,
  BIGNLP_NUM_PROCESSES, and BIGNLP_PROCESS_ID from the pod's completion index. The JobSet
  succeeds when the last stage's workers do (successPolicy), and JobSet then deletes the
  coordinator pods (SIGTERM: they exit 0).
- TPU: GKE injects TPU_WORKER_ID / TPU_WORKER_HOSTNAMES (and MEGASCALE_* for several slices,
  one Job per slice on its own node pool via the exclusive-topology annotation); bignlp-jax lets
  JAX detect the layout from them, and the service stays with process 0 (in its helper process:
  losing process 0's whole host still ends the others in JAX's abort).

Restarts: a failed pod fails its Job and JobSet recreates all of them (`--max-restarts`), so a
preempted run (exit 75 after a checkpoint) resumes from its checkpoint; bad input (exit 2) fails
the JobSet at once. Checkpoints must live on storage every pod sees (`--pvc`, or a bucket mount):
`render` warns when no --pvc is given or the run's output directory (a pipeline's output_dir, a
config's run.dir) is not under one. The container's working directory (`--workdir`, default the
first --pvc mount) is set explicitly, so a relative output directory lands on that volume.

The manifest targets JobSet v1alpha2 (v0.8 or newer, for dependsOn) and Kubernetes 1.30+
(podFailurePolicy); tests/test_launch_k8s.py validates it against both schemas.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    LaunchError,
    bignlp_jax_command,
    is_pipeline,
    load_run_config,
    main_wrapper,
    parse_pairs,
    plan_stages,
    require_modules,
    resolve_target,
)
from launch.k8s_manifest import render_jobset, to_yaml  # noqa: E402
from launch.k8s_options import K8sOptions, dns_label  # noqa: E402


def apply(text: str, path: Path | None) -> None:
    """`kubectl apply` the manifest: from `path` (--out, kept) or from a temporary file that is
    removed afterwards, whether kubectl succeeds or not (no stray files in the working dir)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        kept = (f"the manifest is in {path}: apply it" if path else
                "write the manifest with `k8s.py render ... --out FILE` and apply it")
        raise LaunchError(f"kubectl not found on PATH; {kept} where kubectl talks to your "
                          "cluster (`kubectl apply -f FILE`)")
    with tempfile.TemporaryDirectory(prefix="bignlp-k8s-") as tmp:
        file = path or Path(tmp) / "jobset.yaml"
        if path is None:
            file.write_text(text, encoding="utf-8")
        proc = subprocess.run([kubectl, "apply", "-f", str(file)], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise LaunchError(f"kubectl apply failed: {proc.stderr.strip()}"
                          + (f" (the manifest is in {path})" if path else ""))
    print(proc.stdout.strip())


def output_dir_of(target: str, overrides: list[str]) -> str | None:
    """Where the job writes (as the container sees it): a pipeline's output_dir, a config's
    run.dir; None if the file cannot be read here (bignlp-jax reports it in the job)."""
    resolved = resolve_target(target)
    try:
        if is_pipeline(resolved):
            from bignlp_jax.pipeline.spec import Pipeline

            return Pipeline.load(resolved, overrides).spec.output_dir
        return load_run_config(resolved, overrides).run.dir
    except LaunchError:
        return None


def storage_warnings(output_dir: str | None, opts: K8sOptions) -> list[str]:
    """Why checkpoints might not survive a pod restart, or not be shared between pods."""
    if output_dir is None or "://" in output_dir:  # gs://... is shared storage already
        return []
    if not opts.pvcs:
        return [f"no --pvc given: {output_dir} (checkpoints, logs) is written inside each pod "
                "and lost when it restarts; mount shared storage with --pvc CLAIM:/PATH"]
    where = PurePosixPath(opts.working_dir or "/") / output_dir  # absolute stays absolute
    mounts = [PurePosixPath(m) for m in opts.pvcs.values()]
    if not any(where == m or m in where.parents for m in mounts):
        return [f"{output_dir} resolves to {where} in the container, which is on no --pvc mount "
                f"({', '.join(map(str, mounts))}); its checkpoints are lost when a pod restarts. "
                "Use a path under a mount, or --workdir MOUNT for a relative one"]
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k8s.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_ in (("render", "write the JobSet manifest (stdout or --out)"),
                           ("apply", "render, save (--out) and `kubectl apply` it")):
        p = sub.add_parser(command, help=help_)
        p.add_argument("target", metavar="PIPELINE_OR_CONFIG",
                       help="path as seen inside the container")
        p.add_argument("overrides", nargs="*", default=[],
                       help="dotted overrides passed to bignlp-jax, e.g. train.steps=100")
        p.add_argument("--image", required=True, help="container image with bignlp-jax")
        p.add_argument("--name", help="JobSet name (default: from the file name)")
        p.add_argument("--nodes", type=int, default=1,
                       help="pods (processes) per stage/slice (default 1)")
        p.add_argument("--gpus-per-node", type=int, default=0,
                       help="GPUs per pod (default 0: none, or a TPU slice)")
        p.add_argument("--tpu-accelerator", help="GKE TPU type, e.g. tpu-v5p-slice")
        p.add_argument("--tpu-topology", help="TPU slice topology, e.g. 2x2x4")
        p.add_argument("--tpu-chips-per-node", type=int, default=4,
                       help="TPU chips per host (default 4)")
        p.add_argument("--slices", type=int, default=1,
                       help="TPU slices (multislice; default 1)")
        p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's)")
        p.add_argument("--service-account", help="pod service account (default: the namespace's)")
        p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                       help="schedule pods on nodes with this label (repeatable; default: none)")
        p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="environment variable of the container (repeatable; default: none)")
        p.add_argument("--pvc", action="append", default=[], metavar="CLAIM:MOUNT_PATH",
                       help="mount a PersistentVolumeClaim (shared run/checkpoint storage; "
                            "repeatable; default: none, with a warning)")
        p.add_argument("--workdir", metavar="DIR",
                       help="container working directory, where relative paths point (default: "
                            "the first --pvc mount path; without --pvc, the image's)")
        p.add_argument("--cpu", help="CPU request per pod, e.g. 16 (default: none)")
        p.add_argument("--memory", help="memory request and limit per pod, e.g. 200Gi "
                                        "(default: none)")
        p.add_argument("--port", type=int, default=8476,
                       help="coordinator port (GPU; default 8476)")
        p.add_argument("--max-restarts", type=int, default=10,
                       help="times the JobSet recreates failed pods (default 10)")
        p.add_argument("--init-timeout", type=int, default=900,
                       help="seconds a process waits for the others to join (default 900)")
        p.add_argument("--bignlp-jax", dest="executable", default="bignlp-jax",
                       help="the CLI's path inside the image (default: bignlp-jax)")
        p.add_argument("--out", help="manifest file (render: default stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        require_modules("yaml", "pydantic", why="k8s.py reads the config or pipeline with")
        # stage names come from the local copy of the pipeline (the repository in the image);
        # inside the container the file keeps the path the user gave
        stages = plan_stages(bignlp_jax_command(), args.target, args.overrides,
                             job_target=args.target)
        opts = K8sOptions(
            name=dns_label(args.name or Path(args.target).stem)[:40], image=args.image,
            nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            tpu_accelerator=args.tpu_accelerator, tpu_topology=args.tpu_topology,
            tpu_chips_per_node=args.tpu_chips_per_node, slices=args.slices,
            namespace=args.namespace, service_account=args.service_account,
            node_selector=parse_pairs(args.node_selector, "--node-selector"),
            env=parse_pairs(args.env, "--env"), pvcs=parse_pairs(args.pvc, "--pvc", ":"),
            cpu=args.cpu, memory=args.memory, port=args.port, max_restarts=args.max_restarts,
            init_timeout=args.init_timeout, executable=args.executable, workdir=args.workdir,
        )
        text = to_yaml(render_jobset(stages, opts))
        for warning in storage_warnings(output_dir_of(args.target, args.overrides), opts):
            print(f"k8s.py: warning: {warning}", file=sys.stderr)
        path = Path(args.out) if args.out else None
        if path is not None:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        if args.command == "render" and path is None:
            sys.stdout.write(text)
        if args.command == "apply":
            apply(text, path)
        return 0

    return main_wrapper(run)


if __name__ == "__main__":
    sys.exit(main())
