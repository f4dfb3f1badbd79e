"""The JobSet manifest that launch/k8s.py renders: one replicated job per stage (and, for GPU/CPU
stages of several pods, a coordinator pod per stage); see launch/k8s.py for how the pods find
each other and restart. Pure data in, plain dicts out: tests/test_launch_k8s.py checks them
against the Kubernetes and JobSet schemas."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from launch.common import LaunchError, Stage

CONTAINER = "bignlp-jax"
COORDINATOR = "coord"  # the coordinator pod's replicated job: <stage>-coord
USER_ERROR_EXIT_CODE = 2  # bignlp_jax.errors.UserError: retrying cannot help


@dataclass
class K8sOptions:
    name: str
    image: str
    nodes: int = 1  # pods (= processes) per slice / per stage
    gpus_per_node: int = 0
    tpu_accelerator: str | None = None  # e.g. tpu-v5p-slice, tpu-v5-lite-podslice, tpu-v6e-slice
    tpu_topology: str | None = None  # e.g. 2x2x4
    tpu_chips_per_node: int = 4
    slices: int = 1
    namespace: str | None = None
    service_account: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    pvcs: dict[str, str] = field(default_factory=dict)  # claim name -> mount path
    cpu: str | None = None
    memory: str | None = None
    port: int = 8476
    max_restarts: int = 10
    init_timeout: int = 900  # pods of a stage may start minutes apart (image pulls, scale-up)
    executable: str = "bignlp-jax"
    workdir: str | None = None  # container workingDir (None: the first PVC's mount path)

    @property
    def working_dir(self) -> str | None:
        return self.workdir or next(iter(self.pvcs.values()), None)

    @property
    def tpu(self) -> bool:
        return self.tpu_accelerator is not None


def dns_label(text: str) -> str:
    """A DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label or "bignlp"


def _check(opts: K8sOptions, stages: list[Stage]) -> None:
    _check_names(opts)
    if opts.tpu and opts.gpus_per_node:
        raise LaunchError("choose either GPUs (--gpus-per-node) or a TPU slice (--tpu-*), not both")
    if opts.tpu and not opts.tpu_topology:
        raise LaunchError("--tpu-accelerator needs --tpu-topology (e.g. 2x2x4)")
    if opts.slices > 1 and not opts.tpu:
        raise LaunchError("--slices is for TPU multislice; for GPUs raise --nodes instead")
    for stage in stages:  # pod host names must fit in one DNS label
        host = f"{opts.name}-{dns_label(stage.name)}-{opts.slices - 1}-{opts.nodes - 1}"
        if _has_coordinator(opts):
            host = max(host, f"{opts.name}-{dns_label(stage.name)}-{COORDINATOR}-0-0", key=len)
        if len(host) > 63:
            raise LaunchError(f"pod host name {host!r} is longer than 63 characters; "
                              "choose a shorter --name")


# Kubernetes' own name rules (apimachinery's validation), checked before anything is rendered
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # DNS-1123 label
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"  # DNS-1123 subdomain
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
_ENV_NAME = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
_QUANTITY = r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"


def _name(what: str, value: str | None, pattern: str, limit: int, example: str) -> None:
    if value is not None and (len(value) > limit or not re.fullmatch(pattern, value)):
        raise LaunchError(f"{what} {value!r} is not a valid Kubernetes name (at most {limit} "
                          f"characters, e.g. {example})")


def _check_names(opts: K8sOptions) -> None:
    """Every name the manifest carries, in one line each, before rendering."""
    _name("--name", opts.name, _LABEL, 63, "my-run")
    _name("--namespace", opts.namespace, _LABEL, 63, "team-a")
    _name("--service-account", opts.service_account, _SUBDOMAIN, 253, "trainer")
    for key in opts.env:
        _name("--env name", key, _ENV_NAME, 1024, "HF_HOME")
    for key, value in opts.node_selector.items():
        prefix, _, name = key.rpartition("/")
        if prefix:
            _name("--node-selector key prefix", prefix, _SUBDOMAIN, 253, "cloud.google.com")
        _name("--node-selector key", name, rf"[A-Za-z0-9]{_LABEL_VALUE[1:-2]}?", 63, "gpu-type")
        _name("--node-selector value", value, _LABEL_VALUE, 63, "a100")
    for claim, mount in opts.pvcs.items():
        _name("--pvc claim", claim, _SUBDOMAIN, 253, "data")
        if not mount.startswith("/") or ":" in mount or re.search(r"[\x00-\x1f]", mount):
            raise LaunchError(f"--pvc {claim}:{mount!r}: the mount path must be absolute, "
                              "without ':' or control characters (e.g. data:/data)")
    for what, quantity in (("--cpu", opts.cpu), ("--memory", opts.memory)):
        _name(what, quantity, _QUANTITY, 64, "8, 500m or 64Gi")
    for what, label in (("--tpu-accelerator", opts.tpu_accelerator),
                        ("--tpu-topology", opts.tpu_topology)):
        _name(what, label, _LABEL_VALUE, 63, "tpu-v5p-slice, 2x2x4")
    if not opts.image or re.search(r"[\s\x00-\x1f]", opts.image):
        raise LaunchError(f"--image {opts.image!r} is not an image reference (no spaces or "
                          "control characters, e.g. ghcr.io/org/bignlp-jax:1.0)")


def _has_coordinator(opts: K8sOptions) -> bool:
    """GPU/CPU stages of several pods: the coordination service runs in a pod of its own."""
    return not opts.tpu and opts.nodes > 1


def _env(opts: K8sOptions, stage_name: str) -> list[dict]:
    env: list[dict[str, object]] = [{"name": k, "value": str(v)}
                                    for k, v in sorted(opts.env.items())]
    if _has_coordinator(opts):
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
    _check(opts, stages)
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
        jobs = [_coordinator_job(opts, name), job] if _has_coordinator(opts) else [job]
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
               if _has_coordinator(opts) else {}),
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
