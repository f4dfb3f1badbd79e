"""Where a process sits in a multi-process job: the layout (coordinator address, process count,
this process's id, where the coordination service runs) from flags and the environment.

The first source that applies wins:

1. `--distributed off` (env `BIGNLP_DISTRIBUTED=off`): one process, whatever the environment says.
2. Explicit: `--coordinator HOST:PORT --num-processes N --process-id I` or the environment
   variables `BIGNLP_COORDINATOR`, `BIGNLP_NUM_PROCESSES`, `BIGNLP_PROCESS_ID` (set by
   `launch/local.py` and by the Kubernetes JobSets that `launch/k8s.py` renders).
3. SLURM: inside an `srun` step with more than one task. The coordinator is the step's first node;
   the batch script itself (no step) is never treated as distributed.
4. GKE TPU slices: `TPU_WORKER_HOSTNAMES` (set by GKE) names more than one host, or several
   slices (`MEGASCALE_NUM_SLICES`); JAX's own TPU detection fills in the details.

Where JAX's coordination service runs (`--coordination-service`, env
`BIGNLP_COORDINATION_SERVICE`): `process0` (the default: process 0 starts it, in a helper process,
coordination_host.py) or `external` (already listening at the coordinator address: started by
`launch/local.py` or by the coordinator pod of a JobSet, so that losing process 0's whole host
does not take the service with it). Environment variables carry the process layout only, as
torchrun's and JAX's do.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

from bignlp_jax.errors import UserError

# Defaults (seconds). Initialisation waits for every process to start: generous for slow
# container pulls; heartbeats detect a dead peer; shutdown waits for peers at exit.
INIT_TIMEOUT = 300.0
HEARTBEAT_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 120
# SLURM: the coordinator port is derived from the job id, in a range above Linux's default
# ephemeral ports (32768-60999) so outgoing connections never hold it.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 61440, 4096
SERVICES = ("process0", "external")  # where the coordination service runs



class CoordinatorError(UserError):
    """The processes of a job could not be joined (unreachable coordinator, bad layout)."""


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the job. `coordinator` is None when JAX detects it (TPU)."""

    source: str  # "flags/env", "slurm" or "gke-tpu": named in messages
    num_processes: int
    process_id: int
    coordinator: str | None
    local_device_ids: tuple[int, ...] | None = None

    service: str = "process0"  # or "external": see the module docstring


def _int(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CoordinatorError(f"{name}={value!r} is not an integer") from None


def detect(args: argparse.Namespace | None = None,
           env: Mapping[str, str] = os.environ) -> Layout | None:
    """The job layout from flags and environment, or None for a single process."""
    get = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)
    mode = get("distributed") or env.get("BIGNLP_DISTRIBUTED", "auto")
    if mode not in ("auto", "off"):
        raise CoordinatorError(f"BIGNLP_DISTRIBUTED={mode!r}: expected 'auto' or 'off'")
    if mode == "off":
        return None
    explicit = _explicit_layout(get, env)
    if explicit is not None:
        layout = explicit if explicit.num_processes > 1 else None
    else:
        layout = _slurm_layout(env, get) or _tpu_layout(env)
    service = get("coordination_service") or env.get("BIGNLP_COORDINATION_SERVICE") or "process0"
    if service not in SERVICES:
        raise CoordinatorError(f"BIGNLP_COORDINATION_SERVICE={service!r}: expected one of "
                               f"{', '.join(SERVICES)}")
    if layout is None or service == layout.service:
        return layout
    if layout.coordinator is None:
        raise CoordinatorError(
            f"--coordination-service {service} needs the coordinator's address, but this "
            f"layout ({layout.source}) leaves it to JAX's own detection\n"
            "  fix: drop --coordination-service (process 0 then hosts the service), or give "
            "--coordinator HOST:PORT --num-processes N --process-id I")
    return replace(layout, service=service)


def _explicit_layout(get, env: Mapping[str, str]) -> Layout | None:
    coordinator = get("coordinator") or env.get("BIGNLP_COORDINATOR") or None
    num = get("num_processes")
    num = num if num is not None else _int(env.get("BIGNLP_NUM_PROCESSES"), "BIGNLP_NUM_PROCESSES")
    pid = get("process_id")
    pid = pid if pid is not None else _int(env.get("BIGNLP_PROCESS_ID"), "BIGNLP_PROCESS_ID")
    given = {"--coordinator": coordinator, "--num-processes": num, "--process-id": pid}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing and not (num == 1 and pid in (None, 0)):
        raise CoordinatorError(
            f"multi-process run is missing {', '.join(missing)} (given: "
            f"{', '.join(f'{k} {v}' for k, v in given.items() if v is not None)})\n"
            "  fix: pass all three of --coordinator HOST:PORT --num-processes N --process-id I "
            "(or BIGNLP_COORDINATOR, BIGNLP_NUM_PROCESSES, BIGNLP_PROCESS_ID)"
        )
    assert num is not None  # a missing count was refused above
    if num < 1 or not 0 <= (pid or 0) < num:
        raise CoordinatorError(
            f"--process-id {pid} must be in 0..{num - 1} (--num-processes {num})")
    if coordinator is not None and not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d+", coordinator):
        raise CoordinatorError(
            f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
    return Layout("flags/env", num, pid or 0, coordinator, _device_ids_override(get))


def _device_ids_override(get) -> tuple[int, ...] | None:
    """--local-device-ids: 'all' (or not given) lets a process use every local device."""
    value = (get("local_device_ids") or "all").strip()
    if value in ("", "all"):
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise CoordinatorError(
            f"--local-device-ids {value!r}: expected 'all' or ids like '0,1'") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM host list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry ends at a comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM's compressed form, e.g. '4(x2),2' -> [4, 4, 2]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if node_id < len(counts) else 1


def _slurm_layout(env: Mapping[str, str], get=lambda name: None) -> Layout | None:
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # not inside an srun step (e.g. the batch script itself)
    num = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_STEP_NUM_TASKS")
    if not num or num < 2:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    port = (env.get("BIGNLP_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
            or str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN))
    ids = _device_ids_override(get)
    here = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0)))
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    on_cpu = env.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if ids is None and here > 1 and not on_cpu and len(visible) != 1:
        # One task per GPU and SLURM did not bind GPUs to tasks: each task takes its own GPU.
        ids = (int(env.get("SLURM_LOCALID", 0)),)
    coordinator = f"{first_slurm_host(nodelist)}:{port}"
    return Layout("slurm", num, int(env["SLURM_PROCID"]), coordinator, ids)


def _tpu_layout(env: Mapping[str, str]) -> Layout | None:
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if not hosts or "TPU_WORKER_ID" not in env:
        return None
    per_slice = len(hosts.split(","))
    slices = _int(env.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
    if per_slice * slices < 2:
        return None
    slice_id = _int(env.get("MEGASCALE_SLICE_ID"), "MEGASCALE_SLICE_ID") or 0
    pid = slice_id * per_slice + int(env["TPU_WORKER_ID"])
    return Layout("gke-tpu", per_slice * slices, pid, None)


def describe(layout: Layout) -> str:
    where = layout.coordinator or "detected by JAX from TPU_WORKER_HOSTNAMES"
    hosted = " (an external service)" if layout.service == "external" else ""
    return (f"process {layout.process_id} of {layout.num_processes} "
            f"(layout from {layout.source}, coordinator {where}{hosted})")


def loopback_only(host: str) -> str | None:
    """The address `host` resolves to here when every one is a loopback address and `host` is
    not a loopback name itself: Debian and Ubuntu map a machine's own name to 127.0.1.1 in
    /etc/hosts, so a service bound to that name is out of other hosts' reach."""
    host = host.strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None  # asked for loopback by address
    except ValueError:
        pass
    if host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        found = {str(info[4][0])
                 for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return None
    loopback = sorted(a for a in found if ipaddress.ip_address(a.split("%")[0]).is_loopback)
    return loopback[0] if loopback and len(loopback) == len(found) else None
