"""What launch/k8s.py is asked for (`K8sOptions`), checked against Kubernetes' own rules before
anything is rendered (k8s_manifest.py renders the JobSet)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from launch.common import LaunchError, Stage

COORDINATOR = "coord"  # the coordinator pod's replicated job: <stage>-coord


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

    @property
    def has_coordinator(self) -> bool:
        """GPU/CPU stages of several pods: the coordination service runs in a pod of its own."""
        return not self.tpu and self.nodes > 1


def dns_label(text: str) -> str:
    """A DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label or "bignlp"


def check_options(opts: K8sOptions, stages: list[Stage]) -> None:
    """Refuse options that cannot make a valid JobSet, one LaunchError line each."""
    _check_names(opts)
    if opts.tpu and opts.gpus_per_node:
        raise LaunchError("choose either GPUs (--gpus-per-node) or a TPU slice (--tpu-*), not both")
    if opts.tpu and not opts.tpu_topology:
        raise LaunchError("--tpu-accelerator needs --tpu-topology (e.g. 2x2x4)")
    if opts.slices > 1 and not opts.tpu:
        raise LaunchError("--slices is for TPU multislice; for GPUs raise --nodes instead")
    for stage in stages:  # pod host names must fit in one DNS label
        host = f"{opts.name}-{dns_label(stage.name)}-{opts.slices - 1}-{opts.nodes - 1}"
        if opts.has_coordinator:
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
