"""The JobSet manifest that launch/k8s.py renders: one replicated job per stage (and, for GPU/CPU
stages of several pods, a coordinator pod per stage); see launch/k8s.py for how the pods find
each other and restart. Pure data in, plain dicts out: tests/test_launch_k8s.py checks them
against the Kubernetes and JobSet schemas."""

from __future__ import annotations

import re

from launch.common import Stage
from launch.k8s_options import COORDINATOR, K8sOptions, check_options, dns_label

CONTAINER = "bignlp-jax"
USER_ERROR_EXIT_CODE = 2  # bignlp_jax.errors.UserError: retrying cannot help


def _env(opts: K8sOptions, stage_name: str) -> list[dict]:
    env: list[dict[str, object]] = [{"name": k, "value": str(v)}
                                    for k, v in sorted(opts.env.items())]
    if opts.has_coordinator:
        coordinator = f"{opts.name}-{stage_name}-{COORDINATOR}-0-0.{opts.name}:{opts.port}"
        env += [
            {"name": "BIGNLP_COORDINATOR", "value": coordinator},
            {"name": "BIGNLP_COORDINATION_SERVICE", "value": "external"},
            {"name": "BIGNLP_NUM_PROCESSES", "value": str(opts.nodes)},
            {"name": "BIGNLP_PROCESS_ID", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ]
    return env


def _pod_spec(opts: K8sOptions, stage: Stage, stage_name: str) -> dict:
    limits: dict[str, object] = {}
    requests: dict[str, object] = {}
    node_selector: dict[str, str | None] = dict(opts.node_selector)
    if opts.gpus_per_node:
        limits["nvidia.com/gpu"] = opts.gpus_per_node
    if opts.tpu:
        limits["google.com/tpu"] = opts.tpu_chips_per_node
        node_selector["cloud.google.com/gke-tpu-accelerator"] = opts.tpu_accelerator
        node_selector["cloud.google.com/gke-tpu-topology"] = opts.tpu_topology
    if opts.cpu:
        requests["cpu"] = opts.cpu
    if opts.memory:
        requests["memory"] = limits["memory"] = opts.memory
    container = {
        "name": CONTAINER,
        "image": opts.image,
        # exec form: no shell in between; the timeout is a flag (env carries the layout only)
        "command": [opts.executable, "--init-timeout", str(opts.init_timeout), *stage.args],
        "env": _env(opts, stage_name),
        "ports": [{"containerPort": opts.port, "name": "coordinator"}],
        **({"workingDir": opts.working_dir} if opts.working_dir else {}),
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
    }
    spec: dict = {"restartPolicy": "Never", "containers": [container]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    if opts.gpus_per_node:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    if opts.tpu:  # TPU hosts talk over the host network (GKE's recommended multi-host setup)
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    if opts.pvcs:
        spec["volumes"] = [{"name": f"vol{i}", "persistentVolumeClaim": {"claimName": claim}}
                           for i, claim in enumerate(opts.pvcs)]
        container["volumeMounts"] = [{"name": f"vol{i}", "mountPath": path}
                                     for i, path in enumerate(opts.pvcs.values())]
    return spec


def _coordinator_job(opts: K8sOptions, stage_name: str) -> dict:
    """One pod running `bignlp-jax coordinator` for the stage's processes, until the JobSet
    completes (JobSet then deletes it) or fails; preferably not on a node of the stage's
    workers, so that no worker's node takes it down."""
    container = {
        "name": "coordinator",
        "image": opts.image,
        # the pod's own IP, where the workers' coordinator name leads: JAX's service has no
        # authentication, so it listens there and not on every interface
        "command": [opts.executable, "coordinator", "--port", str(opts.port),
                    "--processes", str(opts.nodes), "--bind", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"containerPort": opts.port, "name": "coordinator"}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
    }
    spec: dict = {
        "restartPolicy": "Never",
        "containers": [container],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "labelSelector": {"matchLabels": {"bignlp-jax/stage": stage_name}},
                "topologyKey": "kubernetes.io/hostname"},
        }]}},
    }
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    return {
        "name": f"{stage_name}-{COORDINATOR}",
        "replicas": 1,
        "template": {"spec": {
            "parallelism": 1,
            "completions": 1,
            "completionMode": "Indexed",  # a stable pod host name, as the workers have
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "bignlp-jax",
                                        "bignlp-jax/coordinator-of": stage_name}},
                "spec": spec,
            },
        }},
    }


def render_jobset(stages: list[Stage], opts: K8sOptions) -> dict:
    """The JobSet (as a plain dict) running `stages` one after another."""
    check_options(opts, stages)
    replicated = []
    previous = None
    for stage in stages:
        name = dns_label(stage.name)
        job = {
            "name": name,
            "replicas": opts.slices,
            "template": {"spec": {
                "parallelism": opts.nodes,
                "completions": opts.nodes,
                "completionMode": "Indexed",
                "backoffLimit": 0,  # any pod failure restarts the whole group (JobSet policy)
                "podFailurePolicy": {"rules": [{
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                    "values": [USER_ERROR_EXIT_CODE]},
                }]},
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "bignlp-jax",
                                            "bignlp-jax/stage": name}},
                    "spec": _pod_spec(opts, stage, name),
                },
            }},
        }
        jobs = [_coordinator_job(opts, name), job] if opts.has_coordinator else [job]
        for each in jobs:
            if previous:
                each["dependsOn"] = [{"name": previous, "status": "Complete"}]
            replicated.append(each)
        previous = name
    metadata: dict = {"name": opts.name, "labels": {"app.kubernetes.io/name": "bignlp-jax"}}
    if opts.namespace:
        metadata["namespace"] = opts.namespace
    if opts.tpu and opts.slices > 1:
        metadata["annotations"] = {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            # stable pod DNS names <jobset>-<job>-<index>-<pod>.<jobset>, published before ready
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "failurePolicy": {
                "maxRestarts": opts.max_restarts,
                # a Job failed by the podFailurePolicy above (bad input) is not retried
                "rules": [{"name": "failOnUserError", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            "replicatedJobs": replicated,
            # done when the last stage's workers are: the coordinator pods never end by
            # themselves, JobSet deletes them then
            **({"successPolicy": {"operator": "All", "targetReplicatedJobs": [previous]}}
               if opts.has_coordinator else {}),
        },
    }


# Plain scalars that YAML 1.2's core schema or Go's YAML 1.1 parser (kubectl) reads as something
# other than a string, where PyYAML's YAML 1.1 does not: `0o17`, `1e3`, `+1`, `.5`, `y` ... Such
# strings are written quoted, so every reader gets the same string.
_YAML12_NOT_STRING = re.compile(
    r"""~|null|Null|NULL|true|True|TRUE|false|False|FALSE|y|Y|n|N"""
    r"""|[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"""
    r"""|[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"""
    r"""|[-+]?\.(inf|Inf|INF)|\.nan|\.NaN|\.NAN""")


def to_yaml(manifest: dict) -> str:
    import yaml  # here, so a Python without it gets require_modules' line, not a traceback

    class Dumper(yaml.SafeDumper):
        def represent_str(self, data: str):  # type: ignore[override]
            if _YAML12_NOT_STRING.fullmatch(data):
                return self.represent_scalar("tag:yaml.org,2002:str", data, style="'")
            return super().represent_str(data)

    Dumper.add_representer(str, Dumper.represent_str)
    return yaml.dump(manifest, Dumper=Dumper, sort_keys=False, default_flow_style=False)
