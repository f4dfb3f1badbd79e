"""launch/k8s.py: JobSet manifests for GPU node pools and GKE TPU slices (structure only: no
cluster here)."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import yaml
from compile_flags import xla_flags
from conftest import REPO, bignlp_cmd

sys.path.insert(0, str(REPO))

from launch.common import LaunchError, Stage  # noqa: E402
from launch.k8s import main  # noqa: E402
from launch.k8s_manifest import render_jobset, to_yaml  # noqa: E402
from launch.k8s_options import K8sOptions  # noqa: E402

NASTY = "run.name=a b;$(rm -rf ~)`x`'\""
STAGES = [Stage("pretrain", ("pipeline", "configs/p.yaml", "--stage", "pretrain", NASTY)),
          Stage("finetune", ("pipeline", "configs/p.yaml", "--stage", "finetune", NASTY))]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_gpu_chain():
    opts = K8sOptions(name="demo", image="ghcr.io/x/bignlp:1", nodes=4, gpus_per_node=8,
                      pvcs={"runs": "/runs"}, env={"NCCL_DEBUG": "WARN"}, namespace="ml")
    manifest = render_jobset(STAGES, opts)
    assert yaml.safe_load(to_yaml(manifest)) == manifest  # valid YAML, nothing lost
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert manifest["metadata"]["namespace"] == "ml"
    assert manifest["spec"]["network"]["enableDNSHostnames"] is True
    policy = manifest["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 10 and policy["rules"][0]["action"] == "FailJobSet"

    pre_coord, pre, fine_coord, fine = manifest["spec"]["replicatedJobs"]
    assert [j["name"] for j in (pre_coord, pre, fine_coord, fine)] == [
        "pretrain-coord", "pretrain", "finetune-coord", "finetune"]
    assert "dependsOn" not in pre and "dependsOn" not in pre_coord
    for job in (fine_coord, fine):  # a stage and its coordinator start when the last one is done
        assert job["dependsOn"] == [{"name": "pretrain", "status": "Complete"}]
    # done when the last stage is: JobSet then deletes the coordinator pods, which never end
    assert manifest["spec"]["successPolicy"] == {"operator": "All",
                                                 "targetReplicatedJobs": ["finetune"]}
    for coord, stage in ((pre_coord, "pretrain"), (fine_coord, "finetune")):
        spec = coord["template"]["spec"]
        assert (coord["replicas"], spec["parallelism"], spec["completionMode"]) == (
            1, 1, "Indexed")
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        assert container["command"] == ["bignlp-jax", "coordinator", "--port", "8476",
                                        "--processes", "4", "--bind", "$(POD_IP)"]
        assert container["env"] == [{"name": "POD_IP", "valueFrom": {
            "fieldRef": {"fieldPath": "status.podIP"}}}]  # the pod's IP, not every interface
        assert "nvidia.com/gpu" not in str(pod)  # no GPU taken from the workers
        away = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert away[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == {
            "bignlp-jax/stage": stage}
    for job in (pre, fine):
        spec = job["template"]["spec"]
        assert (job["replicas"], spec["parallelism"], spec["completions"]) == (1, 4, 4)
        assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] == 0
        assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        # exec form: every argument, shell syntax included, reaches bignlp-jax verbatim
        assert container["command"] == ["bignlp-jax", "--init-timeout", "900", "pipeline",
                                        "configs/p.yaml", "--stage", job["name"], NASTY]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"
        assert container["volumeMounts"][0]["mountPath"] == "/runs"
        env = env_of(container)
        assert env["BIGNLP_COORDINATOR"] == f"demo-{job['name']}-coord-0-0.demo:8476"
        assert env["BIGNLP_COORDINATION_SERVICE"] == "external"
        assert env["BIGNLP_NUM_PROCESSES"] == "4"
        assert "job-completion-index" in env["BIGNLP_PROCESS_ID"]["fieldRef"]["fieldPath"]
        assert env["NCCL_DEBUG"] == "WARN" and "BIGNLP_INIT_TIMEOUT" not in env


def test_tpu_multislice():
    opts = K8sOptions(name="tpu-run", image="img", nodes=4, tpu_accelerator="tpu-v5p-slice",
                      tpu_topology="2x4x4", tpu_chips_per_node=4, slices=2)
    manifest = render_jobset(STAGES[:1], opts)
    annotations = manifest["metadata"]["annotations"]
    exclusive = annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"]
    assert exclusive == "cloud.google.com/gke-nodepool"
    [job] = manifest["spec"]["replicatedJobs"]
    assert job["replicas"] == 2 and job["template"]["spec"]["parallelism"] == 4
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
    assert pod["hostNetwork"] is True
    # GKE injects TPU_WORKER_ID/HOSTNAMES; JAX detects the layout: no explicit coordinator,
    # no coordinator pod (the service stays with process 0)
    assert "BIGNLP_COORDINATOR" not in env_of(pod["containers"][0])
    assert "successPolicy" not in manifest["spec"]


@pytest.mark.parametrize("changes, message", [
    ({"gpus_per_node": 8, "tpu_accelerator": "tpu-v5p-slice", "tpu_topology": "2x2"}, "either"),
    ({"tpu_accelerator": "tpu-v5p-slice"}, "--tpu-topology"),
    ({"slices": 2}, "--slices"),
    ({"name": "x" * 60}, "longer than 63"),
])
def test_bad_options(changes, message):
    with pytest.raises(LaunchError, match=message):
        render_jobset(STAGES, K8sOptions(**{"name": "n", "image": "i", **changes}))


def test_cli_render_and_apply_without_kubectl(tmp_path, capsys, monkeypatch):
    assert main(["render", "--image", "img", "--nodes", "2", "--name", "My_Run!", "tiny",
                 "train.steps=3"]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["metadata"]["name"] == "my-run"
    coord, job = manifest["spec"]["replicatedJobs"]
    assert coord["name"] == "train-coord"
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "bignlp-jax", "--init-timeout", "900", "train", "tiny", "train.steps=3"]

    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl here
    out = tmp_path / "m.yaml"
    assert main(["apply", "--image", "img", "--out", str(out), "tiny"]) == 2
    assert "kubectl not found" in capsys.readouterr().err
    assert yaml.safe_load(out.read_text())["kind"] == "JobSet"  # kept for a manual apply


# -- the manifests against the published schemas ------------------------------------------------
KUBERNETES_VERSION = "1.33"  # a current release; podFailurePolicy is GA since 1.31
JOBSET_SCHEMA = REPO / "tests" / "schemas" / "jobset_v1alpha2_subset.json"


def check_against_schemas(manifest: dict) -> None:
    """The JobSet against the CRD subset, every Job template (pod template included) against
    the Kubernetes OpenAPI schema, and the dependsOn rules the CRD states in prose."""
    import json

    import jsonschema
    import kubernetes_validate

    jsonschema.validate(manifest, json.loads(JOBSET_SCHEMA.read_text()))
    names = []
    for job in manifest["spec"]["replicatedJobs"]:
        kubernetes_validate.validate(
            {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": f"{manifest['metadata']['name']}-{job['name']}-0"},
             "spec": job["template"]["spec"]}, KUBERNETES_VERSION, strict=True)
        for dep in job.get("dependsOn", []):  # "the first ReplicatedJob cannot use DependsOn"
            assert names and dep["name"] in names, job["name"]
        names.append(job["name"])
    targets = manifest["spec"].get("successPolicy", {}).get("targetReplicatedJobs", [])
    assert set(targets) <= set(names), targets


def test_gpu_and_tpu_manifests_pass_the_kubernetes_and_jobset_schemas():
    gpu = K8sOptions(name="demo", image="ghcr.io/x/bignlp:1", nodes=4, gpus_per_node=8,
                     pvcs={"runs": "/runs", "data": "/data"}, env={"NCCL_DEBUG": "WARN"},
                     namespace="ml", cpu="16", memory="200Gi", service_account="trainer",
                     node_selector={"pool": "h100"})
    tpu = K8sOptions(name="tpu-run", image="img", nodes=4, tpu_accelerator="tpu-v5p-slice",
                     tpu_topology="2x4x4", tpu_chips_per_node=4, slices=2,
                     pvcs={"runs": "/runs"})
    single = K8sOptions(name="one", image="img")
    for opts in (gpu, tpu, single):
        manifest = render_jobset(STAGES, opts)
        check_against_schemas(yaml.safe_load(to_yaml(manifest)))


def test_schema_check_catches_what_the_api_server_would_refuse():
    import jsonschema
    import kubernetes_validate

    manifest = render_jobset(STAGES, K8sOptions(name="demo", image="img", gpus_per_node=8))
    del manifest["spec"]["failurePolicy"]["rules"][0]["name"]  # required by the CRD
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        check_against_schemas(manifest)
    manifest = render_jobset(STAGES, K8sOptions(name="demo", image="img", gpus_per_node=8))
    manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["ports"][0]["containerPort"] = "8476"  # must be an integer
    with pytest.raises(kubernetes_validate.ValidationError):
        check_against_schemas(manifest)


def test_render_sets_working_dir_and_warns_about_storage(tmp_path, capsys):
    assert main(["render", "--image", "img", "tiny"]) == 0
    captured = capsys.readouterr()
    assert "warning: no --pvc given: runs/tiny" in captured.err
    assert "workingDir" not in captured.out  # nothing to point it at: the image's own

    assert main(["render", "--image", "img", "--pvc", "runs:/mnt/runs", "tiny"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # relative run.dir, working dir on the volume: covered
    pod = yaml.safe_load(captured.out)["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]
    assert pod["containers"][0]["workingDir"] == "/mnt/runs"

    assert main(["render", "--image", "img", "--pvc", "runs:/mnt/runs", "tiny",
                 "run.dir=/scratch/x"]) == 0
    assert "/scratch/x resolves to /scratch/x in the container, which is on no --pvc mount" in (
        capsys.readouterr().err)
    assert main(["render", "--image", "img", "--pvc", "runs:/mnt/runs", "--workdir", "/app",
                 "pipelines/mini"]) == 0
    assert "runs/pipeline_mini resolves to /app/runs/pipeline_mini" in capsys.readouterr().err


def test_apply_leaves_no_stray_manifest_when_kubectl_fails(tmp_path, capsys, monkeypatch):
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text("#!/bin/sh\necho 'error: no cluster' >&2\nexit 1\n")
    kubectl.chmod(0o755)
    monkeypatch.setenv("PATH", str(kubectl.parent))
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "--image", "img", "--pvc", "runs:/runs", "tiny"]) == 2
    assert "kubectl apply failed: error: no cluster" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


# -- the rendered pods, run as local processes -------------------------------------------------
def pod_process(container: dict, index: int, port: int, cli_env: dict) -> subprocess.Popen:
    """Start a rendered container's command here: `bignlp-jax` is this interpreter's CLI, the
    pod host names are loopback, the completion index is `index`."""
    env = {**cli_env, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    for item in container.get("env", []):
        # valueFrom: the pod's IP (loopback here) or its completion index
        ip = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP"
        value = item.get("value", "127.0.0.1" if ip else str(index))
        env[item["name"]] = re.sub(r"^[a-z0-9.-]+:", "127.0.0.1:", value) \
            if item["name"] == "BIGNLP_COORDINATOR" else value
    assert container["command"][0] == "bignlp-jax"
    # Kubernetes expands $(NAME) in a command from the container's env
    command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
               for a in container["command"][1:]]
    return subprocess.Popen([*bignlp_cmd(), *command], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rendered_coordinator_and_workers_train_together(tmp_path, cli_env):
    """The GPU manifest's coordinator pod and its 2 worker pods, run as processes: the workers
    join the coordinator pod's service (process 0 starts none), train, and exit 0; the
    coordinator ends with exit 0 on the SIGTERM with which JobSet deletes it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    stage = Stage("train", ("train", "tiny", "train.steps=3", "data.source=synthetic",
                            f"run.dir={run}"))
    manifest = render_jobset([stage], K8sOptions(name="demo", image="img", nodes=2, port=port))
    coord, workers = manifest["spec"]["replicatedJobs"]
    pod = coord["template"]["spec"]["template"]["spec"]["containers"][0]
    worker = workers["template"]["spec"]["template"]["spec"]["containers"][0]
    coordinator = pod_process(pod, 0, port, cli_env)
    procs = []
    try:
        assert "listening on 127.0.0.1:" in coordinator.stdout.readline()
        procs = [pod_process(worker, i, port, cli_env) for i in range(2)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert "(an external service)" in outs[0], outs[0]  # process 0 hosted nothing
        assert coordinator.poll() is None  # serves until JobSet deletes it
        coordinator.terminate()
        assert coordinator.wait(timeout=15) == 0
    finally:
        for p in [coordinator, *procs]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
