"""launch/k8s.py: JobSet manifests for GPU node pools and GKE TPU slices (structure only: no
cluster here)."""

import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO))

from launch.common import LaunchError, Stage  # noqa: E402
from launch.k8s import K8sOptions, main, render_jobset, to_yaml  # noqa: E402

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

    pre, fine = manifest["spec"]["replicatedJobs"]
    assert [pre["name"], fine["name"]] == ["pretrain", "finetune"]
    assert "dependsOn" not in pre
    assert fine["dependsOn"] == [{"name": "pretrain", "status": "Complete"}]
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
        assert env["BIGNLP_COORDINATOR"] == f"demo-{job['name']}-0-0.demo:8476"
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
    # GKE injects TPU_WORKER_ID/HOSTNAMES; JAX detects the layout: no explicit coordinator
    assert "BIGNLP_COORDINATOR" not in env_of(pod["containers"][0])


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
    [job] = manifest["spec"]["replicatedJobs"]
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "bignlp-jax", "--init-timeout", "900", "train", "tiny", "train.steps=3"]

    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl here
    out = tmp_path / "m.yaml"
    assert main(["apply", "--image", "img", "--out", str(out), "tiny"]) == 2
    assert "kubectl not found" in capsys.readouterr().err
    assert yaml.safe_load(out.read_text())["kind"] == "JobSet"  # kept for a manual apply
